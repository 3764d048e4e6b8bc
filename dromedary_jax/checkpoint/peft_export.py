"""LoRA adapters as a Hugging Face PEFT adapter folder.

    save_peft_adapter(lora, config, out_dir, alpha=16.0, base_model_name_or_path="path/to/base")

writes ``adapter_config.json`` and ``adapter_model.safetensors`` (float32), the folder that
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` loads on
the base ``LlamaForCausalLM`` the adapters were trained on.

Layouts. Our adapter of a projection ``W [L, *in, *out]`` is ``a [L, *in, r]`` and
``b [L, r, *out]``, adding ``scale * (x @ a) @ b`` with ``scale = alpha / r``
(``training/lora.py``). A PEFT LoRA layer on an HF ``Linear`` (weight ``[out, in]``) adds
``scaling * x @ A.T @ B.T`` with ``lora_A.weight: [r, in]``, ``lora_B.weight: [out, r]`` and
``scaling = lora_alpha / r`` (``use_rslora`` false), so ``lora_alpha = alpha`` and ``r = rank``
give the same scale. Our split ``in`` / ``out`` axes flatten in HF's order
(``checkpoint/hf_mapping.py``: ``wq [D, H, hd]`` is ``q_proj [H * hd, D]`` with row
``h * hd + j``, ``wo [H, hd, D]`` is ``o_proj [D, H * hd]``; q/k rows are in HF's rotate-half
order on both sides), hence per layer ``A = a.reshape(in, r).T`` and ``B = b.reshape(r, out).T``.

Tensor names are PEFT's saved names (the adapter name left out):
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` and likewise for
``k_proj``, ``v_proj``, ``o_proj`` and ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

from dromedary_jax.checkpoint.hf_mapping import _LAYER_HF
from dromedary_jax.errors import UserError
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.llama import PROJ_IN_DIMS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# our projection name -> the HF module path inside a decoder layer (q_proj, ..., down_proj)
HF_MODULE = {name: _LAYER_HF[name][: -len(".weight")] for name in PROJ_IN_DIMS}


def peft_target_modules(targets) -> list[str]:
    """PEFT ``target_modules`` (``q_proj``, ``gate_proj``, ...) for our target names (``wq``,
    ``w_gate``, ...), in the layer's order (q, k, v, o, gate, up, down) whatever the order given.
    UserError on an unknown name."""
    from dromedary_jax.training.lora import check_targets

    chosen = set(check_targets(targets))
    return [HF_MODULE[t].rsplit(".", 1)[-1] for t in PROJ_IN_DIMS if t in chosen]


def lora_rank(lora: Mapping, config: ModelConfig) -> int:
    """The rank of ``lora`` ({target: {"a", "b"}}), after checking every tensor has the shape
    ``training.lora.lora_shapes(config, rank, targets)`` gives. UserError otherwise."""
    from dromedary_jax.training.lora import check_targets, lora_shapes

    if not isinstance(lora, Mapping) or not lora:
        raise UserError(f"lora: expected the adapters as {{target: {{'a': array, 'b': array}}}} "
                        f"(e.g. TrainResult.lora), got {type(lora).__name__}"
                        + (" (empty)" if isinstance(lora, Mapping) else ""))
    targets = check_targets(list(lora))
    for name in targets:
        ab = lora[name]
        if not isinstance(ab, Mapping) or set(ab) != {"a", "b"}:
            raise UserError(f"lora[{name!r}]: expected {{'a': array, 'b': array}}")
    a_shape = tuple(np.shape(lora[targets[0]]["a"]))
    rank = int(a_shape[-1]) if a_shape else 0
    want = lora_shapes(config, max(rank, 1), targets)
    for name in targets:
        for k in ("a", "b"):
            got = tuple(np.shape(lora[name][k]))
            if got != tuple(want[name][k]):
                raise UserError(f"lora[{name!r}][{k!r}] has shape {got} but the model config "
                                f"(and rank {rank}) implies {tuple(want[name][k])}; the adapters "
                                "were not trained on this model")
    return rank


def peft_tensors(lora: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """The adapters as PEFT's state dict (float32 numpy): per layer ``i`` and target,
    ``base_model.model.model.layers.{i}.<module>.lora_A.weight [r, in]`` and
    ``...lora_B.weight [out, r]``. Sharded arrays are gathered (every process must call this in
    a multi-host run). UserError on a shape that does not fit ``config``."""
    from dromedary_jax.checkpoint.hf import _gather

    rank = lora_rank(lora, config)
    out = {}
    for name in lora:
        a = _gather(lora[name]["a"]).astype(np.float32)
        b = _gather(lora[name]["b"]).astype(np.float32)
        for i in range(config.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULE[name]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return out


def peft_adapter_config(rank: int, alpha: float, targets, *, dropout: float = 0.0,
                        base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` of a LoRA adapter (PEFT ``LoraConfig`` fields that every
    PEFT version since 0.7 reads): ``r``, ``lora_alpha`` (so PEFT's scaling ``lora_alpha / r``
    equals ours, ``alpha / rank``), ``use_rslora`` false, ``target_modules``, ``task_type``
    CAUSAL_LM. UserError on a rank <= 0, an alpha <= 0 or a dropout outside [0, 1)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise UserError(f"rank={rank!r}: expected a positive integer")
    try:
        alpha = float(alpha)
        dropout = float(dropout)
    except (TypeError, ValueError):
        raise UserError(f"alpha={alpha!r}, dropout={dropout!r}: expected numbers") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"alpha={alpha}: expected a number > 0 (the LoRA scale is alpha / rank)")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout={dropout}: expected a number in [0, 1)")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise UserError(f"base_model_name_or_path={base_model_name_or_path!r}: expected a str "
                        "(a path or a Hub model id) or None")
    return {
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "r": int(rank),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": dropout,
        "use_rslora": False,
        "target_modules": peft_target_modules(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft_adapter(lora: Mapping, config: ModelConfig, out_dir, *, alpha: float,
                      dropout: float = 0.0, base_model_name_or_path: str | None = None,
                      overwrite: bool = False) -> list[str]:
    """Write LoRA adapters as a PEFT adapter folder; returns the paths written.

    ``lora``: ``{target: {"a": [L, *in, r], "b": [L, r, *out]}}`` as ``training.lora`` makes
    them (``TrainResult.lora``; jax or numpy arrays, sharded ones are gathered), targets among
    ``wq wk wv wo w_gate w_up w_down``. ``config``: the base model's :class:`ModelConfig`.
    ``alpha``: the LoRA alpha it was trained with (scale ``alpha / r``; ``r`` is read from the
    shapes). ``base_model_name_or_path``: recorded in ``adapter_config.json`` (what
    ``peft.AutoPeftModelForCausalLM`` loads the base from); give a Hugging Face folder or Hub id.

    Writes ``adapter_model.safetensors`` (float32) then ``adapter_config.json``. Refuses a
    folder that exists and is not empty unless ``overwrite`` (then those two files are
    replaced). Every process calls this in a multi-host run; process 0 writes. UserError on
    adapters that do not fit ``config``, bad settings or an unusable ``out_dir``.
    """
    import jax
    from safetensors.numpy import save_file

    from dromedary_jax.output_paths import check_out_dir, folder_arg, is_nonempty_dir, make_out_dir

    out_dir = folder_arg(out_dir, "save_peft_adapter out_dir")
    check_out_dir(out_dir, "save_peft_adapter out_dir")
    if not overwrite and is_nonempty_dir(out_dir):
        raise UserError(f"save_peft_adapter: {out_dir} is not empty; pass overwrite=True to "
                        "replace the adapter files in it, or choose an empty folder")
    rank = lora_rank(lora, config)
    adapter_cfg = peft_adapter_config(rank, alpha, list(lora), dropout=dropout,
                                      base_model_name_or_path=base_model_name_or_path)
    tensors = peft_tensors(lora, config)  # every process: gathers sharded adapters
    paths = [os.path.join(out_dir, WEIGHTS_FILE), os.path.join(out_dir, CONFIG_FILE)]
    if jax.process_index() != 0:
        return paths
    make_out_dir(out_dir, "save_peft_adapter out_dir")
    save_file(tensors, paths[0], metadata={"format": "pt"})
    from dromedary_jax.jsonl import write_json_atomic

    write_json_atomic(paths[1], adapter_cfg)
    return paths


def read_peft_adapter_config(folder: str) -> dict:
    """``folder/adapter_config.json`` as a dict (UserError naming the file when missing or
    malformed)."""
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; expected a PEFT adapter folder") from None
    except ValueError as e:
        raise UserError(f"{path}: malformed JSON ({e})") from None


__all__ = ["save_peft_adapter", "peft_tensors", "peft_adapter_config", "peft_target_modules",
           "read_peft_adapter_config", "lora_rank", "CONFIG_FILE", "WEIGHTS_FILE"]
