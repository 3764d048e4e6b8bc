"""ROUGE-L dedup speed: ``rouge_l_keep`` vs rouge_score-based filtering as the self-instruct and
Alpaca ``generate_instruction.py`` scripts do it (each candidate scored with
``rouge_scorer._score_lcs`` against EVERY pool instruction, dropped if the max F > 0.7, kept ones
join the pool), on 5,000 candidates in one run.

    python benchmarks/dedup.py [--n 5000] [--ref-n 1000]

The rouge_score side is slow (pure-Python LCS per pair), so by default it runs on the first
``--ref-n`` candidates; its time per scored pair then gives an estimate for all candidates from
the exact number of pairs the full run scores (known from the keep decisions, which the
benchmark checks agree on that prefix). Pass ``--ref-n 5000`` to time it in full. The original
scripts spread the pairs over a multiprocessing pool; both sides here use one process.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dromedary_jax.pipeline.data_files import load_seed_tasks  # noqa: E402
from dromedary_jax.pipeline.filters import rouge_l_keep  # noqa: E402
from dromedary_jax.testing.scripted import ScriptedGenerator  # noqa: E402
from dromedary_jax.pipeline.stages.self_instruct import encode_vanilla_prompt, parse_vanilla  # noqa: E402


def make_candidates(n: int, seed_instructions: list[str], seed: int = 0) -> list[str]:
    """Realistic-looking generated instructions: scripted self-instruct output plus mutated seed
    and machine instructions (a share of words replaced), so that some are near-duplicates, some
    sit near the threshold and many are new."""
    rng = random.Random(seed)
    gen = ScriptedGenerator()
    vocab = sorted({w.strip(".,?!:;\"'()").lower() for s in seed_instructions for w in s.split()} - {""})
    scripted: list[str] = []
    j = 0
    while len(scripted) < n // 2:
        prompt = encode_vanilla_prompt("Tasks:", [{"instruction": s, "input": ""} for s in rng.sample(seed_instructions, 3)])
        text = gen.generate([prompt], ids=[f"bench-{j}"], max_new_tokens=1024, seed=seed)[0]
        scripted += [c["instruction"] for c in parse_vanilla(text, 3) if not c["malformed"]]
        j += 1
    out = list(scripted[: n // 2])
    base = seed_instructions + out
    while len(out) < n:
        words = rng.choice(base).split()
        frac = rng.choice((0.1, 0.2, 0.3, 0.5, 0.7))
        words = [rng.choice(vocab) if rng.random() < frac else w for w in words]
        if rng.random() < 0.3:
            words += rng.sample(vocab, rng.randint(1, 4))
        out.append(" ".join(words))
    rng.shuffle(out)
    return out


def rouge_score_filter(candidates, pool, threshold=0.7):
    """The self-instruct / Alpaca loop: score against every pool member, drop if max F > t.
    Returns (keep decisions, number of pairs scored)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    all_tokens = [scorer._tokenizer.tokenize(p) for p in pool]
    keep, pairs = [], 0
    for cand in candidates:
        tokens = scorer._tokenizer.tokenize(cand)
        scores = [rouge_scorer._score_lcs(tokens, t).fmeasure for t in all_tokens]
        pairs += len(scores)
        if scores and max(scores) > threshold:
            keep.append(False)
            continue
        keep.append(True)
        all_tokens.append(tokens)
    return keep, pairs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--ref-n", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.7)
    args = ap.parse_args()

    seeds = [t["instruction"] for t in load_seed_tasks("data/seed_tasks/seed_tasks.jsonl")]
    cands = make_candidates(args.n, seeds)
    print(f"candidates: {len(cands)}, initial pool: {len(seeds)} seed instructions, threshold {args.threshold}")

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ours = rouge_l_keep(cands, seeds, args.threshold)
        best = min(best, time.perf_counter() - t0)
    kept = sum(ours)
    # pairs the reference loop scores over ALL candidates: the pool size when each one is checked
    total_pairs, pool = 0, len(seeds)
    for k in ours:
        total_pairs += pool
        pool += k
    print(f"ours (rouge_l_keep, rapidfuzz LCS + length pruning): {best:.3f} s, kept {kept}/{len(cands)}")

    ref_n = min(args.ref_n, len(cands))
    t0 = time.perf_counter()
    ref_keep, ref_pairs = rouge_score_filter(cands[:ref_n], seeds, args.threshold)
    ref_time = time.perf_counter() - t0
    agree = ref_keep == ours[:ref_n]
    per_pair = ref_time / max(ref_pairs, 1)
    if ref_n == len(cands):
        ref_total, how = ref_time, "measured"
    else:
        ref_total, how = per_pair * total_pairs, (f"extrapolated: first {ref_n} candidates took {ref_time:.1f} s "
                                                   f"for {ref_pairs} pairs ({per_pair * 1e6:.1f} us/pair) x "
                                                   f"{total_pairs} pairs in the full run")
    print(f"rouge_score loop (self-instruct/Alpaca style): {ref_total:.1f} s ({how})")
    print(f"decisions agree on the {ref_n} candidates run through rouge_score: {agree}")
    print(f"speedup: {ref_total / best:.0f}x (target >= 50x)")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
