"""Continuous-batching generation engine (``engine="continuous"`` of ``generate``/``generate_text``).

The static path (``api.run_batches``) decodes a batch until its LAST row is done, so a row that
stopped at token 20 idles through the others' 256. The engine keeps a fixed number of decode
slots (the batch size) and refills a finished row's slot with the next waiting prompt:

* one state of ``B`` slots: per slot a KV cache of ``S = Tb + G`` slots (``Tb``: the bucket of the
  longest prompt of the call, ``G``: the bucket of max_new_tokens), kept per layer as
  ``[B, KV, S, hd]`` (the CPU decode path's layout, see ``step_forward``). A row's prompt sits
  LEFT-padded in ``[Tb - Tp, Tb)``, its step ``t`` writes slot ``Tb + t - 1``. The shared prefix
  stays ONE ``[L, 1, P, KV, hd]`` copy attended by every slot, as in the static path.
* per-row step counters ``t [B]``: each step samples row ``b`` at its own ``t[b]`` and scatters
  its new k/v at its own cache slot; done rows do not advance.
* :func:`decode_chunk` runs a ``lax.while_loop`` for at most ``steps`` steps, and exits early when
  ``min_free`` rows are done (a quarter of the slots while prompts wait) or all are.
* on the host, finished rows are taken out (``on_finish`` streams them) and the free slots are
  refilled: the waiting prompts are prefilled in ONE batched call (rows bucketed to a quarter of
  the slots times a power of two, lengths bucketed as in ``buckets``) into a small cache that the
  same jit'ed :func:`refill` inserts into the free rows, with each row's first token sampled.

Randomness: the sample of example ``id`` at step ``t`` uses ``fold_in(fold_in(key(seed), id), t)``
(``logits_processing.row_keys``) exactly as the static path does, so an example's text depends
on (seed, example id) only: not on the slot count, the order of arrival or the refill timing.
Stop strings are checked on the host after every chunk of ``stop_check_every`` steps (a row's
tokens after its stop string are cut off by the caller, as in the static path).

Programs: one ``decode_chunk`` per (slots, Tb, G, spec) and one ``refill`` per (rows bucket,
length bucket). One process only (several processes: a UserError; use the static engine).
"""
from __future__ import annotations

import collections
import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.model.attention import attend_cached, attention_mask
from dromedary_jax.model.llama import (
    CACHE_AXES,
    LAYER_KEYS,
    dense,
    embed_tokens,
    forward,
    prefix_mask,
    rms_norm,
)
from dromedary_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from dromedary_jax.sampling.buckets import bucket, round_up
from dromedary_jax.sampling.decode_loop import LoopSpec
from dromedary_jax.sampling.host import local_rows, make_batch, progress_bar, to_device
from dromedary_jax.sampling.logits_processing import apply_penalties, row_keys, sample
from dromedary_jax.sampling.step_forward import _matmul, final_logits, unstack_layers

ENGINES = ("static", "continuous")
REFILL_FRACTION = 4  # a chunk exits once 1/REFILL_FRACTION of the slots are free (prompts waiting)


