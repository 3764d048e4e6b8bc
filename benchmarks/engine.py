"""Continuous-batching engine vs static batching on a real workload (issue 15).

    python benchmarks/engine.py [--quick] [--stage 2|1] [--batch 16] [--max-new 256]
    python benchmarks/engine.py --build-workloads [--run-dir /tmp/real_run]

Workloads (``benchmarks/workloads/smollm2_stage{1,2}.jsonl``) come from a REAL SmolLM2-135M
pipeline run: line 1 is a header (stage, shared prefix text, stop strings, the run's sampling
settings), then one line per prompt with the prompt text and what the model generated in that
run (``generated``, its token count ``generated_tokens``). Stage 2 (self_align): the principle
prompt is the shared prefix and the prompts are the per-question frames; stage 1
(self_instruct questions): the long question-writing prompts, no shared prefix.

Both engines run in ONE process on the same prompts at the same batch size (= decode slots),
greedy, ``--max-new`` new tokens, with the stage's stop strings: SmolLM2-135M-Instruct from the
GGUF (``~/.cache/dromedary_jax/smollm2``; skipped with a message when absent). Printed per
engine: compile time (``compile_only``), wall time, generated tokens/s, slot-steps and the ideal
(tokens / slot-steps: 1.0 would be no idle slot), and whether the texts are identical. Wall time
on a shared 2-core box is noisy: run it twice. About 10 minutes on an idle 2-core machine
(``--quick``: 12 prompts, 8 slots, 96 new tokens, about 2 minutes).

``--peers`` adds, in the same process on the same prompts (the shared prefix joined to each
prompt: transformers has no shared-prefix cache), greedy, same max new tokens and stop strings:
transformers ``generate`` in static batches of the same size (left padding, ``stop_strings``)
and transformers' continuous batching ``generate_batch`` (same number of slots as
``max_batch_tokens`` allows; stop strings cut afterwards), both float32 on torch CPU threads.
Ratios: our continuous engine vs each. ``--profile DIR`` writes a ``jax.profiler`` trace of one
decode chunk of ours and prints the decode step's time against its FLOP roofline
(``--peak-gflops``: this machine's float32 matmul peak, measured with a large matmul when 0).
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = os.path.join(HERE, "workloads")
GGUF = os.path.expanduser("~/.cache/dromedary_jax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_workloads(run_dir: str, gguf: str) -> list[str]:
    """Write the stage-1 and stage-2 workload files from a real run's records; returns paths."""
    from dromedary_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf) if os.path.exists(gguf) else None

    def ntok(text):
        return None if tok is None else len(tok.encode(text, bos=False))

    os.makedirs(WORKLOADS, exist_ok=True)
    out = []
    # stage 2: self_align responses behind the principle prefix
    sa = os.path.join(run_dir, "self_align")
    cfg = _read_json(os.path.join(sa, "config.json"))["fingerprint"]["self_align"]
    rows = [r for p in sorted(glob.glob(os.path.join(sa, "responses-*.jsonl")))
            for r in _read_jsonl(p)]
    prefix_id = rows[0]["prefix_id"]
    with open(os.path.join(sa, f"prefix-{prefix_id}.txt"), encoding="utf-8") as f:
        prefix = f.read()
    header = {"stage": 2, "source": "self_align", "shared_prefix": prefix, "stop": cfg["stop"],
              "run_settings": {k: cfg[k] for k in ("temperature", "top_p", "max_new_tokens")}}
    path = os.path.join(WORKLOADS, "smollm2_stage2.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for r in rows:
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "generated": r["raw"],
                                "generated_tokens": ntok(r["raw"])}) + "\n")
    out.append(path)
    # stage 1: self_instruct question prompts (no shared prefix, the run stopped at max_new)
    si = os.path.join(run_dir, "self_instruct")
    cfg = _read_json(os.path.join(si, "config.json"))["fingerprint"]["self_instruct"]
    rows = [r for p in sorted(glob.glob(os.path.join(si, "questions-*.jsonl")))
            for r in _read_jsonl(p)]
    qcfg = cfg["questions"]
    header = {"stage": 1, "source": "self_instruct questions", "shared_prefix": None,
              "stop": ["\n"],  # one_per_prompt: one request, the hint's own line
              "run_settings": {k: qcfg[k] for k in ("temperature", "top_p", "max_new_tokens")}}
    path = os.path.join(WORKLOADS, "smollm2_stage1.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for r in rows:
            gen = r.get("generation", "")
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "generated": gen,
                                "generated_tokens": ntok(gen)}) + "\n")
    out.append(path)
    return out


