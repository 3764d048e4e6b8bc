"""LoRA adapters in the model's own layouts, their shardings, init and merge.

For a projection ``W`` of shape ``[L, *in, *out]`` (``n_in`` input dims: 2 for ``wo``, else 1)
the adapter is ``a: [L, *in, r]`` and ``b: [L, r, *out]``; the forward pass adds
``scale * (x @ a) @ b`` with ``scale = alpha / rank``. ``a`` starts uniform in
``+-1/sqrt(fan_in)`` (as PEFT does), ``b`` starts at zero, so training starts from the base model.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.llama import PARAM_AXES, PROJ_IN_DIMS, param_shapes

LoraParams = dict[str, dict[str, jax.Array]]


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """``targets`` as a tuple; UserError when it is empty or names a parameter that is not a
    projection (wq, wk, wv, wo, w_gate, w_up, w_down)."""
    targets = tuple(targets)
    bad = [t for t in targets if t not in PROJ_IN_DIMS]
    if bad or not targets:
        raise UserError(f"lora.targets={list(targets)}: choose among {list(PROJ_IN_DIMS)}")
    return targets


def scale(alpha: float, rank: int) -> float:
    """The adapter output scale ``alpha / rank`` (LoRA, Hu et al., arXiv 2106.09685; PEFT's
    ``scaling`` without rsLoRA). ZeroDivisionError for rank 0."""
    return float(alpha) / int(rank)


def lora_shapes(config: ModelConfig, rank: int, targets: Sequence[str]):
    """``{target: {"a": [L, *in, rank], "b": [L, rank, *out]}}`` shapes for each target
    projection of ``config`` (UserError for bad targets, see :func:`check_targets`)."""
    shapes = param_shapes(config)
    out = {}
    for name in check_targets(targets):
        w = shapes[name]
        n_in = PROJ_IN_DIMS[name]
        out[name] = {"a": w[: 1 + n_in] + (rank,), "b": (w[0], rank) + w[1 + n_in:]}
    return out


def lora_axes(targets: Sequence[str]):
    """Logical axes of each adapter, ``{target: {"a": ..., "b": ...}}``: the projection's own
    axes with ``lora_rank`` for the rank dim."""
    out = {}
    for name in check_targets(targets):
        axes = PARAM_AXES[name]
        n_in = PROJ_IN_DIMS[name]
        out[name] = {"a": axes[: 1 + n_in] + ("lora_rank",),
                     "b": ("layers", "lora_rank") + axes[1 + n_in:]}
    return out


def lora_shardings(config: ModelConfig, rank: int, targets: Sequence[str], mesh):
    """NamedShardings of each adapter on ``mesh``, ``{target: {"a": ..., "b": ...}}``."""
    shapes = lora_shapes(config, rank, targets)
    axes = lora_axes(targets)
    return {n: {k: shd.named_sharding(mesh, axes[n][k], shapes[n][k]) for k in ("a", "b")}
            for n in shapes}


def init_lora(config: ModelConfig, rank: int, targets: Sequence[str], seed: int,
              mesh=None) -> LoraParams:
    """float32 adapters (a uniform, b zero) from ``seed``, placed with their shardings.

    Drawn on the host with numpy (adapters are small; no compile), identical on every host."""
    if int(rank) <= 0:
        raise UserError(f"lora.rank={rank} must be > 0")
    shapes = lora_shapes(config, rank, targets)
    shardings = lora_shardings(config, rank, targets, mesh) if mesh is not None else None
    rng = np.random.default_rng(int(seed))
    out = {}
    for name in sorted(shapes):
        a_shape, b_shape = shapes[name]["a"], shapes[name]["b"]
        bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
        host = {"a": rng.uniform(-bound, bound, a_shape).astype(np.float32),
                "b": np.zeros(b_shape, np.float32)}
        if shardings is None:
            out[name] = {k: jnp.asarray(v) for k, v in host.items()}
        else:
            out[name] = {k: jax.make_array_from_callback(
                v.shape, shardings[name][k], lambda idx, v=v: v[idx]) for k, v in host.items()}
    return out


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [L, *in, r] @ b [L, r, *out] -> [L, *in, *out] (float32)."""
    L, r = a.shape[0], a.shape[-1]
    a2 = a.reshape(L, -1, r).astype(jnp.float32)
    b2 = b.reshape(L, r, -1).astype(jnp.float32)
    d = jnp.einsum("lir,lro->lio", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return d.reshape(a.shape[:-1] + b.shape[2:])


def merge_lora(params: Mapping[str, jax.Array], lora: LoraParams, scale: float) -> dict:
    """Base params with every adapter folded in: W + scale * a @ b (dtype of W kept)."""
    out = dict(params)
    for name, ab in lora.items():
        w = params[name]
        out[name] = (w.astype(jnp.float32) + scale * delta(ab["a"], ab["b"])).astype(w.dtype)
    return out
