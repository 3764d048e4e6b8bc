"""A tiny SentencePiece tokenizer trained on this project's own data/ files, for demos and CPU
smoke runs where no pretrained tokenizer can be downloaded (``model.tokenizer = "builtin:demo"``).
Byte fallback keeps every character encodable; training is single-threaded, so deterministic."""
from __future__ import annotations

import glob
import json
import os

from dromedary_jax.pipeline.data_files import REPO_ROOT

VOCAB_SIZE = 512  # = the "tiny" preset's vocab


def _corpus() -> list[str]:
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "data", "**", "*"), recursive=True)):
        if not os.path.isfile(path) or path.endswith(".md"):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".jsonl"):
            for row in (json.loads(x) for x in text.splitlines() if x.strip()):
                lines.extend(str(v) for v in _strings(row))
        else:
            lines.extend(text.splitlines())
    return [ln for ln in (x.strip() for x in lines) if ln]


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def ensure_demo_tokenizer(out_dir: str) -> str:
    """Path of ``<out_dir>/tokenizer.model``, training it first if it is not there."""
    import sentencepiece as spm

    path = os.path.join(out_dir, "tokenizer.model")
    if os.path.isfile(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = os.path.join(out_dir, f"tokenizer.tmp{os.getpid()}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=tmp_prefix, vocab_size=VOCAB_SIZE,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    os.replace(tmp_prefix + ".model", path)
    os.remove(tmp_prefix + ".vocab")
    return path
