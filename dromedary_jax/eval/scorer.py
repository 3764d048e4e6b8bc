"""Batched log-likelihood scorer: for many ``(context, continuation)`` pairs, the sum of the
continuation tokens' log-probabilities given the context (and whether greedy decoding would
have produced the continuation), as lm-evaluation-harness's ``loglikelihood`` requests.

How it is computed, in bounded memory (no ``[rows, T, vocab]`` logits ever exist):

0. The token prefix shared by EVERY context of the call (TruthfulQA's 6-shot preamble, a
   meta-prompt) is prefilled once per call with the sampler's shared-prefix helper
   (:func:`dromedary_jax.sampling.prefill_prefix`) and attended by every row as ONE copy
   (the ``prefix`` argument of :func:`dromedary_jax.model.llama.forward`).
1. Pairs are grouped by their context ids. A group is laid out as one *chunk*
   ``[context | cont_1[:-1] | cont_2[:-1] | ...]``: the context is run once, each continuation
   attends the context and itself only (a tree mask passed to ``forward`` as ``mask_fn``; each
   continuation's positions restart right after the context). A group too long for a row is
   split into several chunks, each repeating the context.
2. Chunks are packed into rows of ``row_length`` tokens (first fit, longest first; a chunk
   longer than a row gets a row of its own, of a bucketed length), and rows into steps of about
   ``batch_tokens`` tokens. Every step of a call has the same row count and length, except the
   last one and the over-long rows, so a whole evaluation compiles a handful of programs.
3. The forward pass returns final hidden states; only the positions that predict a continuation
   token are gathered and unembedded, ``unembed_chunk`` of them at a time (log-softmax, target
   gather, argmax), so the largest temporary is ``[unembed_chunk, vocab]`` float32.

Rows are sharded over the logical ``batch`` axis of ``model.mesh`` (none: one device);
parameters stay as the model holds them. Each pair's result depends only on its own tokens, so
results do not depend on ``batch_tokens``, the packing or the mesh, up to float rounding.

Tokenization (:func:`encode_pair`) follows lm-evaluation-harness (0.4.x ``_encode_pair`` and
``loglikelihood``): trailing whitespace of the context moves to the front of the continuation;
the context is encoded with BOS when ``add_bos`` says so, which by default (``None``) is the
tokenizer's own rule (``tokenizer.add_bos``: the tokenizer_config / tokenizer.json / GGUF flag;
SmolLM2 adds none, LLaMA-1/2 do), as the harness follows the HF tokenizer; the continuation ids
are ``encode(context + continuation)[len(encode(context)):]`` when the context's ids are a
prefix of the whole's ids (always, in practice), otherwise ``encode(continuation)`` without BOS.
An empty context becomes the prefix token (BOS, or EOS for a tokenizer without BOS), or the
continuation's first token when that already is the prefix token, as the harness does.
Too-long pairs lose context tokens from the left, as the harness does.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.model.llama import CACHE_AXES, forward, init_cache, unembed

Pair = tuple[Sequence[int], Sequence[int]]

# Segment ids of a packed row (int32): 0 is padding; group j (1, 2, ...) of a row has its
# context in segment j * SEG_STRIDE and its continuations in j * SEG_STRIDE + k (k >= 1);
# the shared prefix's keys carry PREFIX_SEG, which every non-padding query attends.
SEG_STRIDE = 1 << 12
PREFIX_SEG = -1


# ----------------------------------------------------------------------------- tokenization
def tokenizer_add_bos(tokenizer) -> bool:
    """The tokenizer's own BOS rule: ``tokenizer.add_bos`` (True for a tokenizer without one)."""
    return bool(getattr(tokenizer, "add_bos", True))


def resolve_add_bos(tokenizer, add_bos: bool | None) -> bool:
    """``add_bos`` when given (True / False force it), else the tokenizer's own rule."""
    return tokenizer_add_bos(tokenizer) if add_bos is None else bool(add_bos)