def check_engine(engine) -> str:
    """``engine`` argument -> "static" or "continuous"; anything else is a UserError. Several
    processes with "continuous" are a UserError too (the engine runs on one process)."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if engine == "continuous" and jax.process_count() > 1:
        raise UserError("engine='continuous' runs on one process only; use engine='static' "
                        "with several processes")
    return engine


# ----------------------------------------------------------------------------- device programs
def _kv_axes():
    return ("batch", "act_kv_heads", None, None)


def _constrain(state, mesh):
    out = dict(state)
    cache = state["cache"]
    out["cache"] = {
        "layers": [(shd.constrain(k, _kv_axes(), mesh), shd.constrain(v, _kv_axes(), mesh))
                   for k, v in cache["layers"]],
        "pos": shd.constrain(cache["pos"], CACHE_AXES["pos"], mesh),
        "seg": shd.constrain(cache["seg"], CACHE_AXES["seg"], mesh)}
    out["tokens"] = shd.constrain(state["tokens"], ("batch", None), mesh)
    for k in ("t", "done", "n_valid", "first_pos", "ids"):
        out[k] = shd.constrain(state[k], ("batch",), mesh)
    return out


def _sample_rows(state, logits, knobs, spec: LoopSpec):
    """Per-row ``_sample_into``: process logits [B, V] of each row at its own step ``t[b]``,
    write the sampled token at column ``t[b]``, advance the rows that are not done. A row is
    done after EOS or once it has ``max_new`` tokens."""
    t, done = state["t"], state["done"]
    B, G = state["tokens"].shape
    proc = apply_penalties(logits, state["tokens"], t, knobs["logit_bias"], spec.ngram_ns,
                           knobs["ngram_penalties"])
    keys = row_keys(jax.random.key(knobs["seed"]), state["ids"], t)
    tok = sample(proc, keys, knobs["temperature"], knobs["top_p"], greedy=spec.greedy,
                 top_k=spec.top_k, use_top_p=spec.use_top_p)
    is_eos = jnp.zeros_like(done)
    for e in spec.eos_ids:
        is_eos = is_eos | (tok == e)
    rows = jnp.arange(B)
    tokens = state["tokens"].at[rows, jnp.where(done, G, t)].set(tok, mode="drop")
    limit = jnp.minimum(knobs["max_new"], G)
    new_t = jnp.where(done, t, t + 1)
    return dict(state, tokens=tokens, t=new_t, done=done | is_eos | (new_t >= limit),
                n_valid=state["n_valid"] + (~done & ~is_eos).astype(jnp.int32))


def _layer_weights(params, c, prefix, batch: int, unstack: bool):
    """Per-layer weights for the decode loop, made once per chunk (see ``step_forward``): the
    fused CPU copies (``unstack``), else only the shared prefix's k/v as [KV, P, hd] (the
    stacked weights are sliced per layer inside the step)."""
    if unstack:
        return unstack_layers(params, c, prefix, batch=batch)
    layers = [{} for _ in range(c.num_layers)]
    if prefix is not None:
        for i, d in enumerate(layers):
            d["prefix_k"] = jnp.swapaxes(prefix["k"][i, 0], 0, 1)
            d["prefix_v"] = jnp.swapaxes(prefix["v"][i, 0], 0, 1)
    return {"layers": layers}


def _forward_rows(params, weights, c, tokens, positions, cache, idx, prefix, mesh):
    """One decode step where row ``b`` writes its new k/v at its own cache slot ``idx[b]``.

    tokens/positions [B, 1]; cache: per-layer (k, v) [B, KV, S, hd], pos/seg [B, S]; prefix:
    pos/seg [1, P] (its k/v are in ``weights``). The same computation as
    ``step_forward.forward_unstacked`` (or ``llama.forward`` on stacked weights), with a scatter
    of each row's k/v instead of one shared slot. Returns (logits float32 [B, 1, V], cache)."""
    dtype = jnp.dtype(c.dtype)
    B, T = tokens.shape
    H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim
    rows = jnp.arange(B)
    segs = jnp.ones((B, T), jnp.int32)
    x = embed_tokens(params, tokens, dtype, mesh)
    cos, sin = rope_tables(positions, inverse_frequencies(c))
    kv_pos = cache["pos"].at[rows, idx].set(positions[:, 0])
    kv_seg = cache["seg"].at[rows, idx].set(1)
    mask = attention_mask(positions, segs, kv_pos, kv_seg)
    pmask = None if prefix is None else prefix_mask(positions, segs, prefix)
    new_layers = []
    for i, (ck, cv) in enumerate(cache["layers"]):
        p = weights["layers"][i]
        stacked = "wqkv" not in p
        if stacked:
            p = dict(p, **{k: params[k][i] for k in LAYER_KEYS})
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        if stacked:
            q, k, v = (dense(h, p[w], 1) for w in ("wq", "wk", "wv"))
        else:
            qkv = _matmul(h, p["wqkv"]).reshape(B, T, H + 2 * KV, hd)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + KV], qkv[:, :, H + KV:]
        q = shd.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None), mesh)
        k = apply_rope(k, cos, sin)
        ck = ck.at[rows, :, idx].set(k[:, 0].astype(ck.dtype))
        cv = cv.at[rows, :, idx].set(v[:, 0].astype(cv.dtype))
        ck = shd.constrain(ck, _kv_axes(), mesh)
        cv = shd.constrain(cv, _kv_axes(), mesh)
        new_layers.append((ck, cv))
        pk, pv = p.get("prefix_k"), p.get("prefix_v")
        o = attend_cached(q, ck.astype(dtype), cv.astype(dtype), mask,
                          None if pk is None else pk.astype(dtype),
                          None if pv is None else pv.astype(dtype), pmask, kv_major=True)
        if stacked:
            x = x + dense(o, p["wo"], 2)
        else:
            x = x + _matmul(o.reshape(B, T, H * hd), p["wo"])
        x = shd.constrain(x, ("batch", "length", "act_embed"), mesh)
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
        if stacked:
            a = jax.nn.silu(dense(h, p["w_gate"], 1)) * dense(h, p["w_up"], 1)
        else:
            gu = _matmul(h, p["w_gate_up"])
            F = c.intermediate_size
            a = jax.nn.silu(gu[..., :F]) * gu[..., F:]
        a = shd.constrain(a, ("batch", "length", "act_mlp"), mesh)
        x = x + (dense(a, p["w_down"], 1) if stacked else _matmul(a, p["w_down"]))
        x = shd.constrain(x, ("batch", "length", "act_embed"), mesh)
    return final_logits(params, weights, c, x, mesh), {"layers": new_layers, "pos": kv_pos,
                                                      "seg": kv_seg}


