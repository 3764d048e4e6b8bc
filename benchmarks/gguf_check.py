"""Opt-in check of GGUF import on a real file: dromedary_jax vs transformers, same GGUF.

    python benchmarks/gguf_check.py [/path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
    DROMEDARY_JAX_SMOLLM2=/path/to/file.gguf python benchmarks/gguf_check.py

Checks (prints the numbers; exits 1 on a mismatch, 0 with "skipped" when there is no file):
1. token ids of ``dj.load_tokenizer(gguf)`` == transformers' GGUF tokenizer (its defaults, so the
   BOS rule is compared too) on varied strings (whitespace runs, code, emoji, CJK, Arabic,
   digits, special tokens), and decode(encode(text)) == text;
2. ``dj.logits`` of ``dj.load_model(gguf)`` vs transformers' ``from_pretrained(folder,
   gguf_file=...)`` (float32), max abs difference over several real sentences <= --tol (1e-4),
   or, where it is above, no more than the two sides' float32 rounding noise that check 4
   measures against a float64 forward (two float32 forwards cannot be promised closer);
3. greedy generation of 64 tokens: ``dj.generate`` == transformers ``generate(do_sample=False)``
   (a plain-text prompt with EOS off, and a chat prompt that may stop at EOS);
4. ``python -m dromedary_jax.convert --to hf`` of the file: transformers loads the folder's
   tokenizer (same ids, chat template carried) and weights (bit-identical to transformers' own
   GGUF import); a float64 forward of them shows each side's float32 noise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and    a run of four",
    "tabs\tand\nnewlines\n\n\nthree of them",
    "trailing spaces   ",
    " ",
    "",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "CJK: 漢字と仮名が混ざった日本語の文章です。中文句子。한국어 문장",
    "Arabic: مرحبا بالعالم، كيف حالك؟",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "Mixed ümlauts, café, naïve, façade, Ångström",
    "don't won't I'll we've they're it's",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "URL https://example.com/path?q=1&x=%20 and e-mail a.b@example.org",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, ∞ ≠ −1",
    "ALL CAPS SHOUTING AND MiXeD CaSe",
    "a\u00a0non-breaking space and zero\u200bwidth",
    "Русский текст и ελληνικά",
    "<|endoftext|> in the middle <|endoftext|>",
]
SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
]
PLAIN_PROMPT = "The history of the Roman Empire"
CHAT_PROMPT = ("<|im_start|>user\nGive me three tips for staying healthy.<|im_end|>\n"
               "<|im_start|>assistant\n")


def find_file(argv_path: str | None) -> str | None:
    path = argv_path or os.environ.get("DROMEDARY_JAX_SMOLLM2")
    if path and os.path.isdir(path):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        path = os.path.join(path, ggufs[0]) if ggufs else None
    return path if path and os.path.isfile(path) else None


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


def check_tokenizer(ours, ref, failures) -> None:
    bad = 0
    for text in TEXTS:
        a, b = ours.encode(text), ref(text)["input_ids"]
        if a != b:
            bad += 1
            failures.append(f"token ids differ on {text!r}: ours {a[:20]} transformers {b[:20]}")
        back = ours.decode(ours.encode(text, bos=False))
        if "<|" not in text and back != text:
            failures.append(f"decode(encode({text!r})) = {back!r}")
    print(f"tokenizer: {len(TEXTS) - bad}/{len(TEXTS)} strings give identical ids "
          f"(add_bos={ours.add_bos}, bos_id={ours.bos_id}, eos_id={ours.eos_id})")


def check_logits(model, ref, tok, tol, failures) -> dict:
    """Per sentence: (ids, our logits, transformers' logits)."""
    import dromedary_jax as dj

    worst, out = 0.0, {}
    for text in SENTENCES:
        ids = tok.encode(text)
        ours = np.asarray(dj.logits(model, [ids]))[0]
        theirs = hf_logits(ref, ids)
        out[text] = (ids, ours, theirs)
        d = float(np.abs(ours - theirs).max())
        worst = max(worst, d)
        agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
        print(f"  {len(ids):3d} tokens: max |diff| {d:.2e} (logit scale "
              f"{np.abs(theirs).max():.1f}), argmax agreement {agree:.0%}")
    print(f"logits: max |diff| over {len(SENTENCES)} sentences = {worst:.2e} (tol {tol:g}: "
          f"{'met' if worst <= tol else 'NOT met'})")
    return out


def check_generation(model, ref, tok, n, failures) -> None:
    import torch

    import dromedary_jax as dj

    for name, prompt, eos in (("plain, EOS off", PLAIN_PROMPT, False),
                              ("chat, EOS on", CHAT_PROMPT, True)):
        ids = tok.encode(prompt)
        t0 = time.perf_counter()
        ours = dj.generate(model, [ids], max_new_tokens=n, temperature=0.0,
                           eos_id=tok.eos_id if eos else -1)[0]
        t1 = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                               dtype=torch.long),
                               max_new_tokens=n, do_sample=False, min_new_tokens=0,
                               eos_token_id=tok.eos_id if eos else None,
                               pad_token_id=tok.pad_id)
        t2 = time.perf_counter()
        theirs = out[0, len(ids):].tolist()
        if eos and theirs and theirs[-1] == tok.eos_id:
            theirs = theirs[:-1]  # dj.generate returns the tokens before EOS
        same = ours == theirs
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
        print(f"generate ({name}): {len(ours)} vs {len(theirs)} tokens, identical={same} "
              f"(ours {t1 - t0:.1f}s incl. compile, transformers {t2 - t1:.1f}s)")
        print(f"  text: {tok.decode(ours)[:160]!r}")
        if not same:
            failures.append(f"greedy generation ({name}) differs from token {first}")


