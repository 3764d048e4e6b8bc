"""Device mesh from config, the ONE logical-axis rules table, and sharding helpers.

Every parameter and activation names its axes logically (``embed``, ``heads``, ``batch``...).
``LOGICAL_RULES`` maps each logical name onto zero or more mesh axes of the 3-axis mesh
``('data', 'fsdp', 'tensor')``. The same code runs on 1 CPU device, 8 fake CPU devices or a
TPU pod: only the mesh shape changes.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dromedary_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (in order). None / () means replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "cache_length": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    "norm": (),
    "lora_rank": (),
    # activations: the residual stream keeps its feature axis whole.
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def resolve_mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve a mesh shape with at most one -1 entry against the device count."""
    forms = (f"expected axis sizes as a dict such as {{'fsdp': -1}} or "
             f"{{'data': 1, 'fsdp': -1, 'tensor': 2}}, or a {len(MESH_AXES)}-tuple "
             f"{MESH_AXES} such as (1, -1, 2)")
    if isinstance(shape, (str, bytes)):
        raise UserError(f"mesh {shape!r}: {forms}")
    try:
        if isinstance(shape, Mapping):
            unknown = set(shape) - set(MESH_AXES)
            if unknown:
                raise UserError(
                    f"mesh axes must be among {MESH_AXES}, got {sorted(unknown, key=str)}")
            dims = [int(shape.get(a, 1)) for a in MESH_AXES]
        else:
            dims = [int(x) for x in shape]
    except (TypeError, ValueError):
        raise UserError(f"mesh {shape!r}: {forms}") from None
    if not isinstance(shape, Mapping) and len(dims) != len(MESH_AXES):
        raise UserError(f"mesh shape {tuple(dims)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if dims.count(-1) > 1:
        raise UserError(f"mesh shape {tuple(dims)} has more than one -1 axis")
    if any(d == 0 or d < -1 for d in dims):
        raise UserError(f"mesh shape {tuple(dims)} has an invalid size")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise UserError(
                f"mesh shape {tuple(dims)} does not divide the {num_devices} available devices")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise UserError(
            f"mesh shape {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
            f"but {num_devices} are available")
    return tuple(dims)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data','fsdp','tensor') mesh. Default shape: every device on 'fsdp'."""
    devices = list(devices if devices is not None else jax.devices())
    dims = resolve_mesh_shape(shape if shape is not None else {"fsdp": -1}, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # fake CPU devices / unusual topologies
        arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical axes. With ``shape``, mesh axes that do not divide a dim
    (or are already used by an earlier dim) are dropped, i.e. that dim is replicated."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        mesh_axes = LOGICAL_RULES.get(name, ()) if name is not None else ()
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        chosen = []
        size = 1
        for ma in mesh_axes:
            if ma in used:
                continue
            n = mesh.shape[ma] if mesh is not None else 1
            if shape is not None and shape[i] % (size * n):
                continue
            chosen.append(ma)
            size *= n
        if mesh is not None:
            chosen = [ma for ma in chosen if mesh.shape[ma] > 1]
        used.update(chosen)
        out.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
    return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None):
    """``NamedSharding(mesh, logical_to_spec(axes, mesh, shape))``: an array with these logical
    axes (one name or None per dim) on ``mesh``; with ``shape``, a mesh axis that does not divide
    its dim is dropped (that dim replicated). KeyError for a logical name not in LOGICAL_RULES."""
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Activation sharding constraint; a no-op without a mesh or on a single device."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


def tree_shardings(mesh: Mesh, axes_tree, shape_tree):
    """NamedShardings for a pytree of logical axes (tuples are leaves) and matching shapes."""
    return jax.tree.map(
        lambda axes, s: named_sharding(mesh, axes, s.shape),
        axes_tree, shape_tree, is_leaf=lambda a: isinstance(a, tuple))


def check_model_fits_mesh(config, mesh: Mesh) -> None:
    """Heads must split evenly over 'tensor'; everything else replicates if it does not divide."""
    t = mesh.shape["tensor"]
    if config.num_heads % t:
        raise UserError(
            f"mesh tensor axis {t} does not divide num_heads={config.num_heads}")
    if config.num_kv_heads % t and t % config.num_kv_heads:
        raise UserError(
            f"mesh tensor axis {t} does not divide num_kv_heads={config.num_kv_heads}")
