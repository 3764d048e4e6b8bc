"""The sampler's CPU decode path: one decoder pass over per-layer (unstacked) weights.

The sampler's prefill, and its decode on TPU/GPU, run ``llama.forward`` itself with a per-row KV
cache (and, for a shared prefix, its ``prefix`` argument: ONE copy of the prefix keys that every
row attends). On CPU, XLA copies each layer's weights out of the stacked ``[L, ...]`` arrays at
every step of a scanned decode loop, and attention over a ``[B, S, KV, hd]`` cache transposes it
first. ``decode`` on CPU therefore slices the layer weights ONCE per call (:func:`unstack_layers`,
fusing q/k/v and gate/up into single matmuls while it copies anyway) and keeps each layer's cache
as ``[B, KV, S, hd]`` inside its loop (:func:`split_cache` / :func:`merge_cache`). That holds a
second copy of the layer weights during decoding, so it is used on CPU only (~1.4x faster at
batch 1 on the 50M benchmark model).

Same masking rule and building blocks as the model (``rms_norm``, ``matmul``, RoPE, ``unembed``);
no LoRA/dropout (sampling runs on merged weights). Tests check it against ``llama.forward`` and
transformers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dromedary_jax import sharding as shd
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.attention import attend_cached
from dromedary_jax.model.llama import (cache_step_mask, embed_tokens, matmul, prefix_mask,
                                       rms_norm, unembed)
from dromedary_jax.model.rope import apply_rope, inverse_frequencies, rope_tables


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] (float32 accumulation, like ``llama.matmul``)."""
    return matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


# From this many rows on, the decode step's output projection reads a [V, D] (vocab-major) copy
# of lm_head: XLA:CPU runs [B, D] x [V, D]^T ~1.5x faster than [B, D] x [D, V] at batch 8-32
# (slightly slower at batch 1).
VOCAB_MAJOR_MIN_BATCH = 4


def unstack_layers(params, config: ModelConfig, prefix=None, batch: int = 1) -> dict:
    """The layer weights of the CPU decode path, made once inside the jit'ed decode before its
    loop: ``{"layers": [per-layer dict]}``. Since this copies anyway, the projections become 2-D
    matrices with q/k/v and gate/up fused (fewer, larger matmuls per step): ``wqkv``
    [D, (H+2KV)*hd], ``wo`` [H*hd, D], ``w_gate_up`` [D, 2F], ``w_down`` [F, D]. With ``prefix``,
    each layer dict also holds its shared-prefix k/v as ``prefix_k``/``prefix_v`` [KV, P, hd].
    From ``VOCAB_MAJOR_MIN_BATCH`` rows on, ``unembed_vd`` is the output projection as [V, D]
    (the embedding itself when tied)."""
    c = config
    D = c.hidden_size
    layers = []
    for i in range(c.num_layers):
        qkv = jnp.concatenate([params["wq"][i], params["wk"][i], params["wv"][i]], axis=1)
        d = {"attn_norm": params["attn_norm"][i], "mlp_norm": params["mlp_norm"][i],
             "wqkv": qkv.reshape(D, -1), "wo": params["wo"][i].reshape(-1, D),
             "w_gate_up": jnp.concatenate([params["w_gate"][i], params["w_up"][i]], axis=1),
             "w_down": params["w_down"][i]}
        if prefix is not None:  # [1, P, KV, hd] -> [KV, P, hd]
            d["prefix_k"] = jnp.swapaxes(prefix["k"][i, 0], 0, 1)
            d["prefix_v"] = jnp.swapaxes(prefix["v"][i, 0], 0, 1)
        layers.append(d)
    out = {"layers": layers}
    if batch >= VOCAB_MAJOR_MIN_BATCH:
        out["unembed_vd"] = params["embed"] if c.tie_embeddings else params["lm_head"].T
    return jax.lax.optimization_barrier(out)  # keep the copies out of the loop


