"""Public sampling API: ``generate`` (token ids in, new token ids out) and ``generate_text``.

How a call runs: prompts are sorted by length (results come back in input order) and split into
batches of ``batch_size`` rows (the last batch is filled with pad rows that are done from the
start). Each batch is LEFT-padded to a bucketed length (see ``buckets``), prefilled by one jit'ed
call, then decoded by a ``lax.while_loop`` that exits early once every row is done. Without stop
strings the whole generation is one device call; with stop strings it runs in chunks of
``stop_check_every`` steps and the host checks each unfinished row between chunks (see
``stop_strings``). A run therefore compiles one prefill and one decode program per
(prompt bucket, generation bucket, batch size, static sampling settings).

That is the "static" engine. ``engine="continuous"`` (:mod:`dromedary_jax.sampling.engine`)
keeps ``batch_size`` decode slots instead and refills a finished row's slot with the next prompt,
so no slot idles while a batch's longest row finishes; it gives the same tokens.

Randomness: row ``i`` at step ``t`` draws with ``fold_in(fold_in(key(seed), ids[i]), t)``, so an
example gives the same text whatever batch it lands in and whatever the batch size.
``ids`` default to the position in the list; with several processes pass explicit, globally
unique ids (each process passes only its own prompts; see ``host``).
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.model.llama import LAYER_KEYS
from dromedary_jax.progress import TokenProgress
from dromedary_jax.sampling.buckets import bucket, round_up
from dromedary_jax.sampling.decode_loop import LoopSpec, decode, prefill
from dromedary_jax.sampling.engine import check_engine, run_engine
from dromedary_jax.sampling.host import global_max, local_rows, to_device
from dromedary_jax.sampling.prefix_cache import (
    PrefixCache,
    PrefixState,
    default_prefix_cache,
    prefix_token_ids,
)
from dromedary_jax.sampling.stop_strings import find_stop, normalize_stop, truncate_at_stop
from dromedary_jax.sampling.text import continuation_text, encode_prompts
from dromedary_jax.tokenizer import Tokenizer


# ----------------------------------------------------------------------------- argument checks
MIN_TEMPERATURE = 1e-4  # smaller temperatures are 0 (greedy) or overflow in float32
MAX_LENGTH_FACTOR = 4   # prompt + max_new_tokens may be at most this many times max_seq_len
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLAT_PROMPTS = ("prompt_ids must be a list of prompts (lists of token ids); "
                 "wrap a single prompt: [ids]")


def _int_arg(name: str, v, minimum: int | None = None, hint: str = "") -> int:
    """An integer argument (an int or numpy integer; not a bool or a float) -> int."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise UserError(f"{name} must be an integer{hint}, got {v!r}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise UserError(f"{name} must be >= {minimum}{hint}, got {v}")
    return v