def _prefix_pos(prefix):
    return None if prefix is None else {"pos": prefix["pos"], "seg": prefix["seg"]}


@functools.partial(jax.jit, static_argnames=("spec", "slots", "prompt_len", "gen_len"))
def empty_state(*, spec: LoopSpec, slots: int, prompt_len: int, gen_len: int):
    """The engine state with every slot free (done, nothing in its cache):

        cache      per-layer (k, v) [B, KV, S, hd] with S = prompt_len + gen_len, pos/seg [B, S]
        tokens     int32 [B, G]  a row's generated tokens (column t holds step t's token)
        t          int32 [B]     each row's step count (tokens so far)
        done       bool [B]      finished (EOS, max_new, stop string marked by the host) or free
        n_valid    int32 [B]     tokens before EOS
        first_pos  int32 [B]     position of a row's first generated token
        ids        uint32 [B]    example ids (randomness)
    """
    c = spec.config
    B, S = slots, prompt_len + gen_len
    dtype = jnp.dtype(c.dtype)
    shape = (B, c.num_kv_heads, S, c.head_dim)
    state = {
        "cache": {"layers": [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                             for _ in range(c.num_layers)],
                  "pos": jnp.zeros((B, S), jnp.int32), "seg": jnp.zeros((B, S), jnp.int32)},
        "tokens": jnp.zeros((B, gen_len), jnp.int32),
        "t": jnp.ones((B,), jnp.int32),
        "done": jnp.ones((B,), bool),
        "n_valid": jnp.zeros((B,), jnp.int32),
        "first_pos": jnp.zeros((B,), jnp.int32),
        "ids": jnp.zeros((B,), jnp.uint32),
    }
    return _constrain(state, spec.mesh)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def refill(params, state, batch, prefix, knobs, *, spec: LoopSpec):
    """Prefill new prompts in ONE batched call and insert them into free slots of ``state``.

    batch: ``make_batch`` arrays for ``Bp`` rows (tokens/positions/segment_ids [Bp, Tp],
    left-padded; first_pos, ids, active, empty [Bp]) plus ``slots`` int32 [Bp]: the slot each
    row goes to (``B`` or more for a pad row: dropped). Tp must be <= the state's prompt part.
    Each row's step-0 token is sampled here (as the static ``prefill`` does). ``prefix``: None or
    ``PrefixState.arrays()``. Returns the new state.
    """
    c = spec.config
    tokens = batch["tokens"]
    Bp, Tp = tokens.shape
    G = state["tokens"].shape[1]
    S = state["cache"]["pos"].shape[1]
    base = S - G
    dtype = jnp.dtype(c.dtype)
    kv_shape = (c.num_layers, Bp, Tp, c.num_kv_heads, c.head_dim)
    small = {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype),
             "pos": jnp.zeros((Bp, Tp), jnp.int32), "seg": jnp.zeros((Bp, Tp), jnp.int32)}
    small = {k: shd.constrain(v, CACHE_AXES[k], spec.mesh) for k, v in small.items()}
    pkv = None if prefix is None else {k: prefix[k] for k in ("k", "v", "pos", "seg")}
    logits, small = forward(params, c, tokens, positions=batch["positions"],
                            segment_ids=batch["segment_ids"], cache=small, cache_index=0,
                            prefix=pkv, mesh=spec.mesh,
                            logits_at=jnp.full((Bp,), Tp - 1, jnp.int32))
    logits = logits[:, 0]
    if prefix is not None:
        logits = jnp.where(batch["empty"][:, None], prefix["last_logits"], logits)
    rows = {"tokens": jnp.zeros((Bp, G), jnp.int32), "t": jnp.zeros((Bp,), jnp.int32),
            "done": ~batch["active"], "n_valid": jnp.zeros((Bp,), jnp.int32),
            "ids": batch["ids"]}
    rows = _sample_rows(rows, logits, knobs, spec)
    slots = batch["slots"]

    def ins(a, v):  # rows of ``a`` at ``slots`` <- v (pad rows dropped)
        return a.at[slots].set(v, mode="drop")

    cache = state["cache"]
    pos = jnp.zeros((Bp, S), jnp.int32).at[:, base - Tp:base].set(small["pos"])
    seg = jnp.zeros((Bp, S), jnp.int32).at[:, base - Tp:base].set(small["seg"])
    layers = []
    for i, (ck, cv) in enumerate(cache["layers"]):
        nk = jnp.swapaxes(small["k"][i], 1, 2).astype(ck.dtype)  # [Bp, KV, Tp, hd]
        nv = jnp.swapaxes(small["v"][i], 1, 2).astype(cv.dtype)
        layers.append((ck.at[slots, :, base - Tp:base].set(nk, mode="drop"),
                       cv.at[slots, :, base - Tp:base].set(nv, mode="drop")))
    out = dict(state, cache={"layers": layers, "pos": ins(cache["pos"], pos),
                             "seg": ins(cache["seg"], seg)})
    for k in ("tokens", "t", "done", "n_valid", "ids"):
        out[k] = ins(state[k], rows[k])
    out["first_pos"] = ins(state["first_pos"], batch["first_pos"].astype(jnp.int32))
    return _constrain(out, spec.mesh)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def decode_chunk(params, state, knobs, steps, min_free, prefix=None, *, spec: LoopSpec):
    """Decode every slot for at most ``steps`` steps; stop early once ``min_free`` rows are done.

    ``steps`` and ``min_free`` are dynamic int32 scalars (one compiled program for any chunk).
    Done rows are computed but neither written nor advanced. Returns ``(state, steps_run)``.
    """
    c = spec.config
    B, G = state["tokens"].shape
    base = state["cache"]["pos"].shape[1] - G
    rows = jnp.arange(B)
    prefix_pos = _prefix_pos(prefix)
    weights = _layer_weights(params, c, prefix, B, spec.unstack_layers)

    def cond(carry):
        i, s = carry
        return (i < steps) & (jnp.sum(s["done"].astype(jnp.int32)) < min_free)

    def body(carry):
        i, s = carry
        t = s["t"]
        tok = s["tokens"][rows, jnp.maximum(t - 1, 0)][:, None]
        pos = (s["first_pos"] + t - 1)[:, None]
        logits, cache = _forward_rows(params, weights, c, tok, pos, s["cache"], base + t - 1,
                                      prefix_pos, spec.mesh)
        return i + 1, _sample_rows(dict(s, cache=cache), logits[:, 0], knobs, spec)

    n, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    return _constrain(state, spec.mesh), n


