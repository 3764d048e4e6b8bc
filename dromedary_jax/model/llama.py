"""The LLaMA decoder: a pure functional forward pass over a flat parameter dict, and the Flax NNX
module (``Llama``) that holds those parameters with their logical axis names.

Parameters (flat dict; per-layer tensors stacked on a leading ``layers`` axis and run under
``lax.scan``, so compile time does not grow with depth):

    embed       [V, D]            final_norm [D]            lm_head [D, V] (absent when tied)
    attn_norm   [L, D]            wq [L, D, H, hd]          wk/wv [L, D, KV, hd]
    wo          [L, H, hd, D]     mlp_norm [L, D]           w_gate/w_up [L, D, F]
    w_down      [L, F, D]

Attention masking is uniform for training, packing and sampling: every query and every key
carries a position and a segment id; a query attends to a key when both are in the same
non-zero segment and the key's position is not after the query's. Padding has segment 0.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.forward_jit import forward_jit
from dromedary_jax.model.attention import attend, attend_cached, attention_mask
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.rope import apply_rope, inverse_frequencies, rope_tables

Params = dict[str, jax.Array]
LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
# How many leading (input) dims each projection weight has, after the layers axis.
PROJ_IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def param_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of the flat dict (see the module docstring's table), in this
    order; ``lm_head`` only when the embeddings are not tied."""
    L, D, H, KV, hd, F, V = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
                             c.head_dim, c.intermediate_size, c.vocab_size)
    shapes = {
        "embed": (V, D),
        "attn_norm": (L, D),
        "wq": (L, D, H, hd),
        "wk": (L, D, KV, hd),
        "wv": (L, D, KV, hd),
        "wo": (L, H, hd, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
        "final_norm": (D,),
    }
    if not c.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "attn_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
}


def param_axes(c: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Logical axis names (``sharding.LOGICAL_RULES`` keys) of every parameter of ``c``."""
    return {k: PARAM_AXES[k] for k in param_shapes(c)}


def param_shardings(c: ModelConfig, mesh) -> dict[str, jax.sharding.NamedSharding]:
    """The NamedSharding of every parameter of ``c`` on ``mesh`` (logical axes mapped by
    ``sharding.LOGICAL_RULES``; a mesh axis that does not divide a dim leaves it replicated)."""
    shapes = param_shapes(c)
    return {k: shd.named_sharding(mesh, PARAM_AXES[k], s) for k, s in shapes.items()}


def init_params(c: ModelConfig, key: jax.Array, mesh=None, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) weights, unit norms), created directly sharded."""
    shapes = param_shapes(c)
    dtype = jnp.dtype(c.param_dtype)

    def make(key):
        keys = jax.random.split(key, len(shapes))
        out = {}
        for k_, (name, shape) in zip(keys, sorted(shapes.items())):
            if name.endswith("norm"):
                out[name] = jnp.ones(shape, dtype)
            else:
                out[name] = (std * jax.random.normal(k_, shape, jnp.float32)).astype(dtype)
        return out

    if mesh is None:
        return jax.jit(make)(key)
    return jax.jit(make, out_shardings=param_shardings(c, mesh))(key)


# ----------------------------------------------------------------------------- building blocks
def embed_tokens(params, tokens: jax.Array, dtype, mesh=None) -> jax.Array:
    """Token ids [B, T] -> embeddings [B, T, D] in ``dtype``, batch-sharded on ``mesh``.

    The table's 'embed' (fsdp) shards are gathered first, as FSDP does for every weight. A lookup
    into an fsdp-sharded embed dim gives activations that SPMD can only re-split by fully
    replicating them ("Involuntary full rematerialization")."""
    table = shd.constrain(params["embed"], ("vocab", None), mesh)
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    return shd.constrain(x, ("batch", "length", "act_embed"), mesh)


def prefix_mask(positions: jax.Array, segment_ids: jax.Array, prefix,
                mask_fn=attention_mask) -> jax.Array:
    """bool [B, T, P]: which keys of a shared prefix (pos/seg [1, P]) each query attends."""
    B, P = positions.shape[0], prefix["seg"].shape[1]
    return mask_fn(positions, segment_ids, jnp.broadcast_to(prefix["pos"], (B, P)),
                   jnp.broadcast_to(prefix["seg"], (B, P)))


def cache_step_mask(positions: jax.Array, segment_ids: jax.Array, cache, cache_index,
                    mask_fn=attention_mask):
    """A step that writes its T tokens into ``cache`` at ``cache_index``: (the index as an int32
    scalar, the cache's new pos and seg [B, S], the step's mask over the cache bool [B, T, S])."""
    idx = jnp.asarray(cache_index, jnp.int32)
    kv_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, idx))
    kv_seg = jax.lax.dynamic_update_slice(cache["seg"], segment_ids, (0, idx))
    return idx, kv_pos, kv_seg, mask_fn(positions, segment_ids, kv_pos, kv_seg)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """RMSNorm over ``axis`` (the features; weight ``w`` [D] along it) computed in float32,
    returned in x's dtype. ``axis=0``: feature-major x [D, B] (the CPU decode step's)."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=axis, keepdims=True)
    w_shape = [1] * x.ndim
    w_shape[axis] = -1
    return (xf * jax.lax.rsqrt(var + eps) * w.astype(jnp.float32).reshape(w_shape)).astype(x.dtype)


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [M, K] @ w [K, N] in x's dtype, accumulated in float32, returned in ``out_dtype``
    (default x's dtype).

    With bfloat16 compute this is the fast path on every backend: TPU/GPU accumulate in fp32
    anyway, and XLA:CPU only dispatches bf16 x bf16 -> f32 dots to its AMX/AVX512-BF16 kernels
    (a bf16-output dot runs ~5x slower there)."""
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int, lora: Mapping[str, jax.Array] | None = None,
          lora_scale: float = 1.0, lora_x: jax.Array | None = None,
          out_dtype=None) -> jax.Array:
    """x [B, T, *in] @ w [*in, *out] (+ LoRA: lora_scale * (x @ a) @ b), in ``out_dtype``
    (default x's dtype).

    Computed as plain 2-D matmuls ([B*T, in] @ [in, out]): XLA's CPU backend (and its backward
    pass in particular) is much faster on these than on the equivalent multi-axis einsums."""
    B, T = x.shape[:2]
    out_shape = w.shape[n_in:]
    k_in, k_out = int(np.prod(w.shape[:n_in])), int(np.prod(out_shape))
    out_dtype = out_dtype or x.dtype
    y = matmul(x.reshape(B * T, k_in), w.reshape(k_in, k_out), jnp.float32)
    if lora is not None:
        xl = (x if lora_x is None else lora_x).reshape(B * T, k_in)
        a = lora["a"].reshape(k_in, -1)
        b = lora["b"].reshape(a.shape[1], k_out)
        y = y + lora_scale * matmul(matmul(xl, a), b, jnp.float32)
    return y.astype(out_dtype).reshape(B, T, *out_shape)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


