"""This project's own checkpoint: Orbax (sharded) parameters + the ModelConfig as JSON.

Layout of a checkpoint folder::

    dromedary_checkpoint.json   {"format": "dromedary_jax", "version": 1, "config": {...}}
    params/                     Orbax StandardCheckpointer tree of the flat parameter dict

Each host writes only its own shards. Restoring builds abstract arrays carrying the TARGET
shardings, so a checkpoint saved on one mesh restores onto any other mesh (or one device).
"""
from __future__ import annotations

import dataclasses
import os

import jax

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json, write_json_atomic
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.llama import param_shapes, param_shardings

MARKER = "dromedary_checkpoint.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def config_to_json(c: ModelConfig) -> dict:
    """Every ModelConfig field as a JSON-ready dict (``dataclasses.asdict``; nested
    ``rope_scaling`` becomes a dict), the marker's ``config`` object."""
    return dataclasses.asdict(c)


def config_from_json(d: dict, *, source: str = MARKER, **overrides) -> ModelConfig:
    """ModelConfig from a marker's ``config`` object (keys that are not fields are ignored);
    ``source`` names the file in errors."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: 'config' must be a JSON object, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in fields}
    return ModelConfig.from_fields(kw, source=source, **overrides)


def save_checkpoint(model, out_dir: str, *, overwrite: bool = False) -> str:
    """Save ``model`` (params sharded as they are, plus its config) to ``out_dir``.

    Refuses to replace an existing checkpoint unless ``overwrite``. Returns the folder.
    """
    import orbax.checkpoint as ocp

    from dromedary_jax.output_paths import check_out_dir, folder_arg, make_out_dir

    out = os.path.abspath(folder_arg(out_dir, "save_checkpoint out_dir"))
    check_out_dir(out, "save_checkpoint out_dir")
    marker = os.path.join(out, MARKER)
    params_dir = os.path.join(out, PARAMS_DIR)
    if not overwrite and (os.path.exists(marker) or os.path.exists(params_dir)):
        raise UserError(f"{out}: already holds a checkpoint; pass overwrite=True "
                        "(--overwrite) or pick another folder")
    if jax.process_index() == 0:
        make_out_dir(out, "save_checkpoint out_dir")
        if os.path.exists(marker):
            os.remove(marker)  # a half-overwritten folder must not look complete
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, dict(model.params), force=overwrite)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:  # written last, atomically: its presence means the save completed
        write_json_atomic(marker, {"format": "dromedary_jax", "version": FORMAT_VERSION,
                                   "config": config_to_json(model.config)})
    return out


def read_config(path: str, **overrides) -> ModelConfig:
    """The ModelConfig stored in ``path/dromedary_checkpoint.json``, with ``overrides`` (e.g.
    ``dtype``) applied. UserError naming the marker when it is missing, not JSON, has no
    ``config`` object, or has a non-integer or newer format ``version``."""
    marker = os.path.join(path, MARKER)
    meta = read_json(marker)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        got = (f"a JSON {type(meta).__name__}" if not isinstance(meta, dict) else
               "no 'config' object" if "config" not in meta else
               f"'config' of type {type(meta['config']).__name__}")
        raise UserError(f"{marker}: not a valid dromedary_jax checkpoint marker (expected a JSON "
                        f"object with a 'config' object, got {got})")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{marker}: version={version!r} must be an integer")
    if version > FORMAT_VERSION:
        raise UserError(f"{marker}: checkpoint format version {version} is newer than "
                        f"this dromedary_jax supports ({FORMAT_VERSION}); upgrade the package")
    return config_from_json(meta["config"], source=marker, **overrides)


def _reason(e: BaseException, limit: int = 300) -> str:
    """The innermost cause of an Orbax/TensorStore error, as one short line."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_stored(ckptr, params_dir: str, shapes: dict, marker: str) -> None:
    """The stored tree has exactly our parameter names and shapes (checked from the metadata, so
    a mismatch never starts the restore)."""
    try:
        stored = ckptr.metadata(params_dir).item_metadata
        stored = {k: tuple(v.shape) for k, v in stored.items()}
    except Exception as e:  # no/corrupt _METADATA, a foreign checkpoint
        raise UserError(f"{params_dir}: cannot be read as an Orbax checkpoint ({_reason(e)}); "
                        "save the checkpoint again") from None
    missing = sorted(set(shapes) - set(stored))
    extra = sorted(set(stored) - set(shapes))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unexpected {', '.join(extra)}"] if extra else [])
        raise UserError(f"{params_dir}: does not match {marker}: it {' and '.join(parts)}")
    for k, want in shapes.items():
        if stored[k] != tuple(want):
            raise UserError(f"{params_dir}: parameter {k!r} has shape {stored[k]} but {marker} "
                            f"implies {tuple(want)}; the parameters and the config disagree")


def load_params(path: str, config: ModelConfig, mesh=None) -> dict[str, jax.Array]:
    """Restore the params onto ``mesh`` (or the default device) in ``config.param_dtype``."""
    import orbax.checkpoint as ocp

    params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(params_dir):
        raise UserError(f"{path}: {MARKER} is there but {PARAMS_DIR}/ is missing")
    if not os.listdir(params_dir):
        raise UserError(f"{path}: {PARAMS_DIR}/ is empty; the checkpoint was not saved "
                        "completely (save it again)")
    shapes = param_shapes(config)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {k: dev for k in shapes}
    else:
        shardings = param_shardings(config, mesh)
    target = {k: jax.ShapeDtypeStruct(s, config.param_dtype, sharding=shardings[k])
              for k, s in shapes.items()}
    with ocp.StandardCheckpointer() as ckptr:
        _check_stored(ckptr, params_dir, shapes, marker)
        try:
            return ckptr.restore(params_dir, target)
        except Exception as e:  # missing/corrupt array files (TensorStore errors), ...
            raise UserError(f"{params_dir}: cannot be restored ({_reason(e)}); the checkpoint is "
                            "incomplete or damaged (save it again)") from None


__all__ = ["save_checkpoint", "read_config", "load_params", "MARKER"]