# ----------------------------------------------------------------------------- host loop
def rows_bucket(k: int, slots: int, multiple: int = 1) -> int:
    """Rows of a refill prefill for ``k`` prompts: a quarter of the slots (rounded up to
    ``multiple``) times a power of two, at most ``slots``."""
    b = round_up(max(1, slots // REFILL_FRACTION), multiple)
    while b < k and b < slots:
        b *= 2
    return min(b, slots)


def _to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    out = {}
    for k, v in batch.items():
        axes = ("batch", "length") if v.ndim == 2 else ("batch",)
        sh = None if mesh is None else shd.named_sharding(mesh, axes, v.shape)
        out[k] = to_device(v, sh)
    return out


def _rows_per_device_batch(mesh) -> int:
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def run_engine(model, prompts: list[list[int]], *, spec: LoopSpec, knobs: dict,
               row_ids: np.ndarray, prefix=None, batch_size: int = 32,
               is_stopped: Callable[[int, list[int]], bool] | None = None,
               stop_check_every: int = 16, progress=None, compile_only: bool = False,
               on_finish: Callable[[int, list[int]], None] | None = None,
               stats: dict | None = None) -> list[list[int]]:
    """The continuous-batching loop behind ``generate(..., engine="continuous")``: new tokens per
    prompt (EOS excluded), in input order; its arguments are already checked.

    ``batch_size``: decode slots (rounded up to the mesh's batch shards). ``on_finish(i,
    tokens)``: called as soon as prompt ``i`` is finished (before the call returns), e.g. to
    write records as they come. ``stats``: a dict that gets ``slot_steps`` (slots x steps run,
    prefills counted as one step of their rows), ``tokens`` (tokens returned), ``chunks``,
    ``refills``, ``programs`` (compiled (kind, shape) keys). ``compile_only``: compile the decode
    program and the refill programs for every (rows bucket, length bucket) the prompts may
    need, run nothing, return [].
    """
    if prefix is not None and not prefix.matches(model):
        raise UserError("shared_prefix was prefilled with different model weights or config; "
                        "prefill it again for this model")
    if jax.process_count() > 1:
        raise UserError("engine='continuous' runs on one process only; use engine='static' "
                        "with several processes")
    n = len(prompts)
    if n == 0:
        return []
    max_new = int(knobs["max_new"])
    p_len = 0 if prefix is None else prefix.length
    mult = _rows_per_device_batch(model.mesh)
    B = round_up(min(batch_size, n), mult)
    G = bucket(max_new)
    longest = max(len(p) for p in prompts)
    Tb = bucket(longest)
    if p_len + longest + max_new > model.config.max_seq_len:
        warnings.warn(f"prompt ({p_len + longest} tokens) + max_new_tokens ({max_new}) exceeds the "
                      f"model's max_seq_len {model.config.max_seq_len}", stacklevel=3)
    params = model.params
    prefix_arrays = None if prefix is None else prefix.arrays()
    st = stats if stats is not None else {}
    st.update(slot_steps=0, tokens=0, chunks=0, refills=0, programs=set())
    state = empty_state(spec=spec, slots=B, prompt_len=Tb, gen_len=G)
    if compile_only:
        _compile_all(params, state, prompts, prefix_arrays, knobs, spec, B, mult, p_len, st)
        return []
    order = collections.deque(sorted(range(n), key=lambda i: -len(prompts[i])))
    slot_ex = np.full(B, -1, np.int64)
    last_nv = np.zeros(B, np.int32)
    results: list[list[int]] = [[] for _ in range(n)]
    chunk = stop_check_every if is_stopped is not None else G
    quarter = max(1, B // REFILL_FRACTION)
    bar, own_bar = progress_bar(progress, n, math.ceil(n / B))
    done_sh = None if model.mesh is None else shd.named_sharding(model.mesh, ("batch",), (B,))
    try:
        while True:
            free = np.flatnonzero(slot_ex < 0)
            if len(free) and order:
                take = [order.popleft() for _ in range(min(len(free), len(order)))]
                Bp = rows_bucket(len(take), B, mult)
                Tp = bucket(max(len(prompts[i]) for i in take))
                host = make_batch([prompts[i] for i in take], row_ids[take], length=Tp, batch=Bp,
                                  prefix_len=p_len)
                host["slots"] = np.full(Bp, B, np.int32)
                host["slots"][:len(take)] = free[:len(take)]
                state = refill(params, state, _to_device(host, model.mesh), prefix_arrays, knobs,
                               spec=spec)
                slot_ex[free[:len(take)]] = take
                last_nv[free[:len(take)]] = 0
                st["refills"] += 1
                st["slot_steps"] += Bp
                st["programs"].add(("refill", Bp, Tp))
            if not (slot_ex >= 0).any():
                break
            min_free = min(quarter, len(order)) if order else B
            state, steps = decode_chunk(params, state, knobs, np.int32(chunk), np.int32(min_free),
                                        prefix_arrays, spec=spec)
            st["programs"].add(("decode", B, Tb, G))
            st["chunks"] += 1
            st["slot_steps"] += B * int(steps)
            done = local_rows(state["done"]).copy()
            nv = local_rows(state["n_valid"])
            live = slot_ex >= 0
            if is_stopped is not None or (done & live).any():
                toks = local_rows(state["tokens"])
            if is_stopped is not None:
                hit = False
                for b in np.flatnonzero(live & ~done):
                    if nv[b] != last_nv[b] and is_stopped(int(slot_ex[b]), toks[b, :nv[b]].tolist()):
                        done[b] = hit = True
                last_nv = nv.copy()
                if hit:
                    state = dict(state, done=to_device(done, done_sh))
            finished = np.flatnonzero(done & live)
            for b in finished:
                i = int(slot_ex[b])
                results[i] = toks[b, :nv[b]].tolist()
                st["tokens"] += len(results[i])
                slot_ex[b] = -1
                if on_finish is not None:
                    on_finish(i, results[i])
            if bar is not None and len(finished):
                bar.update(len(finished), int(sum(nv[b] for b in finished)))
    finally:
        if bar is not None and own_bar:
            bar.close()
    return results


def _compile_all(params, state, prompts, prefix_arrays, knobs, spec, B, mult, p_len, st):
    """Ahead-of-time compile decode_chunk and every refill program the prompts may need."""
    decode_chunk.lower(params, state, knobs, np.int32(1), np.int32(1), prefix_arrays,
                       spec=spec).compile()
    st["programs"].add(("decode",) + tuple(state["tokens"].shape))
    n = len(prompts)
    row_buckets = sorted({rows_bucket(k, B, mult) for k in range(1, min(n, B) + 1)})
    for Tp in sorted({bucket(len(p)) for p in prompts}):
        for Bp in row_buckets:
            host = make_batch([], np.zeros(0, np.uint32), length=Tp, batch=Bp, prefix_len=p_len)
            host["slots"] = np.full(Bp, B, np.int32)
            mesh = spec.mesh
            refill.lower(params, state, _to_device(host, mesh), prefix_arrays, knobs,
                         spec=spec).compile()
            st["programs"].add(("refill", Bp, Tp))
