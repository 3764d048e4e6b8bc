"""LLaMA-family model: config and presets, Flax NNX module, pure forward pass, RoPE.

Names are imported lazily (``dromedary_jax.model.config`` needs no JAX, so the CLIs' config
checks start fast; ``Llama`` and the forward pass import JAX and Flax on first use)."""
import importlib

_NAMES = {
    "PRESETS": "dromedary_jax.model.config", "ModelConfig": "dromedary_jax.model.config",
    "RopeScaling": "dromedary_jax.model.config", "preset": "dromedary_jax.model.config",
    "Llama": "dromedary_jax.model.llama", "forward": "dromedary_jax.model.llama",
    "init_cache": "dromedary_jax.model.llama", "init_params": "dromedary_jax.model.llama",
    "logits": "dromedary_jax.model.llama", "param_axes": "dromedary_jax.model.llama",
    "param_shapes": "dromedary_jax.model.llama",
}

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'dromedary_jax.model' has no attribute {name!r}")
