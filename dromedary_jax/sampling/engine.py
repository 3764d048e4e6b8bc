"""Continuous-batching generation engine (``engine="continuous"`` of ``generate``/``generate_text``).

The static path (``api.run_batches``) decodes a batch until its LAST row is done, so a row that
stopped at token 20 idles through the others' 256. The engine keeps a fixed number of decode
slots (the batch size) and refills a finished row's slot with the next waiting prompt:

* one state of ``B`` slots: per slot a KV cache of ``S = Tb + G`` slots (``Tb``: the bucket of the
  longest prompt of the call, ``G``: ``buckets.gen_slots(max_new_tokens)``), kept per layer as
  k [B, KV, hd, S], v [B, KV, S, hd] (the CPU decode path's layout, see ``step_forward``).
  A row's prompt sits LEFT-padded in ``[Tb - Tp, Tb)``, its step ``t`` writes slot
  ``Tb + t - 1``. The shared prefix stays ONE ``[L, 1, P, KV, hd]`` copy attended by every
  slot, as in the static path.
* per-row step counters ``t [B]``: each step samples row ``b`` at its own ``t[b]`` and scatters
  its new k/v at its own cache slot; done rows do not advance.
* :func:`decode_chunk` runs a ``lax.while_loop`` for at most ``steps`` steps, and exits early when
  some process has ``min_free`` of its rows done (a quarter of its slots while it has prompts
  waiting) or all rows are.
* the tail: once no prompt waits, the live rows are gathered into half as many slots
  (:func:`compact`) whenever they fit, down to a quarter of the slots, so the last long rows do
  not pay for a full batch of empty slots.
* on the host, finished rows are taken out (``on_finish`` streams them) and the free slots are
  refilled: the waiting prompts are prefilled in ONE batched call (rows bucketed to a quarter of
  the slots times a power of two, lengths bucketed as in ``buckets``) into a small cache that the
  same jit'ed :func:`refill` inserts into the free rows, with each row's first token sampled.

Randomness: the sample of example ``id`` at step ``t`` uses ``fold_in(fold_in(key(seed), id), t)``
(``logits_processing.row_keys``) exactly as the static path does, so an example's text depends
on (seed, example id) only: not on the slot count, the order of arrival or the refill timing.
Stop strings are checked on the host after every chunk of ``stop_check_every`` steps, and a
chunk also ends right after a running row samples a *trigger* token (one that can complete a
stop string, ``stop_strings.stop_trigger_mask``), so a stopped row's slot is refilled at once
instead of idling to the chunk's end (a row's tokens after its stop string are cut off by the
caller, as in the static path). The fused per-layer weights of the CPU decode path are made
once per call (:func:`layer_weights`), so a short chunk costs only its steps.

Several processes (multi-host): each process runs its OWN slots over its OWN prompts (its
rows of the global state, as the static path feeds its rows of a batch) and gets only its own
results. The device programs are collectives, so every process calls the same sequence: before
each refill the processes exchange a few integers (rows and length buckets needed, live rows,
prompts waiting) and all call ``refill`` with the largest buckets (a process with nothing to
refill passes pad rows) and ``decode_chunk``, until no process has work left.

Programs: one ``decode_chunk`` per (slots, Tb, G, spec) for the slots and each tail size, one
``refill`` per (rows bucket, length bucket), one ``compact`` per tail size.
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
    unembed,
)
from dromedary_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from dromedary_jax.sampling.buckets import bucket, gen_slots, round_up
from dromedary_jax.sampling.decode_loop import LoopSpec, layer_weights
from dromedary_jax.sampling.host import (
    all_values,
    batch_rows_per_process,
    batch_to_device,
    check_model_and_prefix,
    global_maxes,
    local_row_indices,
    local_rows,
    make_batch,
    progress_bar,
    to_device,
)
from dromedary_jax.sampling.logits_processing import apply_penalties, row_keys, sample
from dromedary_jax.sampling.step_forward import decode_layers
from dromedary_jax.sampling.stop_strings import mark_stopped

ENGINES = ("static", "continuous")
REFILL_FRACTION = 4  # a chunk exits once 1/REFILL_FRACTION of the slots are free (prompts waiting)
TAIL_FRACTION = 4  # in the tail the slots are halved down to 1/TAIL_FRACTION of the first count


def check_engine(engine) -> str:
    """``engine`` argument -> "static" or "continuous"; anything else is a UserError."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
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


