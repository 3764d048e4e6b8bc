"""Supervised fine-tuning: data (masks, packing, ArrayRecord loader), optimizer, LoRA, the pure
train step and the checkpointed training loop.

    from dromedary_jax import training
    result = training.run_sft(cfg, model, tokenizer, train_files, workdir, eval_files=None)
    result.params / result.model   # final weights (LoRA merged in)

``python -m dromedary_jax.train --config configs/sft_tiny.py --workdir DIR
--config.data.train_files=RECORDS.jsonl --config.tokenizer=TOKENIZER.model`` runs the same from
the command line. The loop module (and JAX) are imported on first use.
"""
from dromedary_jax.lazy_names import lazy_names

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

__getattr__, __dir__, __all__ = lazy_names(__name__, _API)
