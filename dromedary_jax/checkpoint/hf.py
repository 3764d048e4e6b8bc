"""Hugging Face folders in and out.

Import (:func:`read_hf_config`, :func:`load_hf_params`): ``config.json`` + ``model.safetensors``
(or sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``). Tensors
are read lazily with safetensors' ``safe_open``; each of our parameters is built with
``jax.make_array_from_callback``, so every device reads only the slice it holds, straight from
the file, and the whole model never exists as one float32 copy on the host.

The slicing machinery (:func:`build_params`) works on any :class:`TensorSource` that presents
tensors under HF names in HF layout; ``meta.py`` reuses it for Meta ``.pth`` shards.

Export (:func:`save_hf`): ``config.json``, ``generation_config.json`` and safetensors files
(split above ``max_shard_bytes``, with ``model.safetensors.index.json``), gathered one HF tensor
(one layer of one projection) at a time.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safe_open can return it)
import numpy as np

from dromedary_jax.checkpoint.hf_mapping import _GLOBAL_HF, _LAYER_HF, hf_layer_key, ours_to_hf
from dromedary_jax.errors import UserError
from dromedary_jax.model.config import ModelConfig, load_hf_config
from dromedary_jax.model.llama import param_shapes, param_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
STORAGE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class TensorSource(Protocol):
    """Tensors under HF names, in HF layout ([out, in] for projections)."""

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The tensor's shape, or None when it is absent."""

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` (contiguous slices, step 1) as a numpy array."""

    def where(self, key: str) -> str:
        """Where the tensor lives (a file name), for error messages."""


# ----------------------------------------------------------------------------- layouts
def _hf_view(name: str, c: ModelConfig):
    """How one HF tensor maps onto ours (without the layers axis).

    Returns ``(view_shape, split_axis, perm)``: the HF tensor reshaped to ``view_shape``
    (its axis ``split_axis`` split in two; None = no split) and transposed by ``perm`` is our
    tensor, i.e. our axis ``i`` is view axis ``perm[i]``.
    """
    D, H, KV, hd, F, V = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                          c.intermediate_size, c.vocab_size)
    if name == "wq":
        return (H, hd, D), 0, (2, 0, 1)
    if name in ("wk", "wv"):
        return (KV, hd, D), 0, (2, 0, 1)
    if name == "wo":
        return (D, H, hd), 1, (1, 2, 0)
    if name in ("w_gate", "w_up"):
        return (F, D), None, (1, 0)
    if name == "w_down":
        return (D, F), None, (1, 0)
    if name == "lm_head":
        return (V, D), None, (1, 0)
    if name == "embed":
        return (V, D), None, (0, 1)
    return (D,), None, (0,)  # norms


def hf_shape(name: str, c: ModelConfig) -> tuple[int, ...]:
    """The shape HF stores for one (per-layer) tensor of our parameter ``name``."""
    view, split, _ = _hf_view(name, c)
    if split is None:
        return tuple(view)
    return tuple(view[:split]) + (view[split] * view[split + 1],) + tuple(view[split + 2:])


def hf_keys(name: str, c: ModelConfig) -> list[str]:
    """The HF tensor names of our parameter ``name``: ``c.num_layers`` keys
    (``model.layers.{i}.<suffix>``, layer order) for a per-layer parameter, else its one global key
    (e.g. ``model.embed_tokens.weight``). KeyError for a name that is not one of ours."""
    if name in _LAYER_HF:
        return [hf_layer_key(i, name) for i in range(c.num_layers)]
    return [_GLOBAL_HF[name]]


def read_block(src: TensorSource, key: str, name: str, c: ModelConfig,
               index: Sequence[slice]) -> np.ndarray:
    """The block ``ours[index]`` of one (per-layer) tensor, reading only that part of ``key``."""
    view, split, perm = _hf_view(name, c)
    ours_shape = tuple(view[p] for p in perm)
    sl = [slice(*s.indices(n)[:2]) for s, n in zip(index, ours_shape)]
    view_sl: list[slice] = [slice(None)] * len(view)
    for i, p in enumerate(perm):
        view_sl[p] = sl[i]
    if split is None:
        block = src.read(key, tuple(view_sl))
    else:
        outer, inner_sl = view_sl[split], view_sl[split + 1]
        inner = view[split + 1]
        merged = slice(outer.start * inner, outer.stop * inner)
        block = src.read(key, tuple(view_sl[:split]) + (merged,) + tuple(view_sl[split + 2:]))
        shape = block.shape[:split] + (outer.stop - outer.start, inner) + block.shape[split + 1:]
        block = block.reshape(shape)[(slice(None),) * (split + 1) + (inner_sl,)]
    return np.transpose(block, perm)


def check_shapes(src: TensorSource, c: ModelConfig, origin: str, config_name: str) -> None:
    """Every tensor the config needs is present with the shape the config implies."""
    for name in param_shapes(c):
        want = hf_shape(name, c)
        for key in hf_keys(name, c):
            got = src.shape(key)
            if got is None:
                raise UserError(f"{origin}: tensor {key!r} is missing from the weights "
                                f"(needed by {config_name})")
            if tuple(got) != want:
                raise UserError(
                    f"{src.where(key)}: tensor {key!r} has shape {tuple(got)} but {config_name} "
                    f"implies {want}; the weights and {config_name} disagree")


def _target_sharding(name: str, c: ModelConfig, mesh):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return param_shardings(c, mesh)[name]


def build_params(src: TensorSource, c: ModelConfig, mesh=None, *, origin: str = "",
                 config_name: str = "config.json") -> dict[str, jax.Array]:
    """Our parameters (``c.param_dtype``) placed on ``mesh`` (or the default device).

    Each array is made with ``jax.make_array_from_callback``: a device's callback reads only
    the slice that device holds (replicas share one read), one parameter at a time.
    """
    check_shapes(src, c, origin, config_name)
    dtype = jnp.dtype(c.param_dtype)
    out = {}
    for name, shape in param_shapes(c).items():
        per_layer = name in _LAYER_HF
        cache: dict[tuple, np.ndarray] = {}

        def callback(index, name=name, shape=shape, per_layer=per_layer, cache=cache):
            index = tuple(index) if index is not None else (slice(None),) * len(shape)
            key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if key not in cache:
                if per_layer:
                    layers = range(*key[0])
                    block = np.stack([read_block(src, hf_layer_key(i, name), name, c, index[1:])
                                      for i in layers])
                else:
                    block = read_block(src, _GLOBAL_HF[name], name, c, index)
                cache[key] = np.ascontiguousarray(block, dtype=dtype)
            return cache[key]

        out[name] = jax.make_array_from_callback(shape, _target_sharding(name, c, mesh),
                                                 callback, dtype=dtype)
        cache.clear()
    return out


# ----------------------------------------------------------------------------- safetensors source
class SafetensorsSource:
    """Lazy view of a folder's safetensors files (single, sharded with index.json, or several)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index_path}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p)
                           for p in glob.glob(os.path.join(path, "*.safetensors")))
            weight_map = None
        if not files:
            raise UserError(f"{path}: no *.safetensors weights next to config.json (other "
                            "formats, e.g. pytorch_model.bin, are not read; re-save with "
                            "save_pretrained(..., safe_serialization=True))")
        self._stack = contextlib.ExitStack()
        self._handles = {}
        for fn in files:
            fp = os.path.join(path, fn)
            if not os.path.isfile(fp):
                raise UserError(f"{index_path}: lists {fn}, which is not in {path}")
            try:
                self._handles[fn] = self._stack.enter_context(safe_open(fp, framework="numpy"))
            except Exception as e:  # corrupt header etc.
                raise UserError(f"{fp}: cannot be read as safetensors ({e})") from None
        if weight_map is None:
            weight_map = {k: fn for fn, h in self._handles.items() for k in h.keys()}
        self._file_of = weight_map
        self._slices: dict[str, object] = {}

    def _slice(self, key):
        if key not in self._slices:
            fn = self._file_of[key]
            try:
                self._slices[key] = self._handles[fn].get_slice(key)
            except Exception:
                raise UserError(f"{os.path.join(self.path, fn)}: tensor {key!r} is listed in "
                                f"{INDEX_FILE} but not in the file") from None
        return self._slices[key]

    def shape(self, key):
        """The tensor's shape as stored (HF layout), or None when no file holds ``key``."""
        if key not in self._file_of:
            return None
        return tuple(self._slice(key).get_shape())

    def read(self, key, index):
        """``tensor[index]`` in its stored dtype, reading only that slice from the file;
        UserError when the index lists ``key`` but its file does not hold it."""
        return np.asarray(self._slice(key)[index])

    def where(self, key):
        """The path of the file holding ``key`` (``<folder>/?`` when none does), for errors."""
        return os.path.join(self.path, self._file_of.get(key, "?"))

    def close(self):
        """Close every open safetensors file; the source cannot be read afterwards."""
        self._slices.clear()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_hf_config(path: str, **overrides) -> ModelConfig:
    """ModelConfig from ``path/config.json`` (UserError naming the file when missing or bad)."""
    return ModelConfig.from_hf_config(load_hf_config(path),
                                      source=os.path.join(path, "config.json"), **overrides)


def load_hf_params(path: str, config: ModelConfig, mesh=None) -> dict[str, jax.Array]:
    """Our parameters from the safetensors files of the HF folder ``path``, in
    ``config.param_dtype``, sharded on ``mesh`` (None: the default device); see
    :func:`build_params`. UserError when the files are missing or unreadable, or a tensor is
    missing or has a shape ``config`` does not imply."""
    with SafetensorsSource(path) as src:
        return build_params(src, config, mesh, origin=path,
                            config_name=os.path.join(path, "config.json"))


# ----------------------------------------------------------------------------- export
def _gather(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _export_plan(c: ModelConfig):
    """[(hf_key, our name, layer index or None)] in HF's usual order."""
    plan = [(_GLOBAL_HF["embed"], "embed", None)]
    for i in range(c.num_layers):
        plan += [(hf_layer_key(i, n), n, i) for n in _LAYER_HF]
    plan.append((_GLOBAL_HF["final_norm"], "final_norm", None))
    if not c.tie_embeddings:
        plan.append((_GLOBAL_HF["lm_head"], "lm_head", None))
    return plan


def save_hf(model, out_dir: str, dtype: str | None = None, *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> list[str]:
    """Write ``model`` as a Hugging Face LlamaForCausalLM folder; returns the weight files.

    ``dtype``: storage dtype (float32, bfloat16 or float16) of every tensor, recorded as the
    config's ``torch_dtype``; None (default): the model's compute dtype
    (``model.config.dtype``, ``checkpoint.dtypes.export_dtype``), so a bfloat16 run exports
    bfloat16 and a float32 run float32, whatever dtype the weights are held in. Weights go to
    ``model.safetensors``, or to ``model-0000x-of-0000y.safetensors`` plus
    ``model.safetensors.index.json`` when they exceed ``max_shard_bytes``. Each HF tensor (one
    layer of one projection) is gathered to the host on its own.

    Refuses a folder that exists and is not empty unless ``overwrite``; then the folder's
    ``model*.safetensors``, index and configs are replaced (and a dromedary_jax checkpoint
    marker there is removed, so the folder loads as the Hugging Face model just written).
    """
    from safetensors.numpy import save_file

    from dromedary_jax.output_paths import check_out_dir, folder_arg, is_nonempty_dir, make_out_dir
    from dromedary_jax.checkpoint.orbax_io import MARKER

    if dtype is None:
        from dromedary_jax.checkpoint.dtypes import export_dtype

        config = getattr(model, "config", None)
        dtype = export_dtype(config.dtype) if isinstance(config, ModelConfig) else "float32"
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"save_hf dtype={dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes={max_shard_bytes} must be > 0")
    out_dir = folder_arg(out_dir, "save_hf out_dir")
    # Every process checks (before any collective gather, so before process 0 writes anything).
    check_out_dir(out_dir, "save_hf out_dir")
    if not overwrite and is_nonempty_dir(out_dir):
        raise UserError(f"save_hf: {out_dir} is not empty; pass overwrite=True to replace the "
                        "model files in it, or choose an empty folder")
    np_dtype = np.dtype(STORAGE_DTYPES[dtype])
    c: ModelConfig = model.config
    params = model.params
    plan = _export_plan(c)

    files: list[list[tuple[str, str, int | None]]] = [[]]
    size = 0
    for item in plan:
        n = int(np.prod(hf_shape(item[1], c))) * np_dtype.itemsize
        if files[-1] and size + n > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(item)
        size += n
    names = ([SINGLE_FILE] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])

    write = jax.process_index() == 0
    if write:
        make_out_dir(out_dir, "save_hf out_dir")
        for old in glob.glob(os.path.join(out_dir, "model*.safetensors")) + [
                os.path.join(out_dir, INDEX_FILE), os.path.join(out_dir, MARKER)]:
            if os.path.basename(old) not in names and os.path.exists(old):
                os.remove(old)
    weight_map, total = {}, 0
    for fname, items in zip(names, files):
        tensors = {}
        for key, name, layer in items:
            p = params[name]
            host = _gather(p[layer] if layer is not None else p)
            tensors[key] = np.ascontiguousarray(ours_to_hf(name, host, c).astype(np_dtype))
            weight_map[key] = fname
            total += tensors[key].nbytes
        if write:
            save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
    if not write:
        return names
    if len(names) > 1:
        _write_json(os.path.join(out_dir, INDEX_FILE),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = c.to_hf_config()
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id})
    return names


def _write_json(path: str, obj: Mapping) -> None:
    from dromedary_jax.jsonl import write_json_atomic

    write_json_atomic(path, dict(obj))


__all__ = ["TensorSource", "SafetensorsSource", "build_params", "read_block", "hf_shape",
           "read_hf_config", "load_hf_params", "save_hf", "STORAGE_DTYPES"]
