"""Argument checks of the sampling API that depend on the call, not on the sampling settings:
the model, the tokenizer, the prompts, the example ids, EOS ids and logit biases against the
vocabulary, and the prompt + generation length. (The settings themselves are checked once, in
:class:`dromedary_jax.sampling.settings.SamplingSettings`.)

Every check raises a one-line :class:`dromedary_jax.errors.UserError` naming the argument.
No jax here: these run before anything is compiled.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Mapping

import numpy as np

from dromedary_jax.errors import UserError
from dromedary_jax.tokenizer import Tokenizer

MAX_LENGTH_FACTOR = 4   # prompt + max_new_tokens may be at most this many times max_seq_len
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLAT_PROMPTS = ("prompt_ids must be a list of prompts (lists of token ids); "
                 "wrap a single prompt: [ids]")


# ----------------------------------------------------------------------------- scalars
def int_arg(name: str, v, minimum: int | None = None, hint: str = "") -> int:
    """An integer argument (an int or numpy integer; not a bool or a float) -> int.
    Raises UserError "<name> must be an integer..." or "<name> must be >= <minimum>..."."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise UserError(f"{name} must be an integer{hint}, got {v!r}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise UserError(f"{name} must be >= {minimum}{hint}, got {v}")
    return v


def float_arg(name: str, v) -> float:
    """A real-number argument (int, float or numpy scalar; not a bool), finite in float32 ->
    float. Raises UserError "<name> must be a number..." or "... a finite number ..."."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise UserError(f"{name} must be a number, got {v!r}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        raise UserError(f"{name} must be a finite number (within float32 range), got {v!r}")
    return x


# ----------------------------------------------------------------------------- model, tokenizer
def _is_path(x) -> bool:
    return isinstance(x, (str, bytes, os.PathLike))


def check_model(model) -> None:
    """A loaded dromedary_jax model (``.config.vocab_size`` and ``.params``), not a path."""
    if _is_path(model):
        raise UserError(f"model must be a loaded model, not a path ({model!r}); "
                        "load it with dj.load_model(path)")
    config = getattr(model, "config", None)
    if not hasattr(config, "vocab_size") or not hasattr(model, "params"):
        raise UserError(f"model must be a dromedary_jax model, got {type(model).__name__}; "
                        "load one with dj.load_model(path)")


def check_tokenizer(tokenizer, model) -> None:
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


# ----------------------------------------------------------------------------- prompts, ids
def check_texts(prompts) -> list[str]:
    """``prompts`` of ``generate_text``: a list of strings (not one string)."""
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


def check_prompts(prompts, vocab: int, allow_empty: bool) -> list[list[int]]:
    """Token-id prompts (a list of flat int lists or a 2-D int array) -> list of int lists, every
    id in [0, vocab); an empty prompt only with a shared prefix (``allow_empty``)."""
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


# ----------------------------------------------------------------------------- against the model
def check_max_new_tokens(config, max_new: int) -> None:
    """``max_new_tokens`` at most MAX_LENGTH_FACTOR x the model's max_seq_len."""
    limit = MAX_LENGTH_FACTOR * config.max_seq_len
    if max_new > limit:
        raise UserError(f"max_new_tokens must be at most {MAX_LENGTH_FACTOR}x the model's "
                        f"max_seq_len {config.max_seq_len} ({limit}), got {max_new}")


def check_length(config, prompt_len: int, max_new: int) -> None:
    """Refuse (before anything is allocated) a prompt + generation far beyond max_seq_len."""
    limit = MAX_LENGTH_FACTOR * config.max_seq_len
    if prompt_len + max_new > limit:
        raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds "
                        f"{MAX_LENGTH_FACTOR}x the model's max_seq_len {config.max_seq_len} "
                        f"({limit} tokens); lower max_new_tokens or shorten the prompts")


def eos_ids_in_vocab(eos: tuple[int, ...], vocab: int) -> tuple[int, ...]:
    """EOS token ids (already validated as ints >= 0) that must lie in [0, vocab)."""
    for e in eos:
        if not 0 <= e < vocab:
            raise UserError(f"eos_id {e} is outside the vocabulary [0, {vocab})")
    return eos


def logit_bias_vector(bias: Mapping[int, float], vocab: int) -> np.ndarray:
    """{token_id: bias} (ids resolved, biases validated) -> float32 [vocab], 0 elsewhere.
    Raises UserError for an id outside [0, vocab)."""
    out = np.zeros(vocab, np.float32)
    for k, v in bias.items():
        if not 0 <= int(k) < vocab:
            raise UserError(f"logit_bias key {k!r} must be a token id in [0, {vocab})")
        out[int(k)] += v
    return out
