"""Host <-> device helpers that work the same on one process and on many (multi-host pods), and
the host side of a batch (``make_batch``: the padded arrays; ``progress_bar``).

With several processes each one feeds and reads only its OWN rows of the batch: global arrays are
assembled with ``jax.make_array_from_process_local_data`` and read back through the addressable
shards, so no process ever gathers the whole batch.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dromedary_jax import sharding as shd
from dromedary_jax.errors import UserError
from dromedary_jax.progress import TokenProgress


def to_device(x, sharding, *, replicated: bool = False) -> jax.Array:
    """Host array -> device array. ``x`` is this process's rows (axis 0) of the global batch,
    or, with ``replicated``, the whole array (identical on every process)."""
    x = np.asarray(x)
    if sharding is None:
        return jnp.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    shape = x.shape if replicated else (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)


def local_rows(arr: jax.Array) -> np.ndarray:
    """This process's rows (axis 0) of a batch-sharded array, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(arr))
    blocks = {}
    for s in arr.addressable_shards:
        start = (s.index[0].start or 0) if s.index else 0
        if start not in blocks:
            blocks[start] = np.asarray(s.data)
    return np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)


def global_max(x: int) -> int:
    """Max of a host integer over all processes (so every process picks the same shapes)."""
    return global_maxes([x])[0]


def global_maxes(xs) -> list[int]:
    """Element-wise max of a list of host integers over all processes, in ONE collective
    (each process passes a list of the same length)."""
    return [int(v) for v in all_values(xs).max(axis=0)]


def all_values(xs) -> np.ndarray:
    """Each process's list of host integers, gathered: int64 [processes, len] (identical on
    every process; a single process: [1, len])."""
    xs = np.asarray([int(x) for x in xs], np.int64)
    if jax.process_count() == 1:
        return xs[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(xs)).reshape(jax.process_count(), len(xs))


def batch_rows_per_process(mesh) -> int:
    """The multiple a process's rows of a batch must be: the batch shards (data x fsdp) over
    the processes (1 without a mesh)."""
    if mesh is None:
        return 1
    return max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())


def batch_to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """``make_batch`` arrays of this process's rows -> global arrays sharded over the batch
    (axis 0: "batch", axis 1: "length"); with several processes the global batch holds every
    process's rows (``rows x process_count``)."""
    out = {}
    for k, v in batch.items():
        axes = ("batch", "length") if v.ndim == 2 else ("batch",)
        sh = None
        if mesh is not None:
            gshape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
            sh = shd.named_sharding(mesh, axes, gshape)
        out[k] = to_device(v, sh)
    return out


def local_row_indices(sharding, rows: int) -> np.ndarray:
    """The global row indices (axis 0 of an array of ``rows`` rows with this ``sharding``) of
    this process's rows, in the order :func:`local_rows` returns them (``arange(rows)`` on one
    process or without a sharding)."""
    if sharding is None or jax.process_count() == 1:
        return np.arange(rows)
    starts = {}
    for idx in sharding.addressable_devices_indices_map((rows,)).values():
        sl = idx[0] if idx else slice(None)
        start, stop, _ = sl.indices(rows)
        starts[start] = stop
    return np.concatenate([np.arange(a, starts[a]) for a in sorted(starts)])


def check_model_and_prefix(model, prefix) -> None:
    """UserError unless ``prefix`` (a PrefixState or None) was prefilled with this model and,
    with several processes, the model has a mesh."""
    if prefix is not None and not prefix.matches(model):
        raise UserError("shared_prefix was prefilled with different model weights or config; "
                        "prefill it again for this model")
    if model.mesh is None and jax.process_count() > 1:
        raise UserError("sampling on several processes needs a model with a mesh "
                        "(load_model(..., mesh=...))")


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


def progress_bar(show, total, batches):
    """(bar, own): the TokenProgress to update (None: no bar) and whether this call made it (and
    closes it). ``show``: a caller's TokenProgress (e.g. one bar over a whole pipeline stage),
    True / False, or None (a bar when there is more than one batch)."""
    if isinstance(show, TokenProgress):
        return show, False
    if show is None:
        show = batches > 1
    return TokenProgress.create(total, desc="sampling", show=bool(show)), True
