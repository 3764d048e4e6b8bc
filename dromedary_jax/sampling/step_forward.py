"""The sampler's CPU decode path: one single-token decoder pass over per-layer (unstacked),
transposed weights with feature-major activations.

The sampler's prefill, and its decode on TPU/GPU, run ``llama.forward`` itself with a per-row KV
cache (and, for a shared prefix, its ``prefix`` argument: ONE copy of the prefix keys that every
row attends). On CPU, XLA copies each layer's weights out of the stacked ``[L, ...]`` arrays at
every step of a scanned decode loop, and the decode step's small matmuls run well below the
machine's peak. The CPU decode therefore:

* slices the layer weights ONCE per call (:func:`unstack_layers`), fusing q/k/v and gate/up into
  single matmuls and transposing them while it copies anyway (a second copy of the layer weights
  is held during decoding, which is why it is CPU-only);
* keeps the residual stream feature-major, x_t [D, B], so each projection is ``w_t [N, K] @
  x_t [K, B]`` (:func:`decode_layers`): XLA:CPU runs that ~1.25x faster than ``x @ w`` at
  decode batch sizes, and the output projection reads the [V, D] embedding as it is;
* keeps each layer's cache as k [B, KV, hd, S], v [B, KV, S, hd] (:func:`split_cache` /
  :func:`merge_cache`; ``attend_cached``'s ``"keys_transposed"`` layout), so both attention dots
  are plain matmuls (the score dot ~2x faster than against [S, hd] keys).

On SmolLM2-135M at batch 32 these took the decode step from 2.7x to 1.7x its FLOP roofline
(``benchmarks/decode_roofline.py``). The static sampler (:func:`forward_unstacked`) and the
continuous engine (``engine._forward_rows``) run the same :func:`decode_layers`; they differ only
in where each row's new k/v is written.

Same masking rule, building blocks and float32 points as the model (RMSNorm, RoPE, SiLU-gated
MLP, float32-accumulated matmuls); no LoRA/dropout (sampling runs on merged weights). Tests
check it against ``llama.forward`` and transformers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dromedary_jax import sharding as shd
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.attention import attend_cached
from dromedary_jax.model.llama import cache_step_mask, embed_tokens, prefix_mask, rms_norm
from dromedary_jax.model.rope import inverse_frequencies, rope_tables, rotate_half


def unstack_layers(params, config: ModelConfig, prefix=None) -> dict:
    """The weights of the CPU decode path, made once per call (inside a jit, before the decode
    loop): ``{"layers": [per-layer dict], "unembed_vd": [V, D]}``. Since this copies anyway, the
    projections become 2-D matrices TRANSPOSED for :func:`decode_layers`' feature-major
    activations, with q/k/v and gate/up fused (fewer, larger matmuls per step): ``wqkv_t``
    [(H+2KV)*hd, D], ``wo_t`` [D, H*hd], ``w_gate_up_t`` [2F, D], ``w_down_t`` [D, F]. With
    ``prefix``, each layer dict also holds its shared-prefix k/v as ``prefix_k``/``prefix_v``
    [KV, P, hd]. ``unembed_vd`` is the output projection as [V, D] (the embedding itself when
    tied)."""
    c = config
    D = c.hidden_size
    layers = []
    for i in range(c.num_layers):
        qkv = jnp.concatenate([params["wq"][i], params["wk"][i], params["wv"][i]], axis=1)
        d = {"attn_norm": params["attn_norm"][i], "mlp_norm": params["mlp_norm"][i],
             "wqkv_t": qkv.reshape(D, -1).T, "wo_t": params["wo"][i].reshape(-1, D).T,
             "w_gate_up_t": jnp.concatenate([params["w_gate"][i], params["w_up"][i]], axis=1).T,
             "w_down_t": params["w_down"][i].T}
        if prefix is not None:  # [1, P, KV, hd] -> [KV, P, hd]
            d["prefix_k"] = jnp.swapaxes(prefix["k"][i, 0], 0, 1)
            d["prefix_v"] = jnp.swapaxes(prefix["v"][i, 0], 0, 1)
        layers.append(d)
    out = {"layers": layers,
           "unembed_vd": params["embed"] if c.tie_embeddings else params["lm_head"].T}
    return jax.lax.optimization_barrier(out)  # keep the copies out of the loop


# ----------------------------------------------------------------------------- CPU decode path
def split_cache(cache, config: ModelConfig):
    """[L, B, S, KV, hd] cache -> per-layer (k [B, KV, hd, S], v [B, KV, S, hd]) (the
    ``"keys_transposed"`` layout of ``attention.attend_cached``: both attention dots are plain
    matmuls), plus pos/seg."""
    layers = [(jnp.transpose(cache["k"][i], (0, 2, 3, 1)), jnp.swapaxes(cache["v"][i], 1, 2))
              for i in range(config.num_layers)]
    return {"layers": layers, "pos": cache["pos"], "seg": cache["seg"]}


def merge_cache(cache):
    """Inverse of :func:`split_cache`."""
    return {"k": jnp.stack([jnp.transpose(k, (0, 3, 1, 2)) for k, _ in cache["layers"]]),
            "v": jnp.stack([jnp.swapaxes(v, 1, 2) for _, v in cache["layers"]]),
            "pos": cache["pos"], "seg": cache["seg"]}


def _dot_t(w_t: jax.Array, x_t: jax.Array) -> jax.Array:
    """w_t [N, K] @ x_t [K, B] -> [N, B] in x_t's dtype, float32 accumulation (like
    ``llama.matmul``)."""
    return jnp.dot(w_t.astype(x_t.dtype), x_t, preferred_element_type=jnp.float32
                   ).astype(x_t.dtype)


def _rope_t(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``rope.apply_rope`` of heads-major x [N, hd, B] with cos/sin [hd, B]; float32 math,
    returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * cos[None] + rotate_half(xf, axis=1) * sin[None]).astype(x.dtype)


def decode_layers(params, weights, config: ModelConfig, tokens, positions, layers, write_kv,
                  mask, pmask=None, mesh=None):
    """One single-token decoder pass of the CPU decode path, with FEATURE-MAJOR activations.

    The residual stream is x_t [D, B] and every projection is ``w_t [N, K] @ x_t [K, B]``
    (:func:`unstack_layers`' transposed weights): at decode batch sizes XLA:CPU runs that form
    ~1.25x faster than ``x [B, K] @ w [K, N]`` (the large weight is the left operand), and the
    output projection reads the [V, D] embedding as it is. Attention itself runs row-major
    (``attend_cached``, ``"keys_transposed"`` cache layout); only q/k/v and its output are
    transposed, [B, H*hd] at a time.

    tokens/positions int32 [B, 1]; ``layers``: per layer (k [B, KV, hd, S], v [B, KV, S, hd]);
    ``write_kv(k, v, k_new, v_new)`` -> the layer's (k, v) with this step's k_new/v_new
    [B, KV, hd] written (the caller's rule: one shared slot, or a slot per row); ``mask``
    bool [B, 1, S] over the cache after the write, ``pmask`` bool [B, 1, P] over the shared
    prefix (its k/v in ``weights``). Returns (float32 logits [B, V], new per-layer (k, v)).
    Same building blocks and float32 points as ``llama.forward`` (RMSNorm, RoPE, SiLU-gated MLP,
    float32-accumulated matmuls); tests compare the two and transformers."""
    c = config
    dtype = jnp.dtype(c.dtype)
    B = tokens.shape[0]
    H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim
    F = c.intermediate_size
    x = embed_tokens(params, tokens, dtype, mesh)[:, 0].T  # [D, B]
    cos, sin = (a[:, 0].T for a in rope_tables(positions, inverse_frequencies(c)))  # [hd, B]
    new_layers = []
    for p, (ck, cv) in zip(weights["layers"], layers):
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps, axis=0)
        qkv = _dot_t(p["wqkv_t"], h).reshape(H + 2 * KV, hd, B)
        q = _rope_t(qkv[:H], cos, sin)
        k = _rope_t(qkv[H:H + KV], cos, sin)
        ck, cv = write_kv(ck, cv, jnp.transpose(k, (2, 0, 1)).astype(ck.dtype),
                          jnp.transpose(qkv[H + KV:], (2, 0, 1)).astype(cv.dtype))
        new_layers.append((ck, cv))
        q = shd.constrain(jnp.transpose(q, (2, 0, 1))[:, None],
                          ("batch", "length", "act_heads", None), mesh)
        pk, pv = p.get("prefix_k"), p.get("prefix_v")
        o = attend_cached(q, ck.astype(dtype), cv.astype(dtype), mask,
                          None if pk is None else pk.astype(dtype),
                          None if pv is None else pv.astype(dtype), pmask,
                          layout="keys_transposed")
        x = x + _dot_t(p["wo_t"], o.reshape(B, H * hd).T)
        x = shd.constrain(x, ("act_embed", "batch"), mesh)
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps, axis=0)
        gu = _dot_t(p["w_gate_up_t"], h)
        a = shd.constrain(jax.nn.silu(gu[:F]) * gu[F:], ("act_mlp", "batch"), mesh)
        x = x + _dot_t(p["w_down_t"], a)
        x = shd.constrain(x, ("act_embed", "batch"), mesh)
    h = rms_norm(x, params["final_norm"], c.rms_norm_eps, axis=0)
    w = weights["unembed_vd"]
    # [V, B], kept in that form (XLA would otherwise fold the transpose into a slower [B, V]
    # dot): the [V, B] -> [B, V] copy costs a tenth of what it saves
    logits = jax.lax.optimization_barrier(
        jnp.dot(w.astype(h.dtype), h, preferred_element_type=jnp.float32)).T
    return shd.constrain(logits, ("batch", "act_vocab"), mesh), new_layers


def forward_unstacked(params, weights, config: ModelConfig, tokens, *, positions, segment_ids,
                      cache, cache_index, prefix=None, mesh=None):
    """The static sampler's CPU decode step: :func:`decode_layers` writing every row's k/v at
    the one slot ``cache_index`` of a :func:`split_cache` cache, attending ``prefix`` (pos/seg
    [1, P]; its k/v are in ``weights``) when given. tokens/positions/segment_ids [B, 1].
    Returns (float32 logits [B, 1, V], new split cache)."""
    positions = positions.astype(jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    idx, kv_pos, kv_seg, mask = cache_step_mask(positions, segment_ids, cache, cache_index)
    pmask = None if prefix is None else prefix_mask(positions, segment_ids, prefix)

    def write_kv(ck, cv, k, v):  # k/v [B, KV, hd] -> slot idx of every row
        ck = jax.lax.dynamic_update_slice(ck, k[..., None], (0, 0, 0, idx))
        cv = jax.lax.dynamic_update_slice(cv, v[:, :, None], (0, 0, idx, 0))
        return (shd.constrain(ck, ("batch", "act_kv_heads", None, None), mesh),
                shd.constrain(cv, ("batch", "act_kv_heads", None, None), mesh))

    logits, layers = decode_layers(params, weights, config, tokens, positions, cache["layers"],
                                   write_kv, mask, pmask, mesh)
    return logits[:, None], {"layers": layers, "pos": kv_pos, "seg": kv_seg}
