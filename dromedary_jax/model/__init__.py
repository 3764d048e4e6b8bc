"""LLaMA-family model: config and presets, Flax NNX module, pure forward pass, RoPE.

Names are imported lazily (``dromedary_jax.model.config`` needs no JAX, so the CLIs' config
checks start fast; ``Llama`` and the forward pass import JAX and Flax on first use)."""
from dromedary_jax.lazy_names import lazy_names

_NAMES = {
    "PRESETS": "dromedary_jax.model.config", "ModelConfig": "dromedary_jax.model.config",
    "RopeScaling": "dromedary_jax.model.config", "preset": "dromedary_jax.model.config",
    "Llama": "dromedary_jax.model.llama", "forward": "dromedary_jax.model.llama",
    "init_cache": "dromedary_jax.model.llama", "init_params": "dromedary_jax.model.llama",
    "logits": "dromedary_jax.model.llama", "param_axes": "dromedary_jax.model.llama",
    "param_shapes": "dromedary_jax.model.llama",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _NAMES)
