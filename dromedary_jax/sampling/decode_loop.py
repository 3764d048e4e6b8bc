"""The jit'ed sampler programs: ``prefill`` (prompt -> KV cache + first token) and ``decode``
(a ``lax.while_loop`` of single-token steps with a per-row done mask and early exit).

Per-row cache layout (every row uses the same slots)::

    slots [0, T)          each row's prompt (or its suffix after a shared prefix), LEFT-padded to T
    slots [T, T+G)        generated tokens: step t writes slot T+t-1 for every row

A shared prefix is NOT copied into the rows: it stays one ``[L, 1, P, KV, hd]`` cache that every
row attends besides its own (``llama.forward``'s ``prefix``). Padding has segment id 0 and is
never attended to; real tokens have segment 1 and positions counting from 0 at the first real
token (of the prefix, when there is one), so left padding changes nothing a row computes.
``state`` is a dict pytree (donated to ``decode``)::

    cache      k/v [L,B,S,KV,hd], pos/seg [B,S]
    tokens     int32 [B,G]  generated tokens (slot t holds step t's token)
    t          int32 []     how many steps have run
    done       bool [B]     row finished (EOS, stop string marked by the host, or a pad row)
    n_valid    int32 [B]    tokens before EOS (what the caller returns)
    first_pos  int32 [B]    position of the first generated token
    ids        uint32 [B]   example ids (randomness)
    logits     f32 [B,V]    last step's raw logits (only with ``spec.keep_logits``; for tests)

``knobs`` hold the dynamic sampling values (changing them does not recompile): seed, temperature,
top_p, logit_bias [V], ngram_penalties [n], max_new. What does recompile is in ``LoopSpec``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from dromedary_jax import sharding as shd
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.llama import CACHE_AXES, forward
from dromedary_jax.sampling.logits_processing import apply_penalties, row_keys, sample
from dromedary_jax.sampling.step_forward import (forward_unstacked, merge_cache, split_cache,
                                                 unstack_layers)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Static (hashable) sampler settings: one compiled program per distinct spec and shape."""

    config: ModelConfig
    mesh: Any = None
    greedy: bool = True
    top_k: int = 0
    use_top_p: bool = False
    ngram_ns: tuple[int, ...] = ()
    eos_ids: tuple[int, ...] = ()
    keep_logits: bool = False
    unstack_layers: bool = False  # CPU decode path (see step_forward)


def _prefix_kv(prefix):
    return None if prefix is None else {k: prefix[k] for k in ("k", "v", "pos", "seg")}


def _constrain_state(state, mesh):
    out = dict(state)
    out["cache"] = {k: shd.constrain(v, CACHE_AXES[k], mesh) for k, v in state["cache"].items()}
    out["tokens"] = shd.constrain(state["tokens"], ("batch", None), mesh)
    for k in ("done", "n_valid", "first_pos", "ids"):
        out[k] = shd.constrain(state[k], ("batch",), mesh)
    return out


def _sample_into(state, logits, knobs, spec: LoopSpec):
    """Process logits [B, V] for step ``state['t']``, write the sampled tokens, advance t."""
    t = state["t"]
    proc = apply_penalties(logits, state["tokens"], t, knobs["logit_bias"], spec.ngram_ns,
                           knobs["ngram_penalties"])
    keys = row_keys(jax.random.key(knobs["seed"]), state["ids"], t)
    tok = sample(proc, keys, knobs["temperature"], knobs["top_p"], greedy=spec.greedy,
                 top_k=spec.top_k, use_top_p=spec.use_top_p)
    done = state["done"]
    is_eos = jnp.zeros_like(done)
    for e in spec.eos_ids:
        is_eos = is_eos | (tok == e)
    written = jnp.where(done, 0, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(state["tokens"], written[:, None], t, axis=1)
    out = dict(state, tokens=tokens, t=t + 1, done=done | is_eos,
               n_valid=state["n_valid"] + (~done & ~is_eos).astype(jnp.int32))
    if spec.keep_logits:
        out["logits"] = logits
    return out


@functools.partial(jax.jit, static_argnames=("spec", "gen_len"))
def prefill(params, batch, prefix, knobs, *, spec: LoopSpec, gen_len: int):
    """Prefill the prompts and sample step 0.

    batch: tokens/positions/segment_ids [B, T] (left-padded), first_pos [B], ids [B] uint32,
    active [B] bool (False = a pad row, done from the start), empty [B] bool (no suffix tokens:
    take the prefix's last logits). prefix: None, or k/v [L,1,P,KV,hd], pos/seg [1,P] and
    last_logits [1, V] from :func:`prefill_prefix_arrays`.
    """
    c = spec.config
    tokens = batch["tokens"]
    B, T = tokens.shape
    dtype = jnp.dtype(c.dtype)
    kv_shape = (c.num_layers, B, T + gen_len, c.num_kv_heads, c.head_dim)
    cache = {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype),
             "pos": jnp.zeros((B, T + gen_len), jnp.int32),
             "seg": jnp.zeros((B, T + gen_len), jnp.int32)}
    cache = {k: shd.constrain(v, CACHE_AXES[k], spec.mesh) for k, v in cache.items()}
    logits, cache = forward(params, c, tokens, positions=batch["positions"],
                            segment_ids=batch["segment_ids"], cache=cache, cache_index=0,
                            prefix=_prefix_kv(prefix), mesh=spec.mesh,
                            logits_at=jnp.full((B,), T - 1, jnp.int32))
    logits = logits[:, 0]
    if prefix is not None:
        logits = jnp.where(batch["empty"][:, None], prefix["last_logits"], logits)
    state = {
        "cache": cache,
        "tokens": jnp.zeros((B, gen_len), jnp.int32),
        "t": jnp.zeros((), jnp.int32),
        "done": ~batch["active"],
        "n_valid": jnp.zeros((B,), jnp.int32),
        "first_pos": batch["first_pos"].astype(jnp.int32),
        "ids": batch["ids"],
    }
    if spec.keep_logits:
        state["logits"] = jnp.zeros_like(logits)
    return _constrain_state(_sample_into(state, logits, knobs, spec), spec.mesh)