def prefix_token_id(tokenizer) -> int:
    """The token an empty context is replaced with: BOS, or EOS for a tokenizer without one."""
    bos = getattr(tokenizer, "bos_id", None)
    return int(bos) if bos is not None and bos >= 0 else int(tokenizer.eos_id)


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool | None = None
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-evaluation-harness does (see module doc)."""
    add_bos = resolve_add_bos(tokenizer, add_bos)
    if not context:
        cont = list(tokenizer.encode(continuation, bos=False))
        pid = prefix_token_id(tokenizer)
        if cont and cont[0] == pid:
            return cont[:1], cont[1:]
        return [pid], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:  # the context was only whitespace
        return encode_pair(tokenizer, "", continuation, add_bos)
    ctx = list(tokenizer.encode(context, bos=add_bos))
    whole = list(tokenizer.encode(context + continuation, bos=add_bos))
    if whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    return ctx, list(tokenizer.encode(continuation, bos=False))


# ----------------------------------------------------------------------------- bucketing
def bucket_length(n: int, minimum: int, per_octave: int = 1) -> int:
    """Round ``n`` up to ``minimum * 2**k``, or with ``per_octave`` > 1 to one of that many
    evenly spaced lengths in each octave above ``minimum`` (2: ..., 48, 64, 96, 128, ...)."""
    b = minimum
    while b < n:
        b *= 2
    if per_octave <= 1 or b == minimum:
        return b
    step = b // (2 * per_octave)
    return -(-n // step) * step


def bucket_count(n: int, cap: int) -> int:
    """Smallest power of two >= n, capped at ``cap`` (n <= cap)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the sequences."""
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for x in seqs[1:]:
        i = 0
        while i < n and x[i] == first[i]:
            i += 1
        n = i
    return n


# ----------------------------------------------------------------------------- jit'ed steps
def tree_mask(q_pos, q_seg, kv_pos, kv_seg):
    """bool [B, T, S]: the packed-row rule (see SEG_STRIDE). A query attends a key at a position
    not after its own when both are non-padding and the key is in the query's own segment, in
    the context segment of the query's group, or in the shared prefix."""
    qs, ks = q_seg[:, :, None], kv_seg[:, None, :]
    causal = kv_pos[:, None, :] <= q_pos[:, :, None]
    group_ctx = (ks % SEG_STRIDE == 0) & (ks // SEG_STRIDE == qs // SEG_STRIDE)
    visible = (ks == qs) | group_ctx | (ks == PREFIX_SEG)
    return causal & visible & (qs != 0) & (ks != 0)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _hidden_step(params, prefix, tokens, positions, segments, *, config, mesh):
    """Final-normed hidden states [B, T, D] of packed rows (tokens/positions/segments [B, T]),
    every row also attending the shared ``prefix`` (None, or k/v [L, 1, P, KV, hd] and pos/seg
    [1, P] with its real keys in PREFIX_SEG)."""
    B, T = tokens.shape
    cache = None
    if prefix is not None:  # forward attends a shared prefix through the cache path
        cache = {k: shd.constrain(v, CACHE_AXES[k], mesh)
                 for k, v in init_cache(config, B, T).items()}
    h, _ = forward(params, config, tokens, positions=positions, segment_ids=segments,
                   cache=cache, cache_index=None if cache is None else 0, prefix=prefix,
                   mask_fn=tree_mask, mesh=mesh, return_hidden=True)
    return h


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _token_scores(params, hidden, index, targets, *, config, mesh):
    """For C scored tokens: hidden [B, T, D], index [C] into the flattened rows, targets [C] ->
    (log p(target) [C] f32, argmax == target [C]), replicated over the mesh."""
    x = jnp.take(hidden.reshape(-1, hidden.shape[-1]), index, axis=0)[None]  # [1, C, D]
    logits = unembed(params, config, x, mesh)[0]  # [C, V] f32
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    hit = jnp.argmax(logits, axis=-1) == targets
    return shd.constrain(tgt - lse, (None,), mesh), shd.constrain(hit, (None,), mesh)


def _put(x: np.ndarray, mesh, axes):
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, shd.named_sharding(mesh, axes, x.shape))


# ----------------------------------------------------------------------------- host planning
def _truncate(ctx: tuple, cont: tuple, max_length: int) -> tuple[tuple, tuple]:
    """Keep at most ``max_length`` input tokens (context + continuation minus the last token),
    dropping context tokens from the left as the harness does."""
    if len(cont) > max_length:
        raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's "
                        f"max_seq_len={max_length}; shorten it or raise max_seq_len")
    keep = max_length + 1 - len(cont)
    if len(ctx) > keep:
        ctx = ctx[len(ctx) - keep:]
    return ctx, cont


def _chunks(groups: dict[tuple, list[int]], conts: list[tuple], P: int, row_length: int):
    """Split each group (context after the shared prefix, its continuations) into chunks that
    fit ``row_length`` (a context with a single over-long continuation is one chunk anyway).
    Returns [(own context ids, [unique pair indices])]."""
    out = []
    for ctx, rows in groups.items():
        own = ctx[P:]
        cur, n = [], len(own)
        for u in sorted(rows, key=lambda i: -len(conts[i])):
            slots = len(conts[u]) - 1
            if cur and (n + slots > row_length or len(cur) == SEG_STRIDE - 1):
                out.append((own, cur))
                cur, n = [], len(own)
            cur.append(u)
            n += slots
        out.append((own, cur))
    return out


def _chunk_length(chunk, conts) -> int:
    own, us = chunk
    return len(own) + sum(len(conts[u]) - 1 for u in us)


