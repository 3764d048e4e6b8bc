"""A stand-alone fine-tune of the randomly initialised "tiny" preset (a smoke test / demo).

    python -m dromedary_jax.train --config configs/sft_tiny.py --workdir DIR \\
        --config.data.train_files=RECORDS.jsonl --config.tokenizer=TOKENIZER.model

Records are JSON lines with "prompt" and "response". The tiny preset has 512 token ids, so the
tokenizer must have at most 512 (e.g. one trained like the tests' in tests/conftest.py); for a
real tokenizer, set --config.model.preset / --config.model.checkpoint to a model that matches it.
Any key can be overridden with ``--config.<section>.<key>=value``. The optional argument after
":" (``configs/sft_tiny.py:train=A.jsonl,tokenizer=T.model``) presets some keys for tests:
comma-separated key=value of train, eval (JSONL paths or globs, ";"-separated when several),
tokenizer, lora (0/1).
"""
from dromedary_jax.training.config import default_config


def _parse(arg: str) -> dict:
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def get_config(arg: str = ""):
    kw = _parse(arg)
    c = default_config()
    c.model.preset = "tiny"
    c.model.checkpoint = ""  # empty: random init of the preset (see dromedary_jax/train.py)
    c.tokenizer = kw.get("tokenizer", "")
    c.data.train_files = kw.get("train", "").replace(";", ",")
    c.data.eval_files = kw.get("eval", "").replace(";", ",")
    c.data.max_len = 256
    c.data.num_epochs = 3
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 10
    c.train.schedule = "cosine"
    c.lora.enabled = kw.get("lora", "0") == "1"
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("wq", "wk", "wv", "wo")
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    c.eval.every_steps = 50
    c.metrics.log_every = 10
    c.mesh.shape = (1, -1, 1)
    c.export.format = "checkpoint"
    return c
