"""Checkpoints in and out.

    model = load_model(path, dtype="float32", mesh=None)   # HF, Meta, our folder or a .gguf
    save_hf(model, out_dir)                                 # Hugging Face folder
    save_checkpoint(model, out_dir)                         # our Orbax checkpoint

``load_model`` picks the format from the folder's contents: ``dromedary_checkpoint.json`` ->
this project's Orbax checkpoint (``orbax_io``), ``config.json`` -> Hugging Face safetensors
(``hf``), ``params.json`` -> Meta ``consolidated.NN.pth`` (``meta``); a FILE ``*.gguf`` (or one
starting with the GGUF magic) -> a llama.cpp LLaMA GGUF, dequantized (``gguf``).
"""
from __future__ import annotations

import glob
import os
from typing import Mapping, Sequence

from jax.sharding import Mesh

from dromedary_jax import sharding as shd
from dromedary_jax.checkpoint.hf import save_hf
from dromedary_jax.checkpoint.orbax_io import MARKER, save_checkpoint
from dromedary_jax.errors import UserError

MeshLike = Mesh | Mapping[str, int] | Sequence[int] | None


def resolve_mesh(mesh: MeshLike) -> Mesh | None:
    """None (single default device), a Mesh, or a shape for ``sharding.make_mesh``."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, (str, bytes)):
        raise UserError(f"mesh={mesh!r}: expected None (one device), a jax.sharding.Mesh, a dict "
                        "of axis sizes such as {'fsdp': -1} or a 3-tuple (data, fsdp, tensor) "
                        "such as (1, -1, 2)")
    return shd.make_mesh(mesh)


def detect_format(path: str) -> str:
    """'orbax', 'hf' or 'meta' from the folder's contents, 'gguf' for a GGUF file; UserError
    otherwise."""
    from dromedary_jax.checkpoint.gguf import is_gguf_file

    if is_gguf_file(path):
        return "gguf"
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a folder"
        raise UserError(f"{path} {what}; expected a model folder (Hugging Face config.json + "
                        f"*.safetensors, Meta params.json + consolidated.NN.pth, or a "
                        f"dromedary_jax checkpoint with {MARKER}) or a .gguf file")
    if os.path.isfile(os.path.join(path, MARKER)):
        return "orbax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if os.path.isfile(os.path.join(path, "params.json")):
        return "meta"
    if glob.glob(os.path.join(path, "*.safetensors")):
        raise UserError(f"{path}: has *.safetensors but no config.json (a Hugging Face folder "
                        "needs its config.json)")
    if glob.glob(os.path.join(path, "consolidated.*.pth")):
        raise UserError(f"{path}: has consolidated.*.pth but no params.json (a Meta folder needs "
                        "its params.json)")
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if ggufs:
        raise UserError(f"{path}: a folder of .gguf files; pass the file itself, e.g. "
                        f"{ggufs[0]}")
    raise UserError(f"{path}: no config.json (Hugging Face), params.json (Meta) or {MARKER} "
                    "(dromedary_jax checkpoint) found; expected one of those model folders")


def read_model_config(path, **overrides):
    """The :class:`~dromedary_jax.model.config.ModelConfig` of a checkpoint (any format
    :func:`detect_format` knows) WITHOUT reading its weights: the dromedary_jax marker, the HF
    ``config.json``, the GGUF metadata, or a Meta ``params.json`` (whose vocab_size, when it is
    -1, comes from the folder's tokenizer.model, else 32000: LLaMA-1/2's; the context length
    from the family, as :func:`load_model` infers it). ``overrides``:
    ModelConfig fields. UserError when the path is not a model."""
    from dromedary_jax.model.config import ModelConfig

    path = os.fspath(path)
    kind = detect_format(path)
    if kind == "orbax":
        from dromedary_jax.checkpoint import orbax_io

        return orbax_io.read_config(path, **overrides)
    if kind == "hf":
        from dromedary_jax.checkpoint import hf

        return hf.read_hf_config(path, **overrides)
    if kind == "gguf":
        from dromedary_jax.checkpoint import gguf

        return gguf.gguf_config(gguf.read_gguf(path), **overrides)
    from dromedary_jax.checkpoint import meta
    from dromedary_jax.jsonl import read_json

    params = read_json(os.path.join(path, meta.PARAMS_FILE))
    vocab = 32000
    tok = os.path.join(path, "tokenizer.model")
    if int(params.get("vocab_size", -1) or -1) <= 0 and os.path.isfile(tok):
        from dromedary_jax.tokenizer import load_tokenizer

        vocab = int(load_tokenizer(tok).vocab_size)
    overrides.setdefault("max_seq_len", meta.context_length(params))
    return ModelConfig.from_meta_params(params, vocab_size=vocab, **overrides)


def load_model(path, dtype: str = "float32", *, mesh: MeshLike = None,
               param_dtype: str = "float32", vocab_size: int | None = None,
               max_seq_len: int | None = None):
    """Load a Hugging Face, Meta or dromedary_jax checkpoint folder, or a LLaMA ``.gguf`` file
    (dequantized to ``param_dtype``), as a :class:`Llama`.

    ``dtype``: compute dtype (``ModelConfig.dtype``); parameters are kept in ``param_dtype``
    (float32 master weights by default). ``mesh``: None (single default device), a
    ``jax.sharding.Mesh``, or a mesh shape (dict or 3-tuple, one -1 allowed) for
    ``sharding.make_mesh``; parameters are read straight into their shardings on it.
    ``vocab_size``: only for Meta folders whose params.json says -1 and that have no
    tokenizer.model. ``max_seq_len``: the context length (tokens) instead of the one the
    checkpoint states or, for a Meta folder (params.json has none), the one inferred from its
    family (``checkpoint.meta.context_length``: LLaMA-1 2048, 2 4096, 3 8192, 3.1 131072).
    """
    from dromedary_jax.model.llama import Llama

    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"load_model path={path!r}: expected a model folder path or a .gguf "
                        "file path (str or os.PathLike)")
    path = os.fspath(path)
    kind = detect_format(path)
    mesh = resolve_mesh(mesh)
    overrides = dict(dtype=dtype, param_dtype=param_dtype)
    if max_seq_len is not None:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise UserError(f"max_seq_len={max_seq_len!r}: expected a positive number of tokens")
        overrides["max_seq_len"] = max_seq_len

    def check_mesh(config):
        if mesh is not None:
            shd.check_model_fits_mesh(config, mesh)

    if kind == "orbax":
        from dromedary_jax.checkpoint import orbax_io

        config = orbax_io.read_config(path, **overrides)
        check_mesh(config)
        params = orbax_io.load_params(path, config, mesh)
    elif kind == "gguf":
        from dromedary_jax.checkpoint import gguf

        config, params = gguf.load_gguf(path, mesh, check_mesh=check_mesh, **overrides)
    elif kind == "hf":
        from dromedary_jax.checkpoint import hf

        config = hf.read_hf_config(path, **overrides)
        check_mesh(config)
        params = hf.load_hf_params(path, config, mesh)
    else:
        from dromedary_jax.checkpoint import meta

        config, params = meta.load_meta(path, mesh, vocab_size=vocab_size,
                                        check_mesh=check_mesh, **overrides)
    return Llama(config, params=params, mesh=mesh)


__all__ = ["load_model", "save_hf", "save_checkpoint", "resolve_mesh", "detect_format",
           "read_model_config"]
