"""Which dtype a model's weights are held in, for each use: the rule, in one place.

A run's ``model.dtype`` is its COMPUTE dtype: every matmul casts its weight to the activations'
dtype (``model.llama.matmul``), so a model computing in bfloat16 reads its weights as bfloat16
whatever dtype they are held in. Holding them in float32 then only costs memory (a 7B model:
25.1 GiB instead of 12.6 GiB); only the RMSNorm scales, applied in float32, get rounded. So:

* sampling and scoring (:func:`sampling_param_dtype`): bfloat16 when the compute dtype is
  bfloat16, or when the checkpoint itself stores bfloat16 (a bf16 checkpoint is never upcast to
  float32 just to sample: float32 compute reads the same values either way); else float32;
* fine-tunes (:func:`finetune_param_dtype`): a full fine-tune trains float32 master weights; a
  LoRA fine-tune trains float32 adapters and holds the frozen base as sampling does;
* the weights a LoRA fine-tune returns (:func:`merged_param_dtype`): float32 when it computed in
  float32, else the base's dtype;
* exports (:func:`export_dtype`): bfloat16 for a bfloat16 run, float32 for a float32 run.

:func:`stored_param_dtype` reads what a checkpoint stores without loading it.
"""
from __future__ import annotations

import glob
import json
import os
import struct

# safetensors header dtype names -> ours
_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


def _safetensors_float_dtypes(path: str) -> set[str] | None:
    """The float dtypes (our names) of the tensors in one safetensors file, read from its
    header only; None when the file is not readable as safetensors."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > _HEADER_LIMIT:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    out = set()
    for key, info in header.items():
        if key != "__metadata__" and isinstance(info, dict):
            name = _SAFETENSORS_FLOATS.get(str(info.get("dtype")))
            if name:
                out.add(name)
    return out


def stored_param_dtype(path) -> str | None:
    """The dtype a checkpoint stores its weights in, read without loading them: ``"float32"``,
    ``"bfloat16"`` or ``"float16"``; None when unknown.

    Hugging Face folder: the safetensors headers (None when their tensors mix float dtypes).
    dromedary_jax checkpoint: its marker's ``param_dtype``. Meta ``.pth`` folders and GGUF files
    (dequantized on load) and anything unreadable: None (then the compute dtype decides).
    Never raises."""
    try:
        path = os.fspath(path)
    except TypeError:
        return None
    if not path or not os.path.isdir(path):
        return None
    from dromedary_jax.checkpoint.orbax_io import MARKER

    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                dt = json.load(f)["config"].get("param_dtype", "float32")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return dt if dt in ("float32", "bfloat16") else None
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    files = glob.glob(os.path.join(path, "*.safetensors"))
    if not files:
        return None
    found: set[str] = set()
    for fp in files:
        got = _safetensors_float_dtypes(fp)
        if got is None:
            return None
        found |= got
    if len(found) != 1:
        return None
    (dt,) = found
    return dt if dt in ("float32", "bfloat16", "float16") else None


def _check_compute(dtype: str) -> str:
    if dtype not in ("float32", "bfloat16"):
        from dromedary_jax.errors import UserError

        raise UserError(f"compute dtype={dtype!r}: use float32 or bfloat16")
    return dtype


def sampling_param_dtype(dtype: str, stored: str | None = None) -> str:
    """The dtype to hold weights in for sampling or scoring with compute dtype ``dtype``
    (float32 | bfloat16; UserError otherwise): ``"bfloat16"`` when ``dtype`` is bfloat16 or the
    checkpoint stores bfloat16 (``stored``, from :func:`stored_param_dtype`), else
    ``"float32"``. The matmuls read every weight in the compute dtype, so this changes no
    matmul's numbers; only the RMSNorm scales (applied in float32) are rounded to bfloat16 when a
    bfloat16 run samples from a float32 checkpoint."""
    if _check_compute(dtype) == "bfloat16" or stored == "bfloat16":
        return "bfloat16"
    return "float32"


def finetune_param_dtype(dtype: str, *, lora: bool, stored: str | None = None) -> str:
    """The dtype a fine-tune holds the model's weights in: ``"float32"`` master weights for a
    full fine-tune; for LoRA (float32 adapters, frozen base) the base as sampling holds it
    (:func:`sampling_param_dtype`), so a bfloat16 run keeps its frozen base in bfloat16."""
    _check_compute(dtype)
    return sampling_param_dtype(dtype, stored) if lora else "float32"


def merged_param_dtype(dtype: str, base: str) -> str:
    """The dtype of the weights a LoRA fine-tune returns (adapters merged into the base):
    ``"float32"`` for float32 compute (an adapter's small update survives the merge; the same
    numbers as a float32 base), else the base's own dtype ``base``."""
    return "float32" if _check_compute(dtype) == "float32" else base


def export_dtype(dtype: str) -> str:
    """The storage dtype of an exported Hugging Face folder for a run computing in ``dtype``:
    bfloat16 for a bfloat16 run, float32 for a float32 run."""
    return _check_compute(dtype)


__all__ = ["stored_param_dtype", "sampling_param_dtype", "finetune_param_dtype",
           "merged_param_dtype", "export_dtype"]