def _forward_rows(params, weights, c, tokens, positions, cache, idx, prefix, mesh):
    """One decode step where row ``b`` writes its new k/v at its own cache slot ``idx[b]``.

    tokens/positions [B, 1]; cache: per-layer (k [B, KV, hd, S], v [B, KV, S, hd]), pos/seg
    [B, S]; prefix: pos/seg [1, P] (its k/v are in ``weights``). The layers are
    ``step_forward.decode_layers`` on the CPU path's weights (or :func:`_stacked_layers` on the
    stacked ones), as in the static path, with a scatter of each row's k/v instead of one shared
    slot. Returns (logits float32 [B, V], cache)."""
    B, T = tokens.shape
    rows = jnp.arange(B)
    segs = jnp.ones((B, T), jnp.int32)
    kv_pos = cache["pos"].at[rows, idx].set(positions[:, 0])
    kv_seg = cache["seg"].at[rows, idx].set(1)
    mask = attention_mask(positions, segs, kv_pos, kv_seg)
    pmask = None if prefix is None else prefix_mask(positions, segs, prefix)

    def write_kv(ck, cv, k, v):  # k/v [B, KV, hd] -> row b's slot idx[b]
        ck = ck.at[rows, :, :, idx].set(k)
        cv = cv.at[rows, :, idx].set(v)
        return shd.constrain(ck, _kv_axes(), mesh), shd.constrain(cv, _kv_axes(), mesh)

    layers = decode_layers if "wqkv_t" in weights["layers"][0] else _stacked_layers
    logits, new_layers = layers(params, weights, c, tokens, positions, cache["layers"], write_kv,
                                mask, pmask, mesh)
    return logits, {"layers": new_layers, "pos": kv_pos, "seg": kv_seg}


def _stacked_layers(params, weights, c, tokens, positions, layers, write_kv, mask, pmask, mesh):
    """``step_forward.decode_layers`` (same arguments and result) on the model's stacked
    weights, slicing each layer's out of them inside the step, with row-major activations as
    ``llama.forward``: the decode step off CPU (``LoopSpec.unstack_layers`` False)."""
    dtype = jnp.dtype(c.dtype)
    x = embed_tokens(params, tokens, dtype, mesh)
    cos, sin = rope_tables(positions, inverse_frequencies(c))
    new_layers = []
    for i, (ck, cv) in enumerate(layers):
        p = dict(weights["layers"][i], **{k: params[k][i] for k in LAYER_KEYS})
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        q, k, v = (dense(h, p[w], 1) for w in ("wq", "wk", "wv"))
        q = shd.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None), mesh)
        k = apply_rope(k, cos, sin)
        ck, cv = write_kv(ck, cv, k[:, 0].astype(ck.dtype), v[:, 0].astype(cv.dtype))
        new_layers.append((ck, cv))
        pk, pv = p.get("prefix_k"), p.get("prefix_v")
        o = attend_cached(q, ck.astype(dtype), cv.astype(dtype), mask,
                          None if pk is None else pk.astype(dtype),
                          None if pv is None else pv.astype(dtype), pmask, layout="keys_transposed")
        x = shd.constrain(x + dense(o, p["wo"], 2), ("batch", "length", "act_embed"), mesh)
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
        a = jax.nn.silu(dense(h, p["w_gate"], 1)) * dense(h, p["w_up"], 1)
        a = shd.constrain(a, ("batch", "length", "act_mlp"), mesh)
        x = shd.constrain(x + dense(a, p["w_down"], 1), ("batch", "length", "act_embed"), mesh)
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    return unembed(params, c, x, mesh)[:, 0], new_layers


def _prefix_pos(prefix):
    return None if prefix is None else {"pos": prefix["pos"], "seg": prefix["seg"]}


