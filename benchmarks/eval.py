"""TruthfulQA MC + BIG-bench HHH on a real model: our scorer vs transformers, in one run.

    python benchmarks/eval.py [--gguf PATH] [--bigbench DIR] [--questions N] [--hhh N]

The model is SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to float32 by both sides), the
data BIG-bench's own truthful_qa/questions.json (299 questions) and hhh_alignment/ (221
examples), both fetched into the cache by ``python -m dromedary_jax.fetch`` when missing.

The (context, continuation) pairs are built ONCE here, with the harness's prompts and our
tokenizer from the GGUF (the tokenizer's own BOS rule: none for SmolLM2), and both sides score
exactly those token ids, each in a subprocess of its own (so each side's peak RSS is its own):

- transformers: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, as
  lm-evaluation-harness's HF model scores: one pair per row, ``(context + continuation)[:-1]``
  right-padded, rows sorted longest first, batches of at most ``--hf-batch-tokens`` padded
  tokens, ``log_softmax`` over the continuation positions, targets gathered and summed; all
  cores (``torch.set_num_threads``).
- ours: ``dromedary_jax.eval.loglikelihoods`` (one call per task; the shared preamble prefilled
  once, each context run once for its continuations, packed rows, chunked unembedding).

Printed: each side's load and scoring seconds, pair-tokens/s (tokens of the one-pair-per-row
workload, the same number for both), peak RSS, the ratio of scoring times, the largest
log-likelihood difference, the MC1 / MC2 / HHH numbers of both sides, and how many pairs the
HF tokenizer (harness-style ``_encode_pair``) splits differently from ours.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import matmul_peak_flops  # noqa: E402


# ----------------------------------------------------------------------------- requests
def build_work(gguf: str, questions_json: str, hhh_dir: str, n_tqa: int, n_hhh: int) -> dict:
    """Strings and token ids of every (context, continuation) pair, and how they map back."""
    import importlib

    from dromedary_jax.eval.scorer import encode_pair
    from dromedary_jax.tokenizer import load_tokenizer

    hhh_mod = importlib.import_module("dromedary_jax.eval.hhh")  # eval.hhh is also a function
    tqa = importlib.import_module("dromedary_jax.eval.truthfulqa")
    tok = load_tokenizer(gguf)
    tqa_recs = tqa.load_truthfulqa(questions_json)[:n_tqa or None]
    hhh_recs = hhh_mod.load_hhh(hhh_dir)[:n_hhh or None]
    work = {"add_bos": bool(getattr(tok, "add_bos", True)), "tasks": {}}
    pairs, spans = [], []
    for rec in tqa_recs:
        ctx = tqa.format_context(rec["question"], rec.get("preamble", tqa.QA_PREAMBLE))
        span = []
        for key in ("mc1_targets", "mc2_targets"):
            a = len(pairs)
            pairs += [(ctx, " " + c) for c in rec[key]["choices"]]
            span.append([a, len(pairs), rec[key]["labels"]])
        spans.append(span)
    work["tasks"]["truthfulqa"] = {"pairs": pairs, "spans": spans}
    pairs, spans = [], []
    for rec in hhh_recs:
        ctx = hhh_mod.harness_context(rec)
        a = len(pairs)
        pairs += [(ctx, " " + r) for r in rec["target_scores"]]
        spans.append([a, len(pairs), list(rec["target_scores"].values()), rec["subset"]])
    work["tasks"]["hhh"] = {"pairs": pairs, "spans": spans}
    for t in work["tasks"].values():
        t["ids"] = [encode_pair(tok, c, x) for c, x in t["pairs"]]
    return work


def metrics(work: dict, lls: dict) -> dict:
    from dromedary_jax.eval.truthfulqa import mc1_score, mc2_score

    t, ll = work["tasks"]["truthfulqa"], lls["truthfulqa"]
    mc1 = [mc1_score(ll[a:b], lab) for (a, b, lab), _ in t["spans"]]
    mc2 = [mc2_score(ll[a:b], lab) for _, (a, b, lab) in t["spans"]]
    h, ll = work["tasks"]["hhh"], lls["hhh"]
    grades = {}
    for a, b, scores, subset in h["spans"]:
        grades.setdefault(subset, []).append(float(scores[int(np.argmax(ll[a:b]))] == max(scores)))
    out = {"mc1": float(np.mean(mc1)), "mc2": float(np.mean(mc2))}
    out.update({f"hhh/{s}": float(np.mean(v)) for s, v in sorted(grades.items())})
    out["hhh/overall"] = float(np.mean([g for v in grades.values() for g in v]))
    return out


# ----------------------------------------------------------------------------- the two sides
def side_ours(work: dict, gguf: str, args) -> dict:
    import dromedary_jax as dj
    from dromedary_jax.eval import loglikelihoods

    t0 = time.perf_counter()
    model = dj.load_model(gguf)
    t1 = time.perf_counter()
    lls = {name: [ll for ll, _ in loglikelihoods(model, t["ids"], batch_tokens=args.batch_tokens,
                                                 row_length=args.row_length)]
           for name, t in work["tasks"].items()}
    return {"load_s": t1 - t0, "score_s": time.perf_counter() - t1, "lls": lls}


def hf_loglikelihoods(model, reqs, batch_tokens: int) -> list[float]:
    """Identical pairs are scored once (as ours does); each distinct pair is one row."""
    import torch

    first: dict = {}
    for i, (c, x) in enumerate(reqs):
        first.setdefault((tuple(c), tuple(x)), i)
    order = sorted(set(first.values()), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    out = [0.0] * len(reqs)
    s = 0
    with torch.inference_mode():
        while s < len(order):
            T = len(reqs[order[s]][0]) + len(reqs[order[s]][1]) - 1
            idx = order[s:s + max(1, batch_tokens // T)]
            s += len(idx)
            ids = torch.zeros((len(idx), T), dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for j, i in enumerate(idx):
                row = (list(reqs[i][0]) + list(reqs[i][1]))[:-1]
                ids[j, :len(row)] = torch.tensor(row)
                mask[j, :len(row)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            for j, i in enumerate(idx):
                ctx, cont = reqs[i]
                sl = logits[j, len(ctx) - 1:len(ctx) + len(cont) - 1].float()
                lp = torch.log_softmax(sl, -1)
                out[i] = float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())
            del logits
    return [out[first[(tuple(c), tuple(x))]] for c, x in reqs]


def side_hf(work: dict, gguf: str, args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    folder, name = os.path.split(os.path.abspath(gguf))
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()
    t1 = time.perf_counter()
    lls = {n: hf_loglikelihoods(model, t["ids"], args.hf_batch_tokens)
           for n, t in work["tasks"].items()}
    t2 = time.perf_counter()
    # The harness's own tokenization (HF tokenizer, _encode_pair) of the same strings.
    tk = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    differ = 0
    for t in work["tasks"].values():
        for (c, x), ids in zip(t["pairs"], t["ids"]):
            whole, ctx = tk.encode(c + x), tk.encode(c)
            differ += [ctx, whole[len(ctx):]] != [list(ids[0]), list(ids[1])]
    return {"load_s": t1 - t0, "score_s": t2 - t1, "lls": lls, "tokenizer_differs": differ}


def run_side(side: str, work_path: str, args) -> dict:
    with open(work_path) as f:
        work = json.load(f)
    res = (side_ours if side == "ours" else side_hf)(work, args.gguf, args)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="SmolLM2 GGUF (default: fetched into the cache)")
    ap.add_argument("--bigbench", help="folder holding truthful_qa/ and hhh_alignment/ "
                                       "(default: fetched into the cache)")
    ap.add_argument("--questions", type=int, default=0, help="TruthfulQA questions (0: all)")
    ap.add_argument("--hhh", type=int, default=0, help="HHH examples (0: all)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="ours: tokens per step")
    ap.add_argument("--row-length", type=int, default=512, help="ours: packed row length")
    ap.add_argument("--hf-batch-tokens", type=int, default=2048,
                    help="transformers: padded tokens per batch")
    ap.add_argument("--sides", default="ours,hf", help="which sides to run, in order")
    ap.add_argument("--side", choices=("ours", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:  # a child: score and write the result file
        res = run_side(args.side, args.work, args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return

    from dromedary_jax import fetch

    gguf = args.gguf or fetch.smollm2_gguf()
    if args.bigbench:
        questions_json = os.path.join(args.bigbench, "truthful_qa", "questions.json")
        hhh_dir = os.path.join(args.bigbench, "hhh_alignment")
    else:
        questions_json, hhh_dir = fetch.bigbench_paths()
    work = build_work(gguf, questions_json, hhh_dir, args.questions, args.hhh)
    n_pairs = sum(len(t["ids"]) for t in work["tasks"].values())
    n_tok = sum(len(c) + len(x) - 1 for t in work["tasks"].values() for c, x in t["ids"])
    n_q = {k: len(t["spans"]) for k, t in work["tasks"].items()}
    print(f"model: {os.path.basename(gguf)} (dequantized to float32 by both sides); "
          f"{n_q['truthfulqa']} TruthfulQA questions + {n_q['hhh']} HHH examples, {n_pairs} "
          f"(context, continuation) pairs, {n_tok} tokens as one pair per row; BOS: "
          f"{work['add_bos']} (the tokenizer's rule); {os.cpu_count()} cores", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work_path = os.path.join(tmp, "work.json")
        with open(work_path, "w") as f:
            json.dump(work, f)
        for side in args.sides.split(","):
            out = os.path.join(tmp, f"{side}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--work", work_path,
                   "--result", out, "--gguf", gguf, "--batch-tokens", str(args.batch_tokens),
                   "--row-length", str(args.row_length),
                   "--hf-batch-tokens", str(args.hf_batch_tokens)]
            peak = matmul_peak_flops(n=1024, repeats=3) / 1e9
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            with open(out) as f:
                results[side] = json.load(f)
            results[side]["wall_s"] = time.perf_counter() - t0
            results[side]["peak_gflops"] = peak
    names = {"hf": "transformers (torch)", "ours": "dromedary_jax"}
    print(f"{'side':22s} {'load s':>7s} {'score s':>8s} {'tok/s':>8s} {'peak RSS':>9s} "
          f"{'process s':>9s}  (XLA f32 matmul GFLOP/s measured just before: the machine's "
          f"load)")
    for side, r in results.items():
        print(f"{names[side]:22s} {r['load_s']:7.1f} {r['score_s']:8.1f} "
              f"{n_tok / r['score_s']:8.0f} {r['peak_rss_mb'] / 1024:7.2f} GiB "
              f"{r['wall_s']:9.1f}  ({r['peak_gflops']:.0f})")
    if len(results) == 2:
        h, o = results["hf"], results["ours"]
        diff = max(float(np.max(np.abs(np.subtract(h["lls"][k], o["lls"][k]))))
                   for k in work["tasks"])
        print(f"ratio (transformers score s / ours) = {h['score_s'] / o['score_s']:.2f}x; "
              f"max |loglik difference| = {diff:.2e}; pairs the HF tokenizer splits "
              f"differently: {h['tokenizer_differs']}")
    for side, r in results.items():
        m = metrics(work, r["lls"])
        print(f"{names[side]:22s} " + "  ".join(f"{k} {100 * v:.2f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
