"""dromedary_jax: SELF-ALIGN (Dromedary, arXiv 2305.03047) in JAX/Flax.

Public API (stable; outside code calls exactly these):

    import dromedary_jax as dj
    model = dj.load_model(path, dtype="float32")   # HF folder, Meta folder, or our checkpoint
    dj.logits(model, input_ids)                     # int32 [B, T] -> float32 numpy [B, T, V]
    dj.save_hf(model, out_dir); dj.save_checkpoint(model, out_dir)
    dj.save_peft_adapter(lora, model.config, out_dir, alpha=16.0)  # LoRA adapters as a PEFT folder
    tok = dj.load_tokenizer(path)
    dj.generate(model, prompt_ids, max_new_tokens=...)
    dj.generate_text(model, tok, prompts, max_new_tokens=...)
    dj.eval.truthfulqa_mc(...), dj.eval.hhh(...)

Names are imported lazily so ``import dromedary_jax`` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "dromedary_jax.checkpoint",
    "save_hf": "dromedary_jax.checkpoint",
    "save_checkpoint": "dromedary_jax.checkpoint",
    "save_peft_adapter": "dromedary_jax.checkpoint.peft_export",
    "logits": "dromedary_jax.model.llama",
    "Llama": "dromedary_jax.model.llama",
    "ModelConfig": "dromedary_jax.model.config",
    "preset": "dromedary_jax.model.config",
    "load_tokenizer": "dromedary_jax.tokenizer",
    "make_mesh": "dromedary_jax.sharding",
    "generate": "dromedary_jax.sampling",
    "generate_text": "dromedary_jax.sampling",
    "SamplingSettings": "dromedary_jax.sampling.settings",
    "UserError": "dromedary_jax.errors",
}
_SUBMODULES = ("eval",)

__all__ = sorted(_API) + list(_SUBMODULES)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"dromedary_jax.{name}")
    raise AttributeError(f"module 'dromedary_jax' has no attribute {name!r}")


def __dir__():
    return __all__
