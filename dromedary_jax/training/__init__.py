"""Supervised fine-tuning: data (masks, packing, ArrayRecord loader), optimizer, LoRA, the pure
train step and the checkpointed training loop.

    from dromedary_jax import training
    result = training.run_sft(cfg, model, tokenizer, train_files, workdir, eval_files=None)
    result.params / result.model   # final weights (LoRA merged in)

``python -m dromedary_jax.train --config configs/sft_tiny.py --workdir DIR
--config.data.train_files=RECORDS.jsonl --config.tokenizer=TOKENIZER.model`` runs the same from
the command line. The loop module (and JAX) are imported on first use.
"""
import importlib

_API = {
    "run_sft": "dromedary_jax.training.loop",
    "TrainResult": "dromedary_jax.training.loop",
    "prepare_data": "dromedary_jax.training.loop",
    "default_config": "dromedary_jax.training.config",
    "with_defaults": "dromedary_jax.training.config",
    "merge_lora": "dromedary_jax.training.lora",
    "init_lora": "dromedary_jax.training.lora",
    "read_metrics": "dromedary_jax.training.metrics",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dromedary_jax.training' has no attribute {name!r}")