def check_export(path, ref, tok, logits, tol, failures) -> float | None:
    """convert --to hf, then transformers loads that folder (model + tokenizer). The folder's
    weights are a lossless reshape of ours, so comparing them with transformers' GGUF import
    compares the two dequantize + un-permute paths exactly; a float64 copy of the folder gives
    the float32 noise floor of both forwards. Returns that floor (the sum of both sides' max
    distance to the float64 logits), or None when the export failed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "hf")
        r = subprocess.run([sys.executable, "-m", "dromedary_jax.convert", "--src", path,
                            "--dst", dst, "--to", "hf"], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"convert --to hf failed: {r.stderr.strip()[-300:]}")
            return
        ref_tok = AutoTokenizer.from_pretrained(dst)
        bad = [t for t in TEXTS if tok.encode(t) != ref_tok(t)["input_ids"]]
        print(f"convert --to hf: transformers' tokenizer from the folder matches on "
              f"{len(TEXTS) - len(bad)}/{len(TEXTS)} strings, chat_template carried: "
              f"{bool(getattr(ref_tok, 'chat_template', None))}")
        if bad:
            failures.append(f"exported tokenizer differs on {bad[:3]}")
        exported = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
        a, b = ref.state_dict(), exported.state_dict()
        wdiff = max(float((a[k] - b[k]).abs().max()) for k in b if k in a)
        print(f"  weights: ours (exported) vs transformers' GGUF import: max |diff| {wdiff:g} "
              f"over {len(b)} tensors")
        if wdiff != 0.0:
            failures.append(f"dequantized weights differ from transformers' by {wdiff:g}")
        del exported
        f64 = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float64).eval()
        e_ours = e_theirs = 0.0
        for ids, ours, theirs in logits.values():
            with torch.no_grad():
                exact = f64(torch.tensor([ids])).logits[0].numpy()
            e_ours = max(e_ours, float(np.abs(ours - exact).max()))
            e_theirs = max(e_theirs, float(np.abs(theirs - exact).max()))
        print(f"  float32 noise vs a float64 forward of the same weights: dromedary_jax "
              f"{e_ours:.2e}, transformers {e_theirs:.2e}")
        return e_ours + e_theirs
    return None


def judge_logits(logits, tol, noise, failures) -> None:
    """A difference above ``tol`` fails unless the float64 forward shows it is float32 rounding:
    two float32 forwards can differ by up to the sum of their distances to the exact result
    (``noise``), and no less than that can be promised. Without ``noise`` (--no-export): tol."""
    worst = max(float(np.abs(ours - theirs).max()) for _, ours, theirs in logits.values())
    if worst <= tol:
        return
    if noise is not None and worst <= noise:
        print(f"logits: {worst:.2e} > tol {tol:g}, but within the two sides' float32 rounding "
              f"noise ({noise:.2e} = the sum of their distances to a float64 forward)")
        return
    failures.append(f"logits differ by {worst:.2e} > {tol:g}"
                    + (f" and > the float32 noise floor {noise:.2e}" if noise is not None else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", help="the .gguf file (default: $DROMEDARY_JAX_SMOLLM2)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-export", action="store_true", help="skip the convert --to hf check")
    args = ap.parse_args()
    path = find_file(args.path)
    if path is None:
        print("skipped: no GGUF file (pass its path or set DROMEDARY_JAX_SMOLLM2)")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dromedary_jax as dj

    folder, name = os.path.split(os.path.abspath(path))
    failures: list[str] = []
    t0 = time.perf_counter()
    tok = dj.load_tokenizer(path)
    model = dj.load_model(path)
    t1 = time.perf_counter()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    t2 = time.perf_counter()
    c = model.config
    print(f"{name}: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/"
          f"{c.num_kv_heads}, vocab {c.vocab_size}, tied={c.tie_embeddings}, theta "
          f"{c.rope_theta:g}; load: dromedary_jax {t1 - t0:.1f}s, transformers {t2 - t1:.1f}s")
    check_tokenizer(tok, ref_tok, failures)
    logits = check_logits(model, ref, tok, args.tol, failures)
    check_generation(model, ref, tok, args.new_tokens, failures)
    noise = None if args.no_export else check_export(path, ref, tok, logits, args.tol, failures)
    judge_logits(logits, args.tol, noise, failures)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
