"""Batched log-likelihood scorer: for many ``(context, continuation)`` pairs, the sum of the
continuation tokens' log-probabilities given the context (and whether greedy decoding would
have produced the continuation), as lm-evaluation-harness's ``loglikelihood`` requests.

How it is computed (the jit'ed :func:`_score_step`, one call per batch of rows):

0. The token prefix shared by EVERY context of the call (TruthfulQA's 6-shot preamble, a
   meta-prompt) is prefilled once per call with the sampler's shared-prefix helper
   (:func:`dromedary_jax.sampling.prefill_prefix`) and broadcast into each step's KV cache.
1. Pairs are grouped by their context ids. Each distinct context (the rest of it: e.g. the
   question) is run ONCE through :func:`dromedary_jax.model.llama.forward` into the KV cache,
   keeping only the logits at its last token.
2. The cache rows are gathered (broadcast) to the rows of that context's continuations, and
   only the continuation tokens are run on top of it (positions continue after the real
   context length). Context padding has segment id 0, so it is never attended to.
3. Log-softmax over the vocabulary, gather the continuation tokens, sum over valid positions.

Shapes are padded to buckets (context length, continuation length; every step of a call has
the same number of rows and of contexts) so a whole evaluation compiles a handful of programs.
Rows are sharded over the logical ``batch`` axis of ``model.mesh`` (none: one device);
parameters stay as the model holds them. Each row's result depends only on its own tokens, so
results do not depend on the batch size or on the mesh, up to float rounding.

Tokenization (:func:`encode_pair`) follows lm-evaluation-harness's ``_encode_pair``: trailing
whitespace of the context moves to the front of the continuation; the context is encoded with
BOS (``add_bos``); the continuation ids are
``encode(context + continuation)[len(encode(context)):]`` when the context's ids are a prefix
of the whole's ids (the usual case with SentencePiece), otherwise ``encode(continuation)``
without BOS. Too-long pairs lose context tokens from the
left, as the harness does.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.model.llama import CACHE_AXES, forward, init_cache

Pair = tuple[Sequence[int], Sequence[int]]


# ----------------------------------------------------------------------------- tokenization
def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = True
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-evaluation-harness does (see module doc)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        ctx = [tokenizer.bos_id]
        return ctx, list(tokenizer.encode(continuation, bos=False))
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


# ----------------------------------------------------------------------------- jit'ed step
def _constrain_cache(cache, mesh):
    return {k: shd.constrain(v, CACHE_AXES[k], mesh) for k, v in cache.items()}


def _empty_cache(config, batch: int, length: int, prefix):
    """Cache for ``batch`` rows with ``length`` free slots, after the shared prefix if any."""
    cache = init_cache(config, batch, length)
    if prefix is None:
        return cache
    out = {}
    for k, v in cache.items():
        pre = prefix[k]
        if k in ("k", "v"):
            pre = jnp.broadcast_to(pre.astype(v.dtype), pre.shape[:1] + (batch,) + pre.shape[2:])
            out[k] = jnp.concatenate([pre, v], axis=2)
        else:
            out[k] = jnp.concatenate([jnp.broadcast_to(pre, (batch, pre.shape[1])), v], axis=1)
    return out


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _score_step(params, prefix, prefix_len, ctx_tokens, ctx_lens, row_group, cont_tokens,
                cont_lens, *, config, mesh):
    """Score one step.

    prefix: None, or a prefilled shared prefix (k/v [L, 1, Pb, KV, hd], pos/seg [1, Pb], as
    :func:`dromedary_jax.sampling.prefill_prefix` makes it) of ``prefix_len`` real tokens that
    every context of the call starts with. ctx_tokens [G, Lc]: each context after that prefix
    (right-padded), ctx_lens [G] their lengths (>= 1). row_group [N]: which context each row
    continues; cont_tokens [N, Tc], cont_lens [N]. Returns (loglik [N] f32, is_greedy [N]), both
    replicated over the mesh."""
    G, Lc = ctx_tokens.shape
    N, Tc = cont_tokens.shape
    Pb = 0 if prefix is None else prefix["seg"].shape[1]
    ar_c = jnp.arange(Lc, dtype=jnp.int32)[None]
    ctx_pos = jnp.broadcast_to(prefix_len + ar_c, (G, Lc))
    ctx_seg = (ar_c < ctx_lens[:, None]).astype(jnp.int32)
    cache = _constrain_cache(_empty_cache(config, G, Lc + Tc, prefix), mesh)
    last, cache = forward(params, config, ctx_tokens, positions=ctx_pos, segment_ids=ctx_seg,
                          cache=cache, cache_index=Pb, logits_at=jnp.maximum(ctx_lens - 1, 0),
                          mesh=mesh)  # last [G, 1, V]: predicts each continuation's first token

    # Broadcast each context's cache over its continuation rows.
    cache = {k: jnp.take(v, row_group, axis=1 if k in ("k", "v") else 0) for k, v in cache.items()}
    cache = _constrain_cache(cache, mesh)
    ar_t = jnp.arange(Tc, dtype=jnp.int32)[None]
    valid = ar_t < cont_lens[:, None]
    cont_pos = prefix_len + ctx_lens[row_group][:, None] + ar_t
    logits, _ = forward(params, config, cont_tokens, positions=cont_pos,
                        segment_ids=valid.astype(jnp.int32), cache=cache, cache_index=Pb + Lc,
                        mesh=mesh)  # [N, Tc, V]
    first = jnp.take(last, row_group, axis=0)  # [N, 1, V] predicts cont_tokens[:, 0]

    def token_scores(pred, targets):  # log p(target) and argmax == target, no [.., V] copies
        lse = jax.nn.logsumexp(pred, axis=-1)
        tgt = jnp.take_along_axis(pred, targets[..., None], axis=-1)[..., 0]
        return tgt - lse, jnp.argmax(pred, axis=-1) == targets

    lp0, hit0 = token_scores(first, cont_tokens[:, :1])
    lp1, hit1 = token_scores(logits[:, :-1], cont_tokens[:, 1:])
    tok_lp = jnp.concatenate([lp0, lp1], axis=1)
    hit = jnp.concatenate([hit0, hit1], axis=1)
    ll = jnp.sum(jnp.where(valid, tok_lp, 0.0), axis=1)
    greedy = jnp.all(jnp.where(valid, hit, True), axis=1)
    # Replicated (N floats): on a multi-host mesh every process can then read every score.
    return shd.constrain(ll, (None,), mesh), shd.constrain(greedy, (None,), mesh)


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


def _plan(groups: dict[tuple, list[int]], conts: list[tuple], batch_size: int):
    """Pack (context, its rows) chunks into steps of at most ``batch_size`` rows.

    Returns a list of steps, each a list of (context ids, [unique pair indices])."""
    chunks = []
    for ctx, rows in groups.items():
        rows = sorted(rows, key=lambda i: -len(conts[i]))
        for s in range(0, len(rows), batch_size):
            chunks.append((ctx, rows[s:s + batch_size]))
    # Longest contexts first (as the harness sorts), then longest continuations; deterministic.
    chunks.sort(key=lambda c: (-len(c[0]), -len(conts[c[1][0]]), c[0]))
    steps, cur, n = [], [], 0
    for ch in chunks:
        if cur and n + len(ch[1]) > batch_size:
            steps.append(cur)
            cur, n = [], 0
        cur.append(ch)
        n += len(ch[1])
    if cur:
        steps.append(cur)
    return steps


def _put(x: np.ndarray, mesh, axes):
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, shd.named_sharding(mesh, axes, x.shape))


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


def loglikelihoods(model, requests: Iterable[Pair], *, batch_size: int = 32,
                   max_length: int | None = None, shared_prefix: bool = True,
                   min_shared_prefix: int = 32, prefix_cache=None, min_context_bucket: int = 32,
                   min_continuation_bucket: int = 8, progress: bool = False
                   ) -> list[tuple[float, bool]]:
    """``[(sum of continuation log-probs, continuation is the greedy decode), ...]``, one per
    ``(context_ids, continuation_ids)`` request, in order.

    ``batch_size`` is the number of (context, continuation) rows per step. Identical requests
    are scored once; requests with identical context ids share one context pass. With
    ``shared_prefix``, the token prefix common to EVERY context of the call (e.g. TruthfulQA's
    few-shot preamble), when at least ``min_shared_prefix`` tokens long, is prefilled once for
    the whole call with the sampler's :func:`~dromedary_jax.sampling.prefill_prefix` (or taken
    from ``prefix_cache``, a :class:`~dromedary_jax.sampling.PrefixCache`) and broadcast to
    every step. ``max_length`` defaults to ``model.config.max_seq_len``. Context lengths (after
    the shared prefix) and continuation lengths are padded to 2 buckets per octave from
    ``min_context_bucket`` / ``min_continuation_bucket``.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    config, mesh = model.config, model.mesh
    max_length = int(max_length or config.max_seq_len)
    keys: list[tuple[tuple, tuple]] = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = tuple(int(t) for t in ctx), tuple(int(t) for t in cont)
        if not ctx:
            raise UserError(f"request {i}: empty context (encode it with BOS)")
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
        groups.setdefault(ctx, []).append(u)

    # The prefix every context starts with (each context keeps >= 1 token of its own).
    P = min(common_prefix_length(list(groups)), min(len(c) for c in groups) - 1)
    prefix = None
    if shared_prefix and P >= max(min_shared_prefix, 1):
        from dromedary_jax.sampling.prefix_cache import prefill_prefix

        ids = ctxs[0][:P]
        state = prefix_cache.get(model, ids) if prefix_cache is not None else \
            prefill_prefix(model, ids)
        prefix = state.cache
    else:
        P = 0

    steps = _plan(groups, conts, batch_size)
    # Rows and contexts per step are the same for every step of a call: fewer programs.
    N = bucket_count(len(unique), batch_size)
    G = max(len(step) for step in steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="scoring", unit="batch")
    ll = np.zeros(len(unique), np.float64)
    greedy = np.zeros(len(unique), bool)
    params = model.params
    prefix_len = jnp.asarray(P, jnp.int32)
    for step in steps:
        Lc = bucket_length(max(len(c) - P for c, _ in step), min_context_bucket, per_octave=2)
        Tc = bucket_length(max(max(len(conts[r]) for r in rows) for _, rows in step),
                           min_continuation_bucket, per_octave=2)
        ctx_tok = np.zeros((G, Lc), np.int32)
        ctx_len = np.zeros((G,), np.int32)
        row_group = np.zeros((N,), np.int32)
        cont_tok = np.zeros((N, Tc), np.int32)
        cont_len = np.zeros((N,), np.int32)
        order = []
        for g, (ctx, rows) in enumerate(step):
            own = ctx[P:]
            ctx_tok[g, :len(own)] = own
            ctx_len[g] = len(own)
            for r in rows:
                j = len(order)
                row_group[j] = g
                cont_tok[j, :len(conts[r])] = conts[r]
                cont_len[j] = len(conts[r])
                order.append(r)
        out_ll, out_greedy = _score_step(
            params, prefix, prefix_len, _put(ctx_tok, mesh, ("batch", "length")),
            _put(ctx_len, mesh, ("batch",)), _put(row_group, mesh, ("batch",)),
            _put(cont_tok, mesh, ("batch", "length")), _put(cont_len, mesh, ("batch",)),
            config=config, mesh=mesh)
        out_ll, out_greedy = jax.device_get((out_ll, out_greedy))
        idx = np.asarray(order)
        ll[idx] = np.asarray(out_ll)[: len(order)]
        greedy[idx] = np.asarray(out_greedy)[: len(order)]
    return [(float(ll[unique[k]]), bool(greedy[unique[k]])) for k in keys]


def score_texts(model, tokenizer, pairs: Iterable[tuple[str, str]], *, add_bos: bool = True,
                **kw) -> list[tuple[float, bool]]:
    """:func:`loglikelihoods` for ``(context, continuation)`` strings (see :func:`encode_pair`)."""
    reqs = [encode_pair(tokenizer, c, x, add_bos=add_bos) for c, x in pairs]
    return loglikelihoods(model, reqs, **kw)