# ----------------------------------------------------------------------------- forward
def forward(
    params: Mapping[str, jax.Array],
    config: ModelConfig,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Mapping[str, jax.Array] | None = None,
    cache_index: jax.Array | int | None = None,
    logits_at: jax.Array | None = None,
    lora: Mapping[str, Mapping[str, jax.Array]] | None = None,
    lora_scale: float = 1.0,
    lora_dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    mesh=None,
    return_hidden: bool = False,
    prefix: Mapping[str, jax.Array] | None = None,
    mask_fn=None,
):
    """Run the decoder.

    tokens [B, T] int32. positions [B, T] (default arange). segment_ids [B, T] (default all 1;
    0 marks padding). With ``cache`` (``k``/``v`` [L, B, S, KV, hd], ``pos``/``seg`` [B, S]) the
    new keys/values are written at slots ``cache_index .. cache_index+T`` and queries attend over
    the whole cache. ``logits_at`` [B] int: compute logits only at that position of each row
    (returns [B, 1, V]). Returns ``(logits float32, new_cache or None)``; with ``return_hidden``
    the final-normed hidden states [B, T, D] are returned instead of logits.

    ``prefix`` (sampling, with ``cache``): a shared prefix's k/v [L, 1, P, KV, hd] and pos/seg
    [1, P] that every row attends besides its own cache. It is never written and stays ONE copy
    for the whole batch (a ~1.8k-token principle prompt is not copied into every row).

    ``mask_fn`` (q_pos [B, T], q_seg [B, T], kv_pos [B, S], kv_seg [B, S]) -> bool [B, T, S]
    replaces the masking rule of :func:`~dromedary_jax.model.attention.attention_mask` for every
    mask of the call (own tokens, cache, prefix); the eval scorer packs a context and several
    continuations that all attend it into one row this way.
    """
    c = config
    dtype = jnp.dtype(c.dtype)
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    positions = positions.astype(jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)

    x = embed_tokens(params, tokens, dtype, mesh)
    cos, sin = rope_tables(positions, inverse_frequencies(c))

    if prefix is not None and cache is None:
        raise ValueError("forward: a shared prefix needs a cache")
    pmask = prefix_kv = None
    mask_fn = mask_fn or attention_mask
    if prefix is not None:
        pmask = prefix_mask(positions, segment_ids, prefix, mask_fn)
        prefix_kv = (prefix["k"], prefix["v"])
    if cache is not None:
        idx, kv_pos, kv_seg, mask = cache_step_mask(positions, segment_ids, cache, cache_index,
                                                    mask_fn)
        cache_k, cache_v = cache["k"], cache["v"]
    else:
        idx = None
        mask = mask_fn(positions, segment_ids, positions, segment_ids)
        cache_k = cache_v = None

    layer_params = {k: params[k] for k in LAYER_KEYS}
    layer_lora = dict(lora) if lora else {}
    use_dropout = lora_dropout > 0.0 and dropout_rng is not None and bool(layer_lora)
    layer_keys = (jax.random.split(dropout_rng, c.num_layers) if use_dropout
                  else jnp.zeros((c.num_layers,), jnp.uint32))

    def layer(carry, xs):
        x, ck, cv = carry
        p, lo, li, key, pkv = xs
        def drop(v, i):  # LoRA dropout on an adapter's input (the base path sees v itself)
            if not use_dropout:
                return v
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1 - lora_dropout, v.shape)
            return jnp.where(keep, v / (1 - lora_dropout), 0).astype(v.dtype)

        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        hl = drop(h, 0)
        q = dense(h, p["wq"], 1, lo.get("wq"), lora_scale, hl)
        k = dense(h, p["wk"], 1, lo.get("wk"), lora_scale, hl)
        v = dense(h, p["wv"], 1, lo.get("wv"), lora_scale, hl)
        q = shd.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None), mesh)
        k = shd.constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None), mesh)
        v = shd.constrain(v, ("batch", "length", "act_kv_heads", None), mesh)
        if ck is not None:
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (li, 0, idx, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (li, 0, idx, 0, 0))
            k_all = jax.lax.dynamic_index_in_dim(ck, li, 0, keepdims=False).astype(dtype)
            v_all = jax.lax.dynamic_index_in_dim(cv, li, 0, keepdims=False).astype(dtype)
        else:
            k_all, v_all = k, v
        if pkv is None:
            o = attend(q, k_all, v_all, mask)
        else:  # [1, P, KV, hd] -> [P, KV, hd]
            o = attend_cached(q, k_all, v_all, mask, pkv[0][0].astype(dtype),
                              pkv[1][0].astype(dtype), pmask)
        x = x + dense(o, p["wo"], 2, lo.get("wo"), lora_scale, drop(o, 1) if "wo" in lo else o)
        x = shd.constrain(x, ("batch", "length", "act_embed"), mesh)

        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
        hl = drop(h, 2)
        g = dense(h, p["w_gate"], 1, lo.get("w_gate"), lora_scale, hl)
        u = dense(h, p["w_up"], 1, lo.get("w_up"), lora_scale, hl)
        a = shd.constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"), mesh)
        x = x + dense(a, p["w_down"], 1, lo.get("w_down"), lora_scale,
                      drop(a, 3) if "w_down" in lo else a)
        x = shd.constrain(x, ("batch", "length", "act_embed"), mesh)
        return (x, ck, cv), None

    layer = _remat(layer, c.remat)
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    xs = (layer_params, layer_lora, layer_ids, layer_keys, prefix_kv)
    if c.scan_layers:
        (x, cache_k, cache_v), _ = jax.lax.scan(layer, (x, cache_k, cache_v), xs)
    else:
        carry = (x, cache_k, cache_v)
        for i in range(c.num_layers):
            carry, _ = layer(carry, jax.tree.map(lambda a: a[i], xs))
        x, cache_k, cache_v = carry

    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
    new_cache = None
    if cache is not None:
        new_cache = {"k": cache_k, "v": cache_v, "pos": kv_pos, "seg": kv_seg}
    if return_hidden:
        return x, new_cache
    return unembed(params, config, x, mesh), new_cache