@functools.partial(jax.jit, static_argnames=("spec", "slots", "prompt_len", "gen_len"))
def empty_state(*, spec: LoopSpec, slots: int, prompt_len: int, gen_len: int):
    """The engine state with every slot free (done, nothing in its cache):

        cache      per-layer (k [B, KV, hd, S], v [B, KV, S, hd]) with S = prompt_len + gen_len,
                   pos/seg [B, S]
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
    k_shape, v_shape = (B, c.num_kv_heads, c.head_dim, S), (B, c.num_kv_heads, S, c.head_dim)
    state = {
        "cache": {"layers": [(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype))
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
        nk = jnp.transpose(small["k"][i], (0, 2, 3, 1)).astype(ck.dtype)  # [Bp, KV, hd, Tp]
        nv = jnp.swapaxes(small["v"][i], 1, 2).astype(cv.dtype)  # [Bp, KV, Tp, hd]
        layers.append((ck.at[slots, :, :, base - Tp:base].set(nk, mode="drop"),
                       cv.at[slots, :, base - Tp:base].set(nv, mode="drop")))
    out = dict(state, cache={"layers": layers, "pos": ins(cache["pos"], pos),
                             "seg": ins(cache["seg"], seg)})
    for k in ("tokens", "t", "done", "n_valid", "ids"):
        out[k] = ins(state[k], rows[k])
    out["first_pos"] = ins(state["first_pos"], batch["first_pos"].astype(jnp.int32))
    return _constrain(out, spec.mesh)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def decode_chunk(params, weights, state, knobs, steps, min_free, every_group, group, prefix=None,
                 *, spec: LoopSpec):
    """Decode every slot for at most ``steps`` steps (``weights``: :func:`layer_weights`); stop
    early once every row is done or, for some process ``p`` (``every_group``: for every
    process), ``min_free[p]`` of its rows are (a process with no prompt waiting passes more
    than its slot count).

    ``steps``: a dynamic int32 scalar (one compiled program for any chunk); ``min_free``: int32
    [processes], the same on every process; ``every_group``: a bool scalar (the tail: stop once
    every process can gather its rows into fewer slots); ``group``: int32 [B], the process
    owning each row (sharded as the rows). The chunk also ends after a step where a running
    row sampled a token of ``knobs["stop_trigger"]`` (bool [V]: a stop string may have
    completed; see ``stop_strings.stop_trigger_mask``), so the host checks it at once. Done rows
    are computed but neither written nor advanced. Returns ``(state, steps_run)``.
    """
    c = spec.config
    B, G = state["tokens"].shape
    base = state["cache"]["pos"].shape[1] - G
    rows = jnp.arange(B)
    prefix_pos = _prefix_pos(prefix)

    def cond(carry):
        i, s, triggered = carry
        done_per_group = jnp.zeros(min_free.shape, jnp.int32).at[group].add(
            s["done"].astype(jnp.int32))
        reached = done_per_group >= min_free
        enough = jnp.where(every_group, jnp.all(reached), jnp.any(reached))
        return (i < steps) & ~jnp.all(s["done"]) & ~enough & ~triggered

    def body(carry):
        i, s, _ = carry
        t = s["t"]
        tok = s["tokens"][rows, jnp.maximum(t - 1, 0)][:, None]
        pos = (s["first_pos"] + t - 1)[:, None]
        logits, cache = _forward_rows(params, weights, c, tok, pos, s["cache"], base + t - 1,
                                      prefix_pos, spec.mesh)
        s2 = _sample_rows(dict(s, cache=cache), logits, knobs, spec)
        new = s2["tokens"][rows, jnp.minimum(t, G - 1)]  # this step's token of each row
        triggered = jnp.any(knobs["stop_trigger"][new] & ~s["done"])
        return i + 1, s2, triggered

    n, state, _ = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), state, jnp.zeros((), bool)))
    return _constrain(state, spec.mesh), n


@functools.partial(jax.jit, static_argnames=("spec",))
def compact(state, keep, pad, *, spec: LoopSpec):
    """The state of ``len(keep)`` slots holding rows ``keep`` (int32 [B'], global row indices) of
    ``state``; rows where ``pad`` (bool [B']) is true are marked done (free). Every array is
    gathered along its row axis; the cache keeps its length."""
    def rows(a):
        return jnp.take(a, keep, axis=0)

    cache = state["cache"]
    out = {"cache": {"layers": [(rows(k), rows(v)) for k, v in cache["layers"]],
                     "pos": rows(cache["pos"]), "seg": rows(cache["seg"])}}
    for k in ("tokens", "t", "done", "n_valid", "first_pos", "ids"):
        out[k] = rows(state[k])
    out["done"] = out["done"] | pad
    return _constrain(out, spec.mesh)


def tail_slots(live: int, slots: int, multiple: int, smallest: int) -> int:
    """Slots for ``live`` rows in the tail: ``slots`` halved while the half still holds them, is
    a multiple of ``multiple`` and is at least ``smallest``."""
    while (slots % 2 == 0 and slots // 2 >= max(live, smallest, 1)
           and (slots // 2) % multiple == 0):
        slots //= 2
    return slots


# ----------------------------------------------------------------------------- host loop
def rows_bucket(k: int, slots: int, multiple: int = 1) -> int:
    """Rows of a refill prefill for ``k`` prompts: a quarter of the slots (rounded up to
    ``multiple``) times a power of two, at most ``slots``."""
    b = round_up(max(1, slots // REFILL_FRACTION), multiple)
    while b < k and b < slots:
        b *= 2
    return min(b, slots)


def run_engine(model, prompts: list[list[int]], *, spec: LoopSpec, knobs: dict,
               row_ids: np.ndarray, prefix=None, batch_size: int = 32,
               is_stopped: Callable[[int, list[int]], bool] | None = None,
               stop_check_every: int = 16, progress=None, compile_only: bool = False,
               on_finish: Callable[[int, list[int]], None] | None = None,
               stats: dict | None = None,
               stop_trigger: np.ndarray | None = None) -> list[list[int]]:
    """The continuous-batching loop behind ``generate(..., engine="continuous")``: new tokens per
    prompt (EOS excluded), in input order; its arguments are already checked.

    ``batch_size``: decode slots of this process (rounded up to its batch shards). With several
    processes each passes its own prompts (possibly none) and gets its own results; every
    process must make the call. ``on_finish(i, tokens)``: called as soon as prompt ``i`` is
    finished (before the call returns), e.g. to write records as they come. ``stats``: a dict
    that gets ``slot_steps`` (slots x steps run, prefills counted as one step of their rows;
    this process's slots), ``tokens`` (tokens returned), ``chunks``, ``refills``,
    ``compactions`` (tail gathers into fewer slots), ``programs`` (the (kind, shape) keys of the
    programs used). ``compile_only``: compile the decode and compact programs of every slot
    count the tail may use and the refill programs of every (rows bucket, length bucket) the
    prompts may need, run nothing, return []. ``stop_trigger``: bool [vocab] (with
    ``is_stopped``), the tokens after which a chunk ends for a stop-string check
    (``stop_strings.stop_trigger_mask``); None: chunks end every ``stop_check_every`` steps.
    """
    check_model_and_prefix(model, prefix)
    n = len(prompts)
    max_new = int(knobs["max_new"])
    p_len = 0 if prefix is None else prefix.length
    n_all, longest = global_maxes([n, max((len(p) for p in prompts), default=1)])
    st = stats if stats is not None else {}
    st.update(slot_steps=0, tokens=0, chunks=0, refills=0, compactions=0, programs=set())
    if n_all == 0:
        return []
    procs = jax.process_count()
    mult = batch_rows_per_process(model.mesh)
    B = round_up(min(batch_size, n_all), mult)  # this process's slots
    G, Tb = gen_slots(max_new), bucket(longest)
    if p_len + longest + max_new > model.config.max_seq_len:
        warnings.warn(f"prompt ({p_len + longest} tokens) + max_new_tokens ({max_new}) exceeds the "
                      f"model's max_seq_len {model.config.max_seq_len}", stacklevel=3)
    params = model.params
    prefix_arrays = None if prefix is None else prefix.arrays()
    vocab = model.config.vocab_size
    trigger = np.zeros(vocab, bool) if stop_trigger is None else np.asarray(stop_trigger, bool)
    if trigger.shape != (vocab,):
        raise ValueError(f"stop_trigger must be a bool array of shape ({vocab},), got "
                         f"{trigger.shape}")
    knobs = dict(knobs, stop_trigger=trigger)
    state = _placed(empty_state(spec=spec, slots=B * procs, prompt_len=Tb, gen_len=G), params,
                    model.mesh)
    smallest = round_up(max(1, B // TAIL_FRACTION), mult)
    if compile_only:
        _compile_all(params, state, prompts, prefix_arrays, knobs, spec, B, mult, p_len, st,
                     n_all=n_all, longest=longest, smallest=smallest)
        return []
    done_sh, rows_global, group = _slot_layout(state, B, model.mesh)
    weights = layer_weights(params, prefix_arrays, spec=spec)
    order = collections.deque(sorted(range(n), key=lambda i: -len(prompts[i])))
    slot_ex = np.full(B, -1, np.int64)
    last_nv = np.zeros(B, np.int32)
    results: list[list[int]] = [[] for _ in range(n)]
    chunk = stop_check_every if is_stopped is not None else G
    quarter = max(1, B // REFILL_FRACTION)
    bar, own_bar = progress_bar(progress, n, math.ceil(n / B))
    try:
        while True:
            free = np.flatnonzero(slot_ex < 0)
            take = [order.popleft() for _ in range(min(len(free), len(order)))]
            need = [rows_bucket(len(take), B, mult) if take else 0,
                    bucket(max(len(prompts[i]) for i in take)) if take else 0]
            live = int((slot_ex >= 0).sum()) + len(take)
            min_free = min(quarter, len(order)) if order else B + 1  # B + 1: never
            every = all_values(need + [live, min_free, len(order)])  # [processes, 5], everywhere
            Bp, Tp = int(every[:, 0].max()), int(every[:, 1].max())
            if Bp:
                host = make_batch([prompts[i] for i in take], row_ids[take], length=Tp, batch=Bp,
                                  prefix_len=p_len)
                host["slots"] = np.full(Bp, B * procs, np.int32)  # pad rows: dropped
                host["slots"][:len(take)] = rows_global[free[:len(take)]]
                state = refill(params, state, batch_to_device(host, model.mesh), prefix_arrays,
                               knobs, spec=spec)
                slot_ex[free[:len(take)]] = take
                last_nv[free[:len(take)]] = 0
                st["refills"] += 1
                st["slot_steps"] += Bp
                st["programs"].add(("refill", Bp, Tp))
            if not every[:, 2].any():
                break
            thresholds, tail = every[:, 3].astype(np.int32), False
            if not every[:, 4].any():  # the tail: no prompt waits on any process
                small = tail_slots(int(every[:, 2].max()), B, mult, smallest)
                if small < B:
                    state, slot_ex, last_nv = _compact(state, slot_ex, last_nv, rows_global, small,
                                                       model.mesh, spec)
                    B = small
                    done_sh, rows_global, group = _slot_layout(state, B, model.mesh)
                    st["compactions"] += 1
                    st["programs"].add(("compact", B * procs))
                half = tail_slots(B // 2, B, mult, smallest)  # exit the chunk when it fits
                thresholds, tail = np.full(procs, B - half if half < B else B + 1, np.int32), True
            state, steps = decode_chunk(params, weights, state, knobs, np.int32(chunk), thresholds,
                                        np.bool_(tail), group, prefix_arrays, spec=spec)
            st["programs"].add(("decode", B * procs, Tb, G))
            st["chunks"] += 1
            st["slot_steps"] += B * int(steps)
            state = _take_finished(state, slot_ex, last_nv, results, is_stopped, on_finish, bar,
                                   st, done_sh)
    finally:
        if bar is not None and own_bar:
            bar.close()
    return results


def _rows_sharding(mesh, slots: int):
    """The sharding of a per-row array of ``slots`` slots per process (None without a mesh)."""
    if mesh is None:
        return None
    return shd.named_sharding(mesh, ("batch",), (slots * jax.process_count(),))


def _placed(state, params, mesh):
    """The empty state committed to the parameters' device when there is no mesh: every later
    state is a program's output (committed), and jit compiles again for an argument whose
    placement changes, so the ahead-of-time programs and the run must see the same."""
    if mesh is not None:
        return state
    return jax.device_put(state, next(iter(jax.tree.leaves(params)[0].devices())))


def _slot_layout(state, B: int, mesh):
    """(the rows' sharding, the global row of each of this process's ``B`` slots in
    ``local_rows`` order, the per-row owner array ``group`` for ``decode_chunk``). Arrays the
    host uploads between programs (``done`` after a stop string, ``group``) keep the state's
    placement, so no program is compiled again for them."""
    done_sh = state["done"].sharding
    rows_global = local_row_indices(done_sh, B * jax.process_count())
    return done_sh, rows_global, to_device(np.full(B, jax.process_index(), np.int32), done_sh)


def _compact(state, slot_ex, last_nv, rows_global, small: int, mesh, spec):
    """Gather this process's live slots into ``small`` slots (every process calls it with the
    same ``small``); returns (state, slot_ex, last_nv) for the new slots."""
    live = np.flatnonzero(slot_ex >= 0)
    pad = small - len(live)
    keep = np.concatenate([rows_global[live], np.full(pad, rows_global[0])]).astype(np.int32)
    is_pad = np.arange(small) >= len(live)
    sh = _rows_sharding(mesh, small)
    state = compact(state, to_device(keep, sh), to_device(is_pad, sh), spec=spec)
    return (state, np.concatenate([slot_ex[live], np.full(pad, -1, slot_ex.dtype)]),
            np.concatenate([last_nv[live], np.zeros(pad, last_nv.dtype)]))


def _take_finished(state, slot_ex, last_nv, results, is_stopped, on_finish, bar, st, done_sh):
    """After a chunk: mark this process's rows that hit a stop string as done (uploading
    ``done`` again), take out its finished rows (``results``, ``on_finish``, freeing the slot in
    ``slot_ex``), update ``last_nv`` and the bar in place. Returns the state."""
    done = local_rows(state["done"]).copy()
    nv = local_rows(state["n_valid"])
    live = slot_ex >= 0
    if is_stopped is not None or (done & live).any():
        toks = local_rows(state["tokens"])
    if is_stopped is not None:
        hit = mark_stopped(done, nv, last_nv, toks, slot_ex, is_stopped, np.flatnonzero(live))
        last_nv[:] = nv
        if hit or jax.process_count() > 1:  # several processes: each uploads its rows
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
    return state


def _compile_all(params, state, prompts, prefix_arrays, knobs, spec, B, mult, p_len, st, *,
                 n_all: int, longest: int, smallest: int):
    """Ahead-of-time compile the decode and compact programs of every slot count the run may
    use and every refill program the prompts may need (``n_all`` / ``longest``: the most
    prompts / the longest prompt of any process)."""
    procs = jax.process_count()
    sizes = [B]
    while tail_slots(1, sizes[-1], mult, smallest) < sizes[-1]:
        sizes.append(tail_slots(sizes[-1] // 2, sizes[-1], mult, smallest))
    cur = state
    weights = layer_weights(params, prefix_arrays, spec=spec)
    for b in sizes:
        sh = _rows_sharding(spec.mesh, b)
        if b != B:  # the tail: run the (cheap) gather on the empty state for the next shapes
            cur = compact(cur, to_device(np.zeros(b, np.int32), sh), to_device(np.ones(b, bool), sh),
                          spec=spec)
            st["programs"].add(("compact", b * procs))
        decode_chunk.lower(params, weights, cur, knobs, np.int32(1), np.ones(procs, np.int32),
                           np.bool_(False), _slot_layout(cur, b, spec.mesh)[2], prefix_arrays,
                           spec=spec).compile()
        G = cur["tokens"].shape[1]
        st["programs"].add(("decode", b * procs, cur["cache"]["pos"].shape[1] - G, G))
    row_buckets = sorted({rows_bucket(k, B, mult) for k in range(1, min(n_all, B) + 1)})
    for Tp in sorted({bucket(len(p)) for p in prompts} | {bucket(longest)}):
        for Bp in row_buckets:
            host = make_batch([], np.zeros(0, np.uint32), length=Tp, batch=Bp, prefix_len=p_len)
            host["slots"] = np.full(Bp, B * procs, np.int32)
            refill.lower(params, state, batch_to_device(host, spec.mesh), prefix_arrays, knobs,
                         spec=spec).compile()
            st["programs"].add(("refill", Bp, Tp))
