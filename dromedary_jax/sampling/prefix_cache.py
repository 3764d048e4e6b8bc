"""Shared-prefix KV cache: prefill a prefix common to every prompt (the principle prompt) ONCE
into a ``[L, 1, P, KV, hd]`` cache; every row of every batch then attends that one copy (the
``prefix`` argument of ``llama.forward``) and prefills only its own suffix (positions continue from the prefix length).

    state = prefill_prefix(model, prefix_ids)           # no caching, just compute
    cache = PrefixCache(maxsize=4)
    state = cache.get(model, prefix_ids)                 # LRU keyed on prefix ids + model weights

``generate``/``generate_text`` use, unless given a ``prefix_cache``, a small per-model LRU
(``default_prefix_cache(model)``) that lives exactly as long as the model object, so the principle
prompt is prefilled once per model per run. Entries are keyed on the prefix ids and the identity
of the model's parameter arrays (checked through weak references), so ``model.set_params`` (new
weights) never reuses a stale prefix.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.llama import CACHE_AXES, forward
from dromedary_jax.sampling.buckets import bucket
from dromedary_jax.sampling.host import to_device


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixState:
    """A prefilled prefix.

    ids: the prefix token ids (length P). cache: k/v [L, 1, Pb, KV, hd], pos/seg [1, Pb] (the
    prefix left-padded to its bucket Pb; padding has segment 0). last_logits: float32 [1, V],
    the logits after the prefix's last token (the next-token distribution for an empty suffix).
    """

    ids: tuple[int, ...]
    cache: dict
    last_logits: jax.Array
    config: ModelConfig
    weights: tuple[Any, ...]  # weak references to the parameter arrays it was computed with

    @property
    def length(self) -> int:
        """Tokens in the prefix."""
        return len(self.ids)

    def arrays(self) -> dict:
        """The pytree the jit'ed prefill takes."""
        return dict(self.cache, last_logits=self.last_logits)

    def matches(self, model) -> bool:
        """True when computed with this model's config and current parameter arrays."""
        if self.config != model.config:
            return False
        params = list(model.params.values())
        return len(params) == len(self.weights) and all(
            r() is p for r, p in zip(self.weights, params))


def _weights(model) -> tuple[Any, ...]:
    return tuple(weakref.ref(p) for p in model.params.values())


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def prefill_prefix_arrays(params, tokens, positions, segment_ids, *, config: ModelConfig, mesh):
    """tokens/positions/segment_ids [1, Pb] (left-padded) -> (cache [L,1,Pb,..], logits [1, V])."""
    c = config
    Pb = tokens.shape[1]
    shape = (c.num_layers, 1, Pb, c.num_kv_heads, c.head_dim)
    cache = {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype),
             "pos": jnp.zeros((1, Pb), jnp.int32), "seg": jnp.zeros((1, Pb), jnp.int32)}
    cache = {k: shd.constrain(v, CACHE_AXES[k], mesh) for k, v in cache.items()}
    logits, cache = forward(params, c, tokens, positions=positions, segment_ids=segment_ids,
                            cache=cache, cache_index=0, logits_at=jnp.full((1,), Pb - 1, jnp.int32),
                            mesh=mesh)
    return cache, logits[:, 0]


PREFIX_IDS_MESSAGE = ("shared_prefix must be token ids (a list of ints) or a PrefixState; "
                      "use generate_text for a string prefix")


def prefix_token_ids(prefix_ids) -> tuple[int, ...]:
    """A shared prefix's token ids (a list, tuple or 1-D integer array) -> tuple of ints.
    Anything else (a string, a number, floats, nested lists) is a UserError."""
    if isinstance(prefix_ids, (str, bytes)):
        raise UserError(f"{PREFIX_IDS_MESSAGE} (got the string {prefix_ids[:40]!r})")
    if not hasattr(prefix_ids, "__iter__") or isinstance(prefix_ids, dict):
        raise UserError(f"{PREFIX_IDS_MESSAGE} (got {type(prefix_ids).__name__} {prefix_ids!r})")
    ids = list(prefix_ids)
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise UserError(f"{PREFIX_IDS_MESSAGE} (it holds {i!r})")
    return tuple(int(i) for i in ids)


def prefill_prefix(model, prefix_ids: Sequence[int]) -> PrefixState:
    """Prefill ``prefix_ids`` once (batch 1) and return its cache (no LRU; see PrefixCache)."""
    ids = prefix_token_ids(prefix_ids)
    c = model.config
    if not ids:
        raise UserError("shared_prefix is empty: pass a non-empty prefix or shared_prefix=None")
    bad = [i for i in ids if not 0 <= i < c.vocab_size]
    if bad:
        raise UserError(f"shared_prefix has token ids outside [0, {c.vocab_size}): {bad[:5]}")
    P = len(ids)
    Pb = bucket(P)
    tokens = np.zeros((1, Pb), np.int32)
    positions = np.zeros((1, Pb), np.int32)
    segs = np.zeros((1, Pb), np.int32)
    tokens[0, Pb - P:] = ids
    positions[0, Pb - P:] = np.arange(P)
    segs[0, Pb - P:] = 1
    mesh = model.mesh
    sh = None if mesh is None else shd.named_sharding(mesh, ("batch", "length"), (1, Pb))
    cache, last = prefill_prefix_arrays(
        model.params, *(to_device(a, sh, replicated=True) for a in (tokens, positions, segs)),
        config=c, mesh=mesh)
    return PrefixState(ids=ids, cache=cache, last_logits=last, config=c, weights=_weights(model))


class PrefixCache:
    """LRU of prefilled prefixes keyed on (prefix ids, model parameter identity)."""

    def __init__(self, maxsize: int = 4):
        self.maxsize = int(maxsize)
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, model, prefix_ids: Sequence[int]) -> PrefixState:
        """The prefilled prefix for ``prefix_ids`` (token ids) and ``model``: cached, or prefilled
        now (and cached, the least recently used entry dropped beyond ``maxsize``). Bad ids are a
        UserError (see ``prefix_token_ids``)."""
        ids = prefix_token_ids(prefix_ids)
        key = (ids, tuple(id(p) for p in model.params.values()))
        state = self._entries.get(key)
        if state is not None and state.matches(model):
            self._entries.move_to_end(key)
            self.hits += 1
            return state
        self._entries.pop(key, None)
        self.misses += 1
        state = prefill_prefix(model, ids)
        if self.maxsize > 0:
            self._entries[key] = state
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return state

    def clear(self) -> None:
        """Drop every cached prefix."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_PER_MODEL: "weakref.WeakKeyDictionary[Any, PrefixCache]" = weakref.WeakKeyDictionary()


def default_prefix_cache(model, maxsize: int = 2) -> PrefixCache:
    """The model's own prefix LRU (created on first use, dropped with the model)."""
    cache = _PER_MODEL.get(model)
    if cache is None:
        cache = _PER_MODEL[model] = PrefixCache(maxsize)
    return cache