def unembed(params, config: ModelConfig, x: jax.Array, mesh=None) -> jax.Array:
    """Final-normed hidden states [B, T, D] -> float32 logits [B, T, V]."""
    w = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = dense(x, w, 1, out_dtype=jnp.float32)
    return shd.constrain(logits, ("batch", "length", "act_vocab"), mesh)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, mesh=None):
    """Empty KV cache: k/v [L, B, S, KV, hd] zeros, pos zeros, seg zeros (= nothing valid)."""
    c = config
    dtype = jnp.dtype(dtype or c.dtype)
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    cache = {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.zeros((batch, max_len), jnp.int32),
        "seg": jnp.zeros((batch, max_len), jnp.int32),
    }
    if mesh is not None:
        cache = jax.device_put(cache, cache_shardings(config, batch, max_len, mesh))
    return cache


CACHE_AXES = {
    "k": ("layers", "batch", "cache_length", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_length", "kv_heads", "head_dim"),
    "pos": ("batch", "cache_length"),
    "seg": ("batch", "cache_length"),
}


def cache_shardings(config: ModelConfig, batch: int, max_len: int, mesh):
    """NamedShardings of a KV cache (:func:`init_cache`) of ``batch`` rows and ``max_len``
    positions on ``mesh``: ``k`` / ``v`` [L, B, S, KV, hd], ``pos`` / ``seg`` [B, S]."""
    c = config
    kv = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    shapes = {"k": kv, "v": kv, "pos": (batch, max_len), "seg": (batch, max_len)}
    return {k: shd.named_sharding(mesh, CACHE_AXES[k], s) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- NNX module
class Llama(nnx.Module):
    """Flax NNX LLaMA. Holds float32 (master) parameters as ``nnx.Param`` with logical axis
    names in their ``logical_axes`` metadata, plus the config and (optionally) the mesh.

    ``model(tokens, ...)`` runs :func:`forward`; pure code (jit'ed steps, the sampler, the
    trainer) works on ``model.params`` (a flat dict) and :func:`forward` directly.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None,
                 params: Mapping[str, jax.Array] | None = None, mesh=None):
        self.config = config
        self.mesh = mesh
        if params is None:
            key = rngs.params() if rngs is not None else jax.random.key(0)
            params = init_params(config, key, mesh)
        expected = param_shapes(config)
        missing = set(expected) - set(params)
        if missing:
            raise ValueError(f"missing parameters: {sorted(missing)}")
        for name, shape in expected.items():
            arr = params[name]
            if tuple(arr.shape) != shape:
                raise ValueError(f"parameter {name}: shape {tuple(arr.shape)} != expected {shape}")
            setattr(self, name, nnx.Param(arr, logical_axes=PARAM_AXES[name]))

    @property
    def params(self) -> Params:
        """The parameters as a flat dict ``{name: jax.Array}`` (shapes: :func:`param_shapes`)."""
        return {name: getattr(self, name).value for name in param_shapes(self.config)}

    def set_params(self, params: Mapping[str, jax.Array]) -> None:
        """Replace every parameter's value with ``params[name]`` (no shape check; KeyError for
        a missing name; extra names are ignored)."""
        for name in param_shapes(self.config):
            getattr(self, name).value = params[name]

    def __call__(self, tokens, **kw):
        return forward(self.params, self.config, tokens, mesh=self.mesh, **kw)


# dj.logits calls of at least this many tokens use oneDNN dots on x86 CPUs (forward_jit.py).
ONEDNN_MIN_TOKENS = 2048


@forward_jit(static_argnames=("config", "mesh"),
             onednn_when=lambda params, tokens, config, mesh: tokens.size >= ONEDNN_MIN_TOKENS)
def _logits_jit(params, tokens, config, mesh):
    return forward(params, config, tokens, mesh=mesh)[0]


def token_batch(input_ids, config: ModelConfig) -> np.ndarray:
    """``input_ids`` as int32 [B, T] after checking it is a non-empty rectangular batch of token
    ids in ``[0, vocab_size)`` (UserError otherwise; a warning beyond ``max_seq_len``)."""
    what = "input_ids must be a [batch, length] array of token ids (equal-length rows)"
    try:
        arr = np.asarray(input_ids)
    except ValueError:  # ragged nested lists
        raise UserError(f"{what}; the rows have different lengths") from None
    if arr.ndim != 2 or arr.size == 0:
        raise UserError(f"{what}; got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise UserError(f"{what}; got {arr.dtype} values")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= config.vocab_size:
        raise UserError(f"input_ids has token ids outside [0, {config.vocab_size}): "
                        f"min {lo}, max {hi}")
    if arr.shape[1] > config.max_seq_len:
        warnings.warn(f"input_ids has {arr.shape[1]} tokens a row, more than the model's "
                      f"max_seq_len ({config.max_seq_len})", stacklevel=3)
    return arr.astype(np.int32)


def logits(model: Llama, input_ids) -> np.ndarray:
    """int [B, T] token ids -> float32 numpy logits [B, T, vocab] (full causal attention, no
    padding)."""
    tokens = jnp.asarray(token_batch(input_ids, model.config))
    mesh = model.mesh
    if mesh is not None:
        tokens = jax.device_put(tokens, shd.named_sharding(mesh, ("batch", "length"), tokens.shape))
    return np.asarray(jax.device_get(_logits_jit(model.params, tokens, model.config, mesh)))


def place_params(params: Mapping[str, Any], config: ModelConfig, mesh) -> Params:
    """device_put host arrays into the model's shardings on ``mesh`` (or the default device)."""
    if mesh is None:
        return {k: jnp.asarray(v, dtype=config.param_dtype) for k, v in params.items()}
    sh = param_shardings(config, mesh)
    return {k: jax.device_put(np.asarray(v, dtype=config.param_dtype), sh[k])
            for k, v in params.items()}