@functools.partial(jax.jit, static_argnames=("spec",))
def layer_weights(params, prefix=None, *, spec: LoopSpec):
    """The per-layer weights that :func:`decode` and the engine's ``decode_chunk`` read, made
    ONCE per ``generate`` call instead of inside every decode call. On the CPU path
    (``spec.unstack_layers``): the fused, transposed copies of ``step_forward.unstack_layers``
    (about as long to make as two decode steps at batch 32). Else only the shared prefix's k/v
    per layer as [KV, P, hd], for the engine (the stacked weights are sliced per layer inside
    the step)."""
    c = spec.config
    if spec.unstack_layers:
        return unstack_layers(params, c, prefix)
    layers = [{} for _ in range(c.num_layers)]
    if prefix is not None:
        for i, d in enumerate(layers):
            d["prefix_k"] = jnp.swapaxes(prefix["k"][i, 0], 0, 1)
            d["prefix_v"] = jnp.swapaxes(prefix["v"][i, 0], 0, 1)
    return {"layers": layers}


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def decode(params, weights, state, knobs, stop_at, prefix=None, *, spec: LoopSpec):
    """Run decode steps while ``t < min(stop_at, max_new)`` and some row is not done.

    Returns ``(state, all_done)``. ``stop_at`` is dynamic, so decoding in chunks (for host-side
    stop-string checks) reuses one compiled program. ``weights``: :func:`layer_weights` of the
    same params, prefix and spec (read only on the CPU path, ``spec.unstack_layers``; None
    otherwise is fine). ``prefix``: the same shared prefix that ``prefill`` got (or None).
    """
    c = spec.config
    B, G = state["tokens"].shape
    base = state["cache"]["seg"].shape[1] - G  # slot of generated token 0
    limit = jnp.minimum(jnp.minimum(stop_at, knobs["max_new"]), G)
    ones = jnp.ones((B, 1), jnp.int32)
    prefix = _prefix_kv(prefix)

    def cond(s):
        return (s["t"] < limit) & ~jnp.all(s["done"])

    if spec.unstack_layers:  # CPU: step_forward's per-layer weights and cache layout in the loop
        def body(s):
            t = s["t"]
            tok = jax.lax.dynamic_slice_in_dim(s["tokens"], t - 1, 1, axis=1)
            pos = (s["first_pos"] + t - 1)[:, None]
            logits, cache = forward_unstacked(params, weights, c, tok, positions=pos,
                                              segment_ids=ones, cache=s["cache"],
                                              cache_index=base + t - 1, prefix=prefix,
                                              mesh=spec.mesh)
            return _sample_into(dict(s, cache=cache), logits[:, 0], knobs, spec)

        state = dict(state, cache=split_cache(state["cache"], c))
        state = jax.lax.while_loop(cond, body, state)
        state = dict(state, cache=merge_cache(state["cache"]))
    else:
        def body(s):
            t = s["t"]
            tok = jax.lax.dynamic_slice_in_dim(s["tokens"], t - 1, 1, axis=1)
            pos = (s["first_pos"] + t - 1)[:, None]
            logits, cache = forward(params, c, tok, positions=pos, segment_ids=ones,
                                    cache=s["cache"], cache_index=base + t - 1, prefix=prefix,
                                    mesh=spec.mesh)
            return _sample_into(dict(s, cache=cache), logits[:, 0], knobs, spec)

        state = jax.lax.while_loop(cond, body, state)
    state = _constrain_state(state, spec.mesh)
    return state, jnp.all(state["done"])