def _pack(chunks, conts, row_length: int):
    """First-fit-decreasing packing of chunks into rows. Returns [(row length, [chunks])]; a
    chunk longer than ``row_length`` gets a row of its own, ``row_length * 2**k`` long."""
    order = sorted(range(len(chunks)), key=lambda i: (-_chunk_length(chunks[i], conts), i))
    rows, free = [], []
    for i in order:
        n = _chunk_length(chunks[i], conts)
        if n > row_length:
            rows.append((bucket_length(n, row_length), [chunks[i]]))
            free.append(-1)
            continue
        for r, f in enumerate(free):
            if f >= n:
                rows[r][1].append(chunks[i])
                free[r] -= n
                break
        else:
            rows.append((row_length, [chunks[i]]))
            free.append(row_length - n)
    return rows


def _layout_row(chunks, conts, P: int, T: int):
    """Token, position and segment arrays [T] of one packed row, plus for every scored token
    (slot in the row that predicts it, target id, unique pair index)."""
    tok = np.zeros(T, np.int32)
    pos = np.zeros(T, np.int32)
    seg = np.zeros(T, np.int32)
    slot_l, tgt_l, pair_l = [], [], []
    s = 0
    for j, (own, us) in enumerate(chunks, start=1):
        c = len(own)
        tok[s:s + c] = own
        pos[s:s + c] = P + np.arange(c)
        seg[s:s + c] = j * SEG_STRIDE
        last_ctx = s + c - 1
        s += c
        for k, u in enumerate(us, start=1):
            cont = conts[u]
            n = len(cont) - 1
            tok[s:s + n] = cont[:-1]
            pos[s:s + n] = P + c + np.arange(n)
            seg[s:s + n] = j * SEG_STRIDE + k
            slot_l.append(np.concatenate([[last_ctx], s + np.arange(n)]))
            tgt_l.append(np.asarray(cont, np.int64))
            pair_l.append(np.full(len(cont), u))
            s += n
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return tok, pos, seg, cat(slot_l), cat(tgt_l), cat(pair_l)