def run_side(model, tok, prompts, ids, header, engine, batch, max_new):
    """One engine over the workload: (texts, wall s, compile s, stats of the run)."""
    import dromedary_jax as dj
    from dromedary_jax.sampling import api

    kw = dict(max_new_tokens=max_new, temperature=0.0, stop=header["stop"],
              shared_prefix=header["shared_prefix"], ids=ids, batch_size=batch, progress=False,
              engine=engine)
    # compile: the programs this run needs (continuous: every refill shape it may need)
    st = {}
    captured = {}
    real = {"static": api.run_batches, "continuous": api.run_engine}[engine]

    def spy(*a, **k):
        k["stats"] = captured
        return real(*a, **k)

    name = "run_batches" if engine == "static" else "run_engine"
    setattr(api, name, spy)
    try:
        t0 = time.perf_counter()
        _compile(model, tok, prompts, kw, engine)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = dj.generate_text(model, tok, prompts, **kw)
        wall = time.perf_counter() - t0
    finally:
        setattr(api, name, real)
    st.update(captured)
    return texts, wall, compile_s, st


def _compile(model, tok, prompts, kw, engine):
    """Compile the generate_text call's programs without running it."""
    from dromedary_jax.sampling import api
    from dromedary_jax.sampling.text import encode_prompts

    prefix_ids, rows = encode_prompts(tok, prompts, kw["shared_prefix"])
    dj_kw = dict(max_new_tokens=kw["max_new_tokens"], eos_id=tok.eos_id,
                 shared_prefix=prefix_ids or None, batch_size=kw["batch_size"],
                 progress=False, engine=engine, compile_only=True)
    api.generate(model, rows, **dj_kw)


def _cut(text: str, stop) -> str:
    """The text before the first stop string."""
    cut = len(text)
    for s_ in stop or ():
        i = text.find(s_)
        if s_ and 0 <= i < cut:
            cut = i
    return text[:cut]


