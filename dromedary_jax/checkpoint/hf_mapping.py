"""Name and layout mapping between Hugging Face LlamaForCausalLM tensors and our flat params.

HF stores each projection as a torch Linear weight [out, in]; we store [in..., out...] with
heads split out (wq [L, D, H, hd], wo [L, H, hd, D], ...). Both use the same q/k row order
(HF's rotate_half layout), so no RoPE permutation is needed here; Meta checkpoints are permuted
into this layout by ``checkpoint/meta.py``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.llama import param_shapes

# our name -> (HF per-layer suffix or global name, per-layer?)
_LAYER_HF = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_GLOBAL_HF = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}


def hf_layer_key(i: int, name: str) -> str:
    """The HF tensor name of layer ``i`` of our per-layer parameter ``name``, e.g.
    ``model.layers.3.self_attn.q_proj.weight`` for ``(3, "wq")``; KeyError for a global name."""
    return f"model.layers.{i}.{_LAYER_HF[name]}"


def hf_to_ours(name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """One HF tensor (one layer for per-layer names) -> our layout (without the layers axis)."""
    D, H, KV, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    if name == "wq":
        return w.reshape(H, hd, D).transpose(2, 0, 1)
    if name in ("wk", "wv"):
        return w.reshape(KV, hd, D).transpose(2, 0, 1)
    if name == "wo":
        return w.reshape(D, H, hd).transpose(1, 2, 0)
    if name in ("w_gate", "w_up", "w_down", "lm_head"):
        return w.T
    return w


def ours_to_hf(name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """Inverse of :func:`hf_to_ours` for one (per-layer) tensor."""
    D, H, KV, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    if name == "wq":
        return w.transpose(1, 2, 0).reshape(H * hd, D)
    if name in ("wk", "wv"):
        return w.transpose(1, 2, 0).reshape(KV * hd, D)
    if name == "wo":
        return w.transpose(2, 0, 1).reshape(D, H * hd)
    if name in ("w_gate", "w_up", "w_down", "lm_head"):
        return w.T
    return w


def params_from_hf_tensors(get: Callable[[str], np.ndarray], c: ModelConfig,
                           names=None) -> dict[str, np.ndarray]:
    """Build our params (numpy, float32) by calling ``get(hf_key)`` for each needed tensor."""
    shapes = param_shapes(c)
    out = {}
    for name in names or shapes:
        if name in _LAYER_HF:
            out[name] = np.stack([hf_to_ours(name, np.asarray(get(hf_layer_key(i, name)),
                                                              np.float32), c)
                                  for i in range(c.num_layers)])
        else:
            out[name] = hf_to_ours(name, np.asarray(get(_GLOBAL_HF[name]), np.float32), c)
    return out


def hf_tensors_from_params(params: Mapping[str, np.ndarray], c: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (numpy)."""
    out = {}
    for name, w in params.items():
        w = np.asarray(w)
        if name in _LAYER_HF:
            for i in range(c.num_layers):
                out[hf_layer_key(i, name)] = np.ascontiguousarray(ours_to_hf(name, w[i], c))
        else:
            out[_GLOBAL_HF[name]] = np.ascontiguousarray(ours_to_hf(name, w, c))
    return out