def _float_arg(name: str, v) -> float:
    """A real-number argument (int, float or numpy scalar; not a bool), finite in float32."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise UserError(f"{name} must be a number, got {v!r}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        raise UserError(f"{name} must be a finite number (within float32 range), got {v!r}")
    return x


def _is_path(x) -> bool:
    return isinstance(x, (str, bytes, os.PathLike))


def _check_model(model) -> None:
    if _is_path(model):
        raise UserError(f"model must be a loaded model, not a path ({model!r}); "
                        "load it with dj.load_model(path)")
    config = getattr(model, "config", None)
    if not hasattr(config, "vocab_size") or not hasattr(model, "params"):
        raise UserError(f"model must be a dromedary_jax model, got {type(model).__name__}; "
                        "load one with dj.load_model(path)")


def _check_tokenizer(tokenizer, model) -> None:
    """A dromedary_jax tokenizer (or one with its interface) whose ids fit the model."""
    if _is_path(tokenizer):
        raise UserError(f"tokenizer must be a loaded tokenizer, not a path ({tokenizer!r}); "
                        "load it with dj.load_tokenizer(path)")
    if not isinstance(tokenizer, Tokenizer) and not (
            callable(getattr(tokenizer, "encode", None))
            and callable(getattr(tokenizer, "decode", None)) and hasattr(tokenizer, "eos_id")):
        raise UserError(f"tokenizer must be a dromedary_jax tokenizer, got "
                        f"{type(tokenizer).__name__}; load it with dj.load_tokenizer(path)")
    size, vocab = getattr(tokenizer, "vocab_size", None), model.config.vocab_size
    if isinstance(size, (int, np.integer)) and size > vocab:
        raise UserError(f"tokenizer has {int(size)} tokens but the model's vocab_size is {vocab}: "
                        "use the tokenizer that belongs to this model")


def _check_texts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise UserError("prompts must be a list of strings, not one string; wrap it: [text]")
    if isinstance(prompts, (bytes, dict)) or not hasattr(prompts, "__iter__"):
        raise UserError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    for j, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UserError(f"prompts[{j}] is {p!r}, not a string: prompts must be a list of "
                            "strings (use generate for token ids)")
    return prompts


def example_ids(ids, n: int) -> np.ndarray:
    """Per-example ids -> uint32 [n]. Ints in [0, 2**32) are used as they are; other ints and
    strings are hashed (blake2b) to 32 bits. Default: 0..n-1."""
    if ids is None:
        return np.arange(n, dtype=np.uint32)
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise UserError(f"ids must be a list with one example id (an int or a string) per prompt, "
                        f"got {ids!r}")
    ids = list(ids)
    if len(ids) != n:
        raise UserError(f"ids has {len(ids)} entries but there are {n} prompts")
    out = np.empty(n, np.uint32)
    for j, v in enumerate(ids):
        if isinstance(v, (bool, np.bool_)):
            raise UserError(f"ids[{j}] = {v!r}: example ids must be ints or strings")
        if isinstance(v, (int, np.integer)) and 0 <= int(v) < 2**32:
            out[j] = int(v)
        elif isinstance(v, (int, np.integer, str)):
            digest = hashlib.blake2b(str(v).encode("utf-8"), digest_size=4).digest()
            out[j] = int.from_bytes(digest, "little")
        else:
            raise UserError(f"ids[{j}] = {v!r}: example ids must be ints or strings")
    return out


def _eos_ids(eos_id, default: int, vocab: int) -> tuple[int, ...]:
    if eos_id is None:
        eos_id = default
    if isinstance(eos_id, (int, np.integer)) and not isinstance(eos_id, (bool, np.bool_)):
        eos = () if int(eos_id) < 0 else (int(eos_id),)
    elif isinstance(eos_id, (str, bytes, dict)) or not hasattr(eos_id, "__iter__"):
        raise UserError(f"eos_id must be a token id (int), a list of token ids, or -1 to disable "
                        f"EOS; got {eos_id!r}")
    else:
        eos = tuple(_int_arg("eos_id", e, hint=" (a token id)") for e in eos_id)
    for e in eos:
        if not 0 <= e < vocab:
            raise UserError(f"eos_id {e} is outside the vocabulary [0, {vocab})")
    return eos


def _prompt_row(p, j: int) -> list[int]:
    """One prompt (a flat list / 1-D array of integer token ids) -> list of ints."""
    if isinstance(p, (str, bytes)):
        raise UserError(f"prompt_ids[{j}] is a string ({p[:40]!r}): prompt_ids holds token ids; "
                        "encode the text first or use generate_text")
    try:
        arr = np.asarray(p)
    except (TypeError, ValueError):  # ragged nested lists
        raise UserError(f"prompt_ids[{j}] is not a flat list of token ids (nested lists?): "
                        f"{_FLAT_PROMPTS}") from None
    if arr.ndim == 0:
        raise UserError(f"prompt_ids[{j}] is {p!r}, not a list of token ids: {_FLAT_PROMPTS}")
    if arr.ndim > 1:
        raise UserError(f"prompt_ids[{j}] has shape {arr.shape}, not a flat list of token ids: "
                        f"{_FLAT_PROMPTS}")
    if arr.size == 0:
        return []
    vals = arr.tolist()
    if arr.dtype.kind in "iu":
        if isinstance(p, (list, tuple)):  # numpy turns [True, 5] into ints
            bad = [x for x in p if isinstance(x, (bool, np.bool_))]
            if bad:
                raise UserError(f"prompt_ids[{j}] holds {bad[0]!r}: token ids must be integers")
        return vals
    if arr.dtype.kind == "O":  # e.g. ints too big for int64, or None among the ids
        bad = [x for x in vals
               if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer))]
        if not bad:
            return [int(x) for x in vals]
    elif arr.dtype.kind == "f":
        bad = [x for x in vals if not float(x).is_integer()] or vals
    else:
        bad = vals
    raise UserError(f"prompt_ids[{j}] holds {bad[0]!r} ({arr.dtype}): token ids must be integers")


def _check_prompts(prompts, vocab: int, allow_empty: bool) -> list[list[int]]:
    if prompts is None or isinstance(prompts, (str, bytes, dict)) or \
            not hasattr(prompts, "__iter__") or getattr(prompts, "ndim", 2) == 0:
        raise UserError("prompt_ids must be a list of token-id lists (one per prompt)")
    out = []
    for j, p in enumerate(prompts):
        row = _prompt_row(p, j)
        if not row and not allow_empty:
            raise UserError(f"prompt {j} is empty (give each prompt at least one token, e.g. BOS)")
        bad = [x for x in row if not 0 <= x < vocab]
        if bad:
            raise UserError(f"prompt {j} has token ids outside [0, {vocab}): {bad[:5]}")
        out.append(row)
    return out


def _check_length(config, prompt_len: int, max_new: int) -> None:
    """Refuse (before anything is allocated) a prompt + generation far beyond max_seq_len."""
    limit = MAX_LENGTH_FACTOR * config.max_seq_len
    if prompt_len + max_new > limit:
        raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds "
                        f"{MAX_LENGTH_FACTOR}x the model's max_seq_len {config.max_seq_len} "
                        f"({limit} tokens); lower max_new_tokens or shorten the prompts")


def _logit_bias_vector(logit_bias: Mapping[int, float] | None, vocab: int) -> np.ndarray:
    bias = np.zeros(vocab, np.float32)
    if logit_bias is None or (isinstance(logit_bias, (list, tuple)) and not logit_bias):
        return bias
    if not isinstance(logit_bias, Mapping):
        raise UserError(f"logit_bias must be a mapping {{token_id: bias}} (e.g. {{5: -100.0}}), "
                        f"got {type(logit_bias).__name__}")
    for k, v in logit_bias.items():
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or \
                not 0 <= int(k) < vocab:
            raise UserError(f"logit_bias key {k!r} must be a token id in [0, {vocab})")
        bias[int(k)] += _float_arg(f"logit_bias[{k}]", v)
    return bias


def _ngram(ngram_penalties) -> tuple[tuple[int, ...], np.ndarray]:
    if ngram_penalties is None:
        ngram_penalties = ()
    if isinstance(ngram_penalties, (str, bytes, dict)) or not hasattr(ngram_penalties, "__iter__"):
        raise UserError(f"ngram_penalties must be a list of (n, penalty) pairs, got "
                        f"{ngram_penalties!r}")
    ns, ps = [], []
    for item in ngram_penalties:
        try:
            n, p = item
        except (TypeError, ValueError):
            raise UserError(
                f"ngram_penalties entries must be (n, penalty) pairs, got {item!r}") from None
        ns.append(_int_arg("ngram_penalties: n", n, 1))
        ps.append(_float_arg(f"ngram_penalties: the penalty for n={n}", p))
    return tuple(ns), np.asarray(ps, np.float32)


UNSTACK_MAX_BYTES = 2 * 1024**3


def _unstack_layers(model) -> bool:
    """Use the CPU decode path (see ``step_forward``): on CPU, and only when the extra copy of
    the weights it makes is small."""
    params = model.params
    try:
        platform = next(iter(params["wq"].devices())).platform
    except (AttributeError, StopIteration):
        return False
    size = sum(int(params[k].size) * params[k].dtype.itemsize for k in LAYER_KEYS)
    return platform == "cpu" and size <= UNSTACK_MAX_BYTES


def sampling_settings(model, *, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, eos_id=None,
                      seed=0, logit_bias=None, ngram_penalties=(), keep_logits=False):
    """Validated arguments -> (LoopSpec (static), knobs (dynamic arrays)) for prefill/decode.
    Bad values (wrong types, NaN/inf, out of range) raise a UserError."""
    c = model.config
    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 1)
    if max_new_tokens > MAX_LENGTH_FACTOR * c.max_seq_len:
        raise UserError(f"max_new_tokens must be at most {MAX_LENGTH_FACTOR}x the model's "
                        f"max_seq_len {c.max_seq_len} ({MAX_LENGTH_FACTOR * c.max_seq_len}), "
                        f"got {max_new_tokens}")
    temperature = _float_arg("temperature", temperature)
    if temperature != 0 and not temperature >= MIN_TEMPERATURE:
        raise UserError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, "
                        f"got {temperature!r}")
    top_p = _float_arg("top_p", top_p)
    if not (0 < top_p <= 1 and np.float32(top_p) > 0):
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    top_k = _int_arg("top_k", top_k, 0, hint=" (0 = off)")
    seed = _int_arg("seed", seed)
    ns, ps = _ngram(ngram_penalties)
    greedy = temperature == 0.0
    top_k = top_k if 0 < top_k < c.vocab_size else 0
    spec = LoopSpec(config=c, mesh=model.mesh, greedy=greedy,
                    top_k=0 if greedy else top_k, use_top_p=(not greedy) and float(top_p) < 1.0,
                    ngram_ns=ns, eos_ids=_eos_ids(eos_id, c.eos_token_id, c.vocab_size),
                    keep_logits=keep_logits, unstack_layers=_unstack_layers(model))
    knobs = {
        "seed": np.uint32(seed & 0xFFFFFFFF),
        "temperature": np.float32(temperature if not greedy else 1.0),
        "top_p": np.float32(top_p),
        "logit_bias": _logit_bias_vector(logit_bias, c.vocab_size),
        "ngram_penalties": ps,
        "max_new": np.int32(max_new_tokens),
    }
    return spec, knobs


# ----------------------------------------------------------------------------- batches
def make_batch(rows: Sequence[Sequence[int]], row_ids: np.ndarray, *, length: int, batch: int,
               prefix_len: int = 0) -> dict[str, np.ndarray]:
    """Host arrays for one batch: each row LEFT-padded to ``length``; rows beyond ``len(rows)``
    are pad rows (``active`` False). Positions start at ``prefix_len`` on the first real token."""
    tokens = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    segs = np.zeros((batch, length), np.int32)
    first_pos = np.full((batch,), prefix_len, np.int32)
    ids = np.zeros((batch,), np.uint32)
    active = np.zeros((batch,), bool)
    empty = np.zeros((batch,), bool)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            tokens[i, length - n:] = row
            positions[i, length - n:] = prefix_len + np.arange(n)
            segs[i, length - n:] = 1
        first_pos[i] = prefix_len + n
        ids[i] = row_ids[i]
        active[i] = True
        empty[i] = n == 0
    return {"tokens": tokens, "positions": positions, "segment_ids": segs, "first_pos": first_pos,
            "ids": ids, "active": active, "empty": empty}


def _batch_to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    out = {}
    for k, v in batch.items():
        axes = ("batch", "length") if v.ndim == 2 else ("batch",)
        sh = None
        if mesh is not None:
            gshape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
            sh = shd.named_sharding(mesh, axes, gshape)
        out[k] = to_device(v, sh)
    return out


def _batch_rows_per_process(mesh) -> int:
    if mesh is None:
        return 1
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(1, shards // jax.process_count())


def _progress_bar(show, total, batches):
    """(bar, own): the TokenProgress to update (None: no bar) and whether this call made it (and
    closes it). ``show``: a caller's TokenProgress (e.g. one bar over a whole pipeline stage),
    True / False, or None (a bar when there is more than one batch)."""
    if isinstance(show, TokenProgress):
        return show, False
    if show is None:
        show = batches > 1
    return TokenProgress.create(total, desc="sampling", show=bool(show)), True


def run_batches(model, prompts: list[list[int]], *, spec: LoopSpec, knobs: dict,
                row_ids: np.ndarray, prefix: PrefixState | None = None, batch_size: int = 32,
                is_stopped: Callable[[int, list[int]], bool] | None = None,
                stop_check_every: int = 16, progress: bool | None = None,
                compile_only: bool = False, stats: dict | None = None) -> list[list[int]]:
    """The batching loop behind ``generate``: new tokens per prompt (EOS excluded). Its
    arguments are already checked (``generate`` / ``generate_text``: prompts, settings, batch
    size, length). ``compile_only``: compile the programs the call needs, run nothing, return [].
    ``stats``: a dict that gets ``slot_steps`` (rows x steps run, pad rows included) and
    ``tokens`` (tokens returned), as :func:`~dromedary_jax.sampling.engine.run_engine` counts."""
    if prefix is not None and not prefix.matches(model):
        raise UserError("shared_prefix was prefilled with different model weights or config; "
                        "prefill it again for this model")
    if model.mesh is None and jax.process_count() > 1:
        raise UserError("sampling on several processes needs a model with a mesh "
                        "(load_model(..., mesh=...))")
    n = len(prompts)
    max_new = int(knobs["max_new"])
    p_len = 0 if prefix is None else prefix.length
    n_all = global_max(n)
    B = round_up(min(batch_size, max(n_all, 1)), _batch_rows_per_process(model.mesh))
    G = bucket(max_new)
    longest = max((len(p) for p in prompts), default=1)
    if p_len + longest + max_new > model.config.max_seq_len:
        warnings.warn(f"prompt ({p_len + longest} tokens) + max_new_tokens ({max_new}) exceeds the "
                      f"model's max_seq_len {model.config.max_seq_len}", stacklevel=3)
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in range(n)]
    params = model.params
    prefix_arrays = None if prefix is None else prefix.arrays()
    chunk = stop_check_every if is_stopped is not None else G
    n_batches = math.ceil(n_all / B) if n_all else 0
    bar, own_bar = (None, False) if compile_only else _progress_bar(progress, n, n_batches)
    compiled = set()
    st = stats if stats is not None else {}
    st.update(slot_steps=0, tokens=0)
    for b in range(n_batches):
        idx = order[b * B:(b + 1) * B]
        rows = [prompts[i] for i in idx]
        T = bucket(global_max(max((len(r) for r in rows), default=1)))
        host = _batch_to_device(make_batch(rows, row_ids[idx], length=T, batch=B, prefix_len=p_len),
                                model.mesh)
        if compile_only:
            if T not in compiled:
                compiled.add(T)
                _compile(params, host, prefix_arrays, knobs, spec, G)
            continue
        state = prefill(params, host, prefix_arrays, knobs, spec=spec, gen_len=G)
        t, last_nv = 1, np.zeros(B, np.int32)
        while True:
            state, all_done = decode(params, state, knobs, np.int32(t + chunk), prefix_arrays,
                                     spec=spec)
            t = int(state["t"])
            if bool(all_done) or t >= max_new:
                break
            if is_stopped is not None:
                toks, nv = local_rows(state["tokens"]), local_rows(state["n_valid"])
                done = local_rows(state["done"]).copy()
                hit = False
                for i in range(len(rows)):
                    if (not done[i] and nv[i] != last_nv[i]
                            and is_stopped(idx[i], toks[i, :nv[i]].tolist())):
                        done[i] = hit = True
                last_nv = nv
                if hit:
                    sh = state["done"].sharding if model.mesh is not None else None
                    state = dict(state, done=to_device(done, sh))
        toks, nv = local_rows(state["tokens"]), local_rows(state["n_valid"])
        st["slot_steps"] += B * int(state["t"])
        for i, j in enumerate(idx):
            results[j] = toks[i, :nv[i]].tolist()
            st["tokens"] += len(results[j])
        if bar is not None:
            bar.update(len(idx), sum(int(nv[i]) for i in range(len(idx))))
    if bar is not None and own_bar:
        bar.close()
    return [] if compile_only else results


def _compile(params, batch, prefix_arrays, knobs, spec: LoopSpec, gen_len: int) -> None:
    """Ahead-of-time compile prefill and decode for these shapes (fills jit's cache)."""
    prefill.lower(params, batch, prefix_arrays, knobs, spec=spec, gen_len=gen_len).compile()
    state = jax.eval_shape(lambda *a: prefill(*a, spec=spec, gen_len=gen_len), params, batch,
                           prefix_arrays, knobs)
    decode.lower(params, state, knobs, np.int32(1), prefix_arrays, spec=spec).compile()


def _check_prefix_arg(shared_prefix):
    """shared_prefix of ``generate``: None, a PrefixState, or token ids (-> tuple of ints)."""
    if shared_prefix is None or isinstance(shared_prefix, PrefixState):
        return shared_prefix
    return prefix_token_ids(shared_prefix)


def _resolve_prefix(model, shared_prefix, prefix_cache: PrefixCache | None) -> PrefixState | None:
    if shared_prefix is None:
        return None
    if isinstance(shared_prefix, PrefixState):
        return shared_prefix
    cache = prefix_cache if prefix_cache is not None else default_prefix_cache(model)
    return cache.get(model, shared_prefix)


def _prompt_len(prompts: list[list[int]], prefix) -> int:
    """Tokens before the first generated one, for the longest prompt (prefix included)."""
    p_len = 0 if prefix is None else len(prefix.ids if isinstance(prefix, PrefixState) else prefix)
    return p_len + max((len(p) for p in prompts), default=1)


# ----------------------------------------------------------------------------- public API
def generate(model, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_id=None, seed: int = 0, ids=None,
             logit_bias: Mapping[int, float] | None = None, ngram_penalties=(),
             shared_prefix=None, prefix_cache: PrefixCache | None = None, batch_size: int = 32,
             progress: bool | None = None, compile_only: bool = False,
             engine: str = "static") -> list[list[int]]:
    """Sample continuations of token-id prompts; returns the NEW tokens per prompt, EOS excluded.

    prompt_ids: a list of prompts, each a list of int token ids (or a 2-D integer array); wrap
    a single prompt as ``[ids]``. max_new_tokens: a prompt + max_new_tokens longer than the
    model's max_seq_len only warns, longer than 4x max_seq_len is a UserError. temperature 0 =
    greedy, else >= 1e-4; top_k 0 = off; top_p 1 = off. eos_id: an id, a sequence of ids, or
    None (the model config's eos_token_id); -1 or () disables EOS. ids: per-example ids that
    seed randomness (default: position in the list). logit_bias: {token_id: bias} added at every
    step. ngram_penalties: ((n, penalty), ...): a token that would complete an n-gram already
    present in the generated tokens gets ``-penalty`` (e.g. ((3, p3), (4, p4))). shared_prefix:
    token ids common to every prompt (prompts then hold only their suffix), or a PrefixState from
    ``prefill_prefix``; it is prefilled once and cached (``prefix_cache``, default: the model's
    own LRU). batch_size: rows per device batch. progress: a bar over the prompts with the
    generated tokens/s and an ETA, on process 0 only (None, the default: shown when there is
    more than one batch; True / False: always / never; a
    :class:`dromedary_jax.progress.TokenProgress`: update that bar instead, e.g. one bar over
    many calls; ``DROMEDARY_PROGRESS=0`` turns bars off). compile_only: compile the
    programs this call needs (e.g. before timing it), run nothing and return [].
    engine: "static" (batches of ``batch_size`` rows sorted by length, each decoded until its
    last row is done) or "continuous" (``batch_size`` decode slots; a finished row's slot is
    refilled with the next prompt, see :mod:`dromedary_jax.sampling.engine`; one process only).
    Both give the same tokens for the same (seed, example id).
    Bad arguments raise a UserError before anything is compiled or run.
    """
    _check_model(model)
    c = model.config
    prompts = _check_prompts(prompt_ids, c.vocab_size, allow_empty=shared_prefix is not None)
    spec, knobs = sampling_settings(model, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, eos_id=eos_id, seed=seed,
                                    logit_bias=logit_bias, ngram_penalties=ngram_penalties)
    batch_size = _int_arg("batch_size", batch_size, 1)
    engine = check_engine(engine)
    row_ids = example_ids(ids, len(prompts))
    shared_prefix = _check_prefix_arg(shared_prefix)
    _check_length(c, _prompt_len(prompts, shared_prefix), int(knobs["max_new"]))
    prefix = _resolve_prefix(model, shared_prefix, prefix_cache)
    run = run_engine if engine == "continuous" else run_batches
    return run(model, prompts, spec=spec, knobs=knobs, row_ids=row_ids, prefix=prefix,
               batch_size=batch_size, progress=progress, compile_only=compile_only)


def generate_text(model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, stop=(), logit_bias=None, seed: int = 0,
                  ids=None, shared_prefix=None, eos_id=None, ngram_penalties=(),
                  prefix_cache: PrefixCache | None = None, batch_size: int = 32,
                  stop_check_every: int = 16, progress: bool | None = None,
                  engine: str = "static") -> list[str]:
    """Sample text continuations; returns the text before the first stop string, per prompt.

    ``tokenizer``: from ``dj.load_tokenizer`` (its vocabulary may be smaller than the model's,
    not larger). ``prompts``: a list of strings, each encoded with BOS when the tokenizer's own
    rule adds one (``tokenizer.add_bos``). With ``shared_prefix`` (a string common to every
    prompt, e.g. the principle prompt), each row is ``encode(shared_prefix + prompt)``, and the
    ids every row shares are prefilled once (see :func:`dromedary_jax.sampling.text.encode_prompts`:
    the model reads the same tokens as for the joined text, whatever the seam).
    eos_id defaults to ``tokenizer.eos_id``. ``stop``: a string or strings, checked for every
    row every ``stop_check_every`` (>= 1) steps (a stop string split across tokens is found too)
    on the generated text read as the continuation of its prompt (a leading space is kept: see
    :func:`dromedary_jax.sampling.text.continuation_text`); the returned texts are read the same way.
    Other arguments (``engine`` included) as in :func:`generate`.
    """
    _check_model(model)
    _check_tokenizer(tokenizer, model)
    prompts = _check_texts(prompts)
    stops = normalize_stop(stop)
    if shared_prefix is not None and not isinstance(shared_prefix, (str, PrefixState)):
        raise UserError(f"shared_prefix must be a string (or a PrefixState), got "
                        f"{type(shared_prefix).__name__}")
    batch_size = _int_arg("batch_size", batch_size, 1)
    stop_check_every = _int_arg("stop_check_every", stop_check_every, 1)
    engine = check_engine(engine)
    c = model.config
    spec, knobs = sampling_settings(model, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k,
                                    eos_id=tokenizer.eos_id if eos_id is None else eos_id,
                                    seed=seed, logit_bias=logit_bias,
                                    ngram_penalties=ngram_penalties)
    if isinstance(shared_prefix, str):
        shared_prefix, rows = encode_prompts(tokenizer, prompts, shared_prefix)
        if not shared_prefix:  # nothing every row starts with (an empty prefix string)
            shared_prefix = None
    elif shared_prefix is not None:  # a PrefixState: the prompts continue its ids, no BOS
        rows = [tokenizer.encode(p, bos=False) for p in prompts]
    else:
        rows = encode_prompts(tokenizer, prompts)[1]
    rows = _check_prompts(rows, c.vocab_size, allow_empty=shared_prefix is not None)
    row_ids = example_ids(ids, len(rows))
    _check_length(c, _prompt_len(rows, shared_prefix), int(knobs["max_new"]))
    prefix = _resolve_prefix(model, shared_prefix, prefix_cache)
    prefix_tail = list(prefix.ids[-1:]) if prefix is not None else []
    # the token each row's generation follows (continuation_text reads only the last one)
    last = [list(r[-1:]) or prefix_tail for r in rows]

    def text_of(i: int, toks) -> str:  # row i's generated text, as it continues its prompt
        return continuation_text(tokenizer, last[i], toks)

    is_stopped = None
    if stops:
        def is_stopped(i, toks):
            return find_stop(text_of(i, toks), stops) >= 0
    run = run_engine if engine == "continuous" else run_batches
    out = run(model, rows, spec=spec, knobs=knobs, row_ids=row_ids, prefix=prefix,
              batch_size=batch_size, is_stopped=is_stopped, stop_check_every=stop_check_every,
              progress=progress)
    return [truncate_at_stop(text_of(i, toks), stops) for i, toks in enumerate(out)]