def peer_sides(gguf: str, prompts, header, batch: int, max_new: int) -> dict:
    """transformers generate (static batches) and generate_batch (continuous) on the joined
    prompts: {name: dict(texts, wall, useful tokens counted by our caller)}."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    folder, name = os.path.split(os.path.abspath(gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()
    tk = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tk.padding_side = "left"
    if tk.pad_token is None:
        tk.pad_token = tk.eos_token
    prefix = header["shared_prefix"] or ""
    full = [prefix + p for p in prompts]
    stop = header["stop"]
    out = {}
    gen_cfg = transformers.GenerationConfig(max_new_tokens=max_new, do_sample=False,
                                            eos_token_id=tk.eos_token_id, pad_token_id=tk.pad_token_id)
    stop_cfg = transformers.GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=tk.eos_token_id,
        pad_token_id=tk.pad_token_id, stop_strings=list(stop) or None)
    # static batches of `batch`, sorted by length like ours
    order = sorted(range(len(full)), key=lambda i: -len(full[i]))
    texts = [None] * len(full)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            enc = tk([full[i] for i in idx], return_tensors="pt", padding=True)
            gen = model.generate(**enc, generation_config=stop_cfg, tokenizer=tk)
            for j, i in enumerate(idx):
                texts[i] = _cut(tk.decode(gen[j, enc["input_ids"].shape[1]:], skip_special_tokens=True), stop)
    out["hf generate"] = dict(texts=texts, wall=time.perf_counter() - t0)
    # continuous batching (transformers >= 4.56: generate_batch)
    try:
        ids = [tk(p)["input_ids"] for p in full]
        t0 = time.perf_counter()
        with torch.inference_mode():
            res = model.generate_batch(inputs=ids, generation_config=gen_cfg, progress_bar=False)
        wall = time.perf_counter() - t0
        by_req = sorted(res.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
        texts = [_cut(tk.decode(r.generated_tokens, skip_special_tokens=True), stop) for r in by_req]
        out["hf generate_batch"] = dict(texts=texts, wall=wall)
    except Exception as e:  # not every version runs it on CPU: say so, do not fail the benchmark
        print(f"hf generate_batch: did not run on this machine ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]})", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="12 prompts, 8 slots, 96 new tokens")
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2))
    ap.add_argument("--batch", type=int, default=0, help="slots / batch size (default 16)")
    ap.add_argument("--max-new", type=int, default=0, help="default 256")
    ap.add_argument("--limit", type=int, default=0, help="use the first N prompts")
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument("--build-workloads", action="store_true")
    ap.add_argument("--run-dir", default="/tmp/real_run")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peers", action="store_true", help="also transformers generate / generate_batch")
    args = ap.parse_args()
    if args.build_workloads:
        for p in build_workloads(args.run_dir, args.gguf):
            print("wrote", p)
        return
    if not os.path.exists(args.gguf):
        print(f"SKIPPED: the SmolLM2 GGUF is not at {args.gguf} (fetch it with "
              "dromedary_jax.fetch.smollm2_gguf())")
        return
    path = os.path.join(WORKLOADS, f"smollm2_stage{args.stage}.jsonl")
    lines = _read_jsonl(path)
    header, rows = lines[0], lines[1:]
    batch = args.batch or (8 if args.quick else 16)
    max_new = args.max_new or (96 if args.quick else 256)
    limit = args.limit or (12 if args.quick else len(rows))
    rows = rows[:limit]
    prompts = [r["prompt"] for r in rows]
    ids = [r["id"] for r in rows]

    import jax

    import dromedary_jax as dj

    model = dj.load_model(args.gguf)
    tok = dj.load_tokenizer(args.gguf)
    print(f"workload: {os.path.basename(path)} ({len(prompts)} prompts, shared prefix "
          f"{len(tok.encode(header['shared_prefix'])) if header['shared_prefix'] else 0} tokens, "
          f"stop {header['stop']!r}); SmolLM2-135M (GGUF, float32) on "
          f"{jax.devices()[0].platform} x{len(jax.devices())}; greedy, max_new_tokens {max_new}, "
          f"batch/slots {batch}")
    res = {}
    for engine in ("static", "continuous"):
        texts, wall, comp, st = run_side(model, tok, prompts, ids, header, engine, batch, max_new)
        res[engine] = dict(texts=texts, wall=wall, compile=comp, **{
            k: v for k, v in st.items() if k in ("slot_steps", "tokens", "chunks", "refills",
                                                   "compactions")})
        r = res[engine]
        # useful tokens: those of the returned texts (before the stop string; both engines
        # also return a few tokens generated after it inside the last chunk)
        r["useful"] = sum(len(tok.encode(t, bos=False)) for t in texts)
        r["tok_s"] = r["useful"] / wall
        r["ideal"] = r["useful"] / max(r["slot_steps"], 1)
        extra = (f", {r['chunks']} chunks, {r['refills']} refills, {r['compactions']} tail "
                 "compactions" if engine == "continuous" else "")
        print(f"{engine:>10}: {r['useful']} tokens ({r['tokens']} generated) in {wall:.1f} s -> {r['tok_s']:.1f} tok/s; "
              f"compile {comp:.1f} s; slot-steps {r['slot_steps']}, ideal "
              f"{r['ideal']:.1%}{extra}", flush=True)
    s, c = res["static"], res["continuous"]
    same = s["texts"] == c["texts"]
    n_diff = sum(a != b for a, b in zip(s["texts"], c["texts"]))
    print(f"continuous / static: {c['tok_s'] / s['tok_s']:.2f}x tokens/s; slot-steps "
          f"{s['slot_steps'] / max(c['slot_steps'], 1):.2f}x fewer; texts identical: {same}"
          + ("" if same else f" ({n_diff} of {len(prompts)} differ)"))
    if args.peers:
        for name, r in peer_sides(args.gguf, prompts, header, batch, max_new).items():
            useful = sum(len(tok.encode(t, bos=False)) for t in r["texts"])
            tok_s = useful / r["wall"]
            agree = sum(a.strip() == b.strip() for a, b in zip(r["texts"], c["texts"]))
            print(f"{name:>10}: {useful} tokens in {r['wall']:.1f} s -> {tok_s:.1f} tok/s; "
                  f"texts equal to ours: {agree}/{len(prompts)}", flush=True)
            print(f"continuous / {name}: {c['tok_s'] / tok_s:.2f}x tokens/s", flush=True)
            res[name] = dict(wall=r["wall"], useful=useful, tok_s=tok_s, equal=agree)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {kk: vv for kk, vv in v.items() if kk != "texts"}
                       for k, v in res.items()}, f, indent=1)


if __name__ == "__main__":
    main()