def _steps(rows, batch_tokens: int):
    """Group rows of equal length into steps of ``batch_tokens // length`` rows (at least 1).
    Returns [(row length, rows per step (the last one of a length: a power of two), [rows])]."""
    by_len: dict[int, list] = {}
    for T, chunks in rows:
        by_len.setdefault(T, []).append(chunks)
    steps = []
    for T in sorted(by_len, reverse=True):
        rs = by_len[T]
        B = max(1, batch_tokens // T)
        for s in range(0, len(rs), B):
            part = rs[s:s + B]
            steps.append((T, B if len(part) == B else bucket_count(len(part), B), part))
    return steps


def _check_unembed_chunk(n: int) -> int:
    if n < 1:
        raise UserError(f"unembed_chunk must be >= 1, got {n}")
    return int(n)


def loglikelihoods(model, requests: Iterable[Pair], *, batch_tokens: int = 4096,
                   row_length: int = 512, batch_size: int | None = None,
                   max_length: int | None = None, shared_prefix: bool = True,
                   min_shared_prefix: int = 32, prefix_cache=None, unembed_chunk: int = 512,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """``[(sum of continuation log-probs, continuation is the greedy decode), ...]``, one per
    ``(context_ids, continuation_ids)`` request, in order (see the module doc for how).

    Identical requests are scored once; requests with identical context ids share one context
    pass. ``row_length``: tokens of a packed row (attention is dense within a row, so longer
    rows pack better but cost more per token); ``batch_tokens``: tokens run per step (rows x
    row length; ``batch_size``, when given, is the number of rows per step instead). With
    ``shared_prefix``, the token prefix common to EVERY context of the call (e.g. TruthfulQA's
    few-shot preamble), when at least ``min_shared_prefix`` tokens long, is prefilled once with
    the sampler's :func:`~dromedary_jax.sampling.prefill_prefix` (or taken from
    ``prefix_cache``, a :class:`~dromedary_jax.sampling.PrefixCache`) and attended by every row.
    ``max_length`` defaults to ``model.config.max_seq_len``. ``unembed_chunk``: scored tokens
    unembedded at once (the ``[unembed_chunk, vocab]`` float32 logits are the largest array).
    ``progress``: a bar on process 0 over the token positions to run, with tokens/s and an ETA
    (see :mod:`dromedary_jax.progress`).
    """
    if batch_size is not None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        batch_tokens = batch_size * row_length
    if batch_tokens < 1:
        raise UserError(f"batch_tokens must be >= 1, got {batch_tokens}")
    if row_length < 2:
        raise UserError(f"row_length must be >= 2, got {row_length}")
    C = _check_unembed_chunk(unembed_chunk)
    config, mesh = model.config, model.mesh
    max_length = int(max_length or config.max_seq_len)
    keys: list[tuple[tuple, tuple]] = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = tuple(int(t) for t in ctx), tuple(int(t) for t in cont)
        if not ctx:
            raise UserError(f"request {i}: empty context ids (give it a prefix token, e.g. BOS, "
                            f"as encode_pair does for an empty context)")
        keys.append(_truncate(ctx, cont, max_length))
    if not keys:
        return []
    unique: dict[tuple, int] = {}
    for k in keys:
        unique.setdefault(k, len(unique))
    ctxs = [k[0] for k in unique]
    conts = [k[1] for k in unique]
    groups: dict[tuple, list[int]] = {}
    for u, ctx in enumerate(ctxs):
        if conts[u]:  # an empty continuation scores 0 (and is its own greedy decode)
            groups.setdefault(ctx, []).append(u)
    ll = np.zeros(len(unique), np.float64)
    greedy = np.ones(len(unique), bool)
    if not groups:
        return [(float(ll[unique[k]]), bool(greedy[unique[k]])) for k in keys]

    # The prefix every context starts with (each context keeps >= 1 token of its own).
    P = min(common_prefix_length(list(groups)), min(len(c) for c in groups) - 1)
    prefix = None
    if shared_prefix and P >= max(min_shared_prefix, 1):
        from dromedary_jax.sampling.prefix_cache import prefill_prefix

        ids = next(iter(groups))[:P]
        state = prefix_cache.get(model, ids) if prefix_cache is not None else \
            prefill_prefix(model, ids)
        prefix = dict(state.cache)
        prefix["seg"] = jnp.where(prefix["seg"] != 0, PREFIX_SEG, 0).astype(jnp.int32)
    else:
        P = 0

    rows = _pack(_chunks(groups, conts, P, row_length), conts, row_length)
    steps = _steps(rows, batch_tokens)
    from dromedary_jax.progress import progress_bar

    # counts the token positions run (padding included): tok/s and an ETA over the whole call
    bar = progress_bar(sum(T * B for T, B, _ in steps), desc="scoring", unit="tok",
                       unit_scale=True, show=bool(progress))
    params = model.params
    tok_lp, tok_hit, tok_pair = [], [], []
    for T, B, part in steps:
        tok = np.zeros((B, T), np.int32)
        pos = np.zeros((B, T), np.int32)
        seg = np.zeros((B, T), np.int32)
        index, tgt, pair = [], [], []
        for r, chunks in enumerate(part):
            tok[r], pos[r], seg[r], slots, t_ids, u_ids = _layout_row(chunks, conts, P, T)
            index.append(r * T + slots)
            tgt.append(t_ids)
            pair.append(u_ids)
        index, tgt, pair = (np.concatenate(x) for x in (index, tgt, pair))
        hidden = _hidden_step(params, prefix, _put(tok, mesh, ("batch", "length")),
                              _put(pos, mesh, ("batch", "length")),
                              _put(seg, mesh, ("batch", "length")), config=config, mesh=mesh)
        M = len(index)
        pad = -M % C
        index = np.concatenate([index, np.zeros(pad, np.int64)]).astype(np.int32)
        tgt = np.concatenate([tgt, np.zeros(pad, np.int64)]).astype(np.int32)
        outs = [_token_scores(params, hidden, _put(index[s:s + C], mesh, (None,)),
                              _put(tgt[s:s + C], mesh, (None,)), config=config, mesh=mesh)
                for s in range(0, M + pad, C)]
        outs = jax.device_get(outs)
        tok_lp.append(np.concatenate([np.asarray(o[0], np.float64) for o in outs])[:M])
        tok_hit.append(np.concatenate([np.asarray(o[1]) for o in outs])[:M])
        tok_pair.append(pair)
        del hidden
        if bar is not None:
            bar.update(T * B)
    if bar is not None:
        bar.close()
    lp, hit, pair = (np.concatenate(x) for x in (tok_lp, tok_hit, tok_pair))
    ll[:] = np.bincount(pair, weights=lp, minlength=len(unique))
    misses = np.bincount(pair, weights=~hit, minlength=len(unique))
    greedy[:] = misses == 0
    return [(float(ll[unique[k]]), bool(greedy[unique[k]])) for k in keys]


def score_texts(model, tokenizer, pairs: Iterable[tuple[str, str]], *,
                add_bos: bool | None = None, **kw) -> list[tuple[float, bool]]:
    """:func:`loglikelihoods` for ``(context, continuation)`` strings (see :func:`encode_pair`;
    ``add_bos=None``: the tokenizer's own BOS rule)."""
    reqs = [encode_pair(tokenizer, c, x, add_bos=add_bos) for c, x in pairs]
    return loglikelihoods(model, reqs, **kw)