# ----------------------------------------------------------------------------- CPU decode path
def split_cache(cache, config: ModelConfig):
    """[L, B, S, KV, hd] cache -> per-layer (k, v) in [B, KV, S, hd] (attention needs no
    transpose in that layout), plus pos/seg."""
    layers = [(jnp.swapaxes(cache["k"][i], 1, 2), jnp.swapaxes(cache["v"][i], 1, 2))
              for i in range(config.num_layers)]
    return {"layers": layers, "pos": cache["pos"], "seg": cache["seg"]}


def merge_cache(cache):
    """Inverse of :func:`split_cache`."""
    return {"k": jnp.stack([jnp.swapaxes(k, 1, 2) for k, _ in cache["layers"]]),
            "v": jnp.stack([jnp.swapaxes(v, 1, 2) for _, v in cache["layers"]]),
            "pos": cache["pos"], "seg": cache["seg"]}


def forward_unstacked(params, weights, config: ModelConfig, tokens, *, positions, segment_ids,
                      cache, cache_index, prefix=None, mesh=None):
    """One decoder pass over :func:`unstack_layers` ``weights`` (``params`` gives the embedding,
    final norm and lm_head) and a :func:`split_cache` cache (written at ``cache_index``), attending
    ``prefix`` (pos/seg [1, P]; its k/v are in ``weights``) when given. Returns (logits float32
    [B, T, V], new split cache)."""
    c = config
    dtype = jnp.dtype(c.dtype)
    B, T = tokens.shape
    H, KV = c.num_heads, c.num_kv_heads
    positions = positions.astype(jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    x = embed_tokens(params, tokens, dtype, mesh)
    cos, sin = rope_tables(positions, inverse_frequencies(c))
    idx, kv_pos, kv_seg, mask = cache_step_mask(positions, segment_ids, cache, cache_index)
    pmask = None if prefix is None else prefix_mask(positions, segment_ids, prefix)
    new_layers = []
    hd = c.head_dim
    for p, (ck, cv) in zip(weights["layers"], cache["layers"]):
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        qkv = _matmul(h, p["wqkv"]).reshape(B, T, H + 2 * KV, hd)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + KV], qkv[:, :, H + KV:]
        q = shd.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None), mesh)
        k = apply_rope(k, cos, sin)
        ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2).astype(ck.dtype),
                                          (0, 0, idx, 0))
        cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype),
                                          (0, 0, idx, 0))
        ck = shd.constrain(ck, ("batch", "act_kv_heads", None, None), mesh)
        cv = shd.constrain(cv, ("batch", "act_kv_heads", None, None), mesh)
        new_layers.append((ck, cv))
        pk, pv = p.get("prefix_k"), p.get("prefix_v")
        o = attend_cached(q, ck.astype(dtype), cv.astype(dtype), mask,
                          None if pk is None else pk.astype(dtype),
                          None if pv is None else pv.astype(dtype), pmask, kv_major=True)
        x = x + _matmul(o.reshape(B, T, H * hd), p["wo"])
        x = shd.constrain(x, ("batch", "length", "act_embed"), mesh)
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
        gu = _matmul(h, p["w_gate_up"])
        F = c.intermediate_size
        a = shd.constrain(jax.nn.silu(gu[..., :F]) * gu[..., F:], ("batch", "length", "act_mlp"),
                          mesh)
        x = x + _matmul(a, p["w_down"])
        x = shd.constrain(x, ("batch", "length", "act_embed"), mesh)
    return final_logits(params, weights, config, x, mesh), {"layers": new_layers, "pos": kv_pos,
                                                           "seg": kv_seg}


def final_logits(params, weights, config, x, mesh=None):
    """The last layer's output x [B, T, D] -> float32 logits [B, T, V]: the final RMSNorm, then
    the output projection (``weights["unembed_vd"]``, the [V, D] table of
    :func:`unstack_layers`, when it is there; else ``llama.unembed``)."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if "unembed_vd" not in weights:
        return unembed(params, config, x, mesh)
    w = weights["unembed_vd"]
    logits = jnp.einsum("btd,vd->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return shd.constrain(logits, ("batch", "length", "act_vocab"), mesh)
