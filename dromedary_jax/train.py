"""Stand-alone supervised fine-tune from a config file.

    python -m dromedary_jax.train --config configs/sft_tiny.py --workdir DIR \\
        --config.data.train_files=RECORDS.jsonl --config.tokenizer=TOKENIZER.model

``RECORDS.jsonl``: JSON lines with "prompt" and "response" (several files: comma-separated, globs
allowed); ``TOKENIZER.model``: a SentencePiece ``.model``, a ``tokenizer.json`` or a folder
holding one. Both are required: a config file names none by default. Any other config value is
overridden the same way (``--config.train.learning_rate=1e-3``, the device mesh
``--config.mesh.shape=1,-1,1`` as data,fsdp,tensor with one -1); flags are absl's
(``--name value`` or ``--name=value``).

Model: ``model.checkpoint`` (a Hugging Face, Meta or dromedary_jax folder, read with
``dj.load_model``); when it is empty the ``model.preset`` is initialised RANDOMLY from
``model.seed`` (for demos and tests only). Rerunning the same command in the same workdir
resumes from the newest checkpoint there. At the end the final weights (LoRA merged in) are
exported to ``<workdir>/final`` (``export.format``: checkpoint | hf | none); a LoRA fine-tune
also writes its adapters alone as a PEFT adapter folder ``<workdir>/adapter``.

Before anything is loaded, every config value is checked (``training.config.validate``), the
tokenizer, the data files and the model checkpoint must exist, and the workdir is locked (one run
at a time). Bad input or config: one ``error: config.<key>: ...`` line and exit status 2;
Ctrl-C / SIGTERM: one ``interrupted`` line, exit 130 / 143, and the same command resumes.
``main(argv)`` can be called in-process (``main(["train", "--config", ...])``).
"""
from __future__ import annotations

import os
import sys

from dromedary_jax.errors import UserError, absl_cli_flags, check_workdir, cli_main


def _define_flags(fv, argv) -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "fine-tune config file (.py)",
                                    lock_config=False, flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics, data)",
                        flag_values=fv)


def build_model(cfg, mesh=None):
    """The model to fine-tune: a checkpoint folder, or a randomly initialised preset, placed on
    ``mesh`` (needed with several processes: each host holds only its shards), its weights in
    ``checkpoint.dtypes.finetune_param_dtype`` (float32 masters for a full fine-tune; for LoRA
    the frozen base in bfloat16 when ``model.dtype`` is bfloat16)."""
    from flax import nnx

    from dromedary_jax.checkpoint.dtypes import finetune_param_dtype, stored_param_dtype
    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama

    mcfg = cfg.model
    dtype = mcfg.get("dtype", "float32")
    lora = bool(cfg.lora.enabled)
    if mcfg.get("checkpoint"):
        from dromedary_jax.checkpoint import load_model

        param_dtype = finetune_param_dtype(dtype, lora=lora,
                                           stored=stored_param_dtype(mcfg.checkpoint))
        model = load_model(mcfg.checkpoint, dtype=dtype, mesh=mesh, param_dtype=param_dtype)
        config = model.config.replace(remat=mcfg.get("remat", "none"))
        return Llama(config, params=model.params, mesh=model.mesh)
    config = preset(mcfg.preset, dtype=dtype, remat=mcfg.get("remat", "none"),
                    param_dtype=finetune_param_dtype(dtype, lora=lora))
    return Llama(config, rngs=nnx.Rngs(int(mcfg.get("seed", 0))), mesh=mesh)


def check_inputs(cfg) -> None:
    """What must hold before JAX starts or anything is written: every config value
    (``config.<key>: ...``), the tokenizer path, the model checkpoint or preset."""
    from dromedary_jax.training.config import validate

    validate(cfg, where="config.")
    if not cfg.get("tokenizer"):
        raise UserError("config.tokenizer is empty: set --config.tokenizer=PATH")
    if not os.path.exists(cfg.tokenizer):
        raise UserError(f"config.tokenizer={cfg.tokenizer}: does not exist")
    if cfg.model.get("checkpoint"):
        from dromedary_jax.checkpoint import detect_format

        try:
            detect_format(cfg.model.checkpoint)
        except UserError as e:
            msg = str(e)
            path = cfg.model.checkpoint
            msg = msg[len(path):].lstrip(" :") if msg.startswith(path) else msg
            raise UserError(f"config.model.checkpoint={path}: {msg}") from None
    else:
        from dromedary_jax.model.config import preset

        try:
            preset(cfg.model.preset)
        except UserError as e:
            raise UserError(f"config.model.preset: {e}") from None


def export(result, cfg, workdir: str, tokenizer=None) -> str | None:
    """The fine-tuned model as ``<workdir>/final`` (``export.format``), with ``tokenizer`` and the
    chat template of the meta-prompt it was trained under, so transformers' AutoTokenizer and
    the eval CLI open the folder as it is. A LoRA fine-tune (``result.lora`` set) also gets its
    adapters alone as a PEFT folder ``<workdir>/adapter`` (``pipeline.finetune.save_adapter``,
    base ``model.checkpoint``), unless the format is none."""
    fmt = cfg.export.format
    out = os.path.join(workdir, "final")
    if fmt == "none":
        return None
    if fmt == "checkpoint":
        from dromedary_jax.checkpoint import save_checkpoint

        path = save_checkpoint(result.model, out, overwrite=True)
    elif fmt == "hf":
        from dromedary_jax.checkpoint import save_hf

        path = save_hf(result.model, out, overwrite=True)  # a rerun re-exports, as above
    else:
        raise UserError(f"config.export.format={fmt!r}: use checkpoint, hf or none")
    if tokenizer is not None:
        import jax

        if jax.process_index() == 0:
            from dromedary_jax.pipeline.finetune import save_model_tokenizer
            from dromedary_jax.training.examples import load_template

            save_model_tokenizer(tokenizer, out, load_template(cfg.data.template,
                                                                cfg.data.template_file))
    if getattr(result, "lora", None) is not None:
        from dromedary_jax.pipeline.finetune import ADAPTER_DIR, save_adapter
        from dromedary_jax.training.examples import load_template

        save_adapter(result.lora, cfg.lora, result.model.config, tokenizer,
                     load_template(cfg.data.template, cfg.data.template_file),
                     os.path.join(workdir, ADAPTER_DIR),
                     base_model=cfg.model.get("checkpoint") or None, overwrite=True)
    return path


@cli_main
def main(argv=None) -> None:
    """Run the fine-tune CLI with ``argv`` (program name first; default ``sys.argv``)."""
    from absl import flags, logging

    argv = list(sys.argv if argv is None else argv)
    fv = absl_cli_flags(argv, _define_flags, cli="train", usage=__doc__)
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax) only on request
        logging.set_verbosity(logging.WARNING)
    if fv.config is None:
        raise UserError("--config is required (e.g. --config configs/sft_tiny.py)")
    workdir = check_workdir(fv.workdir)
    from dromedary_jax.training.config import with_defaults

    cfg = with_defaults(fv.config)
    check_inputs(cfg)

    from dromedary_jax.distributed import maybe_initialize

    dist = cfg.get("distributed")  # multi-host: before any JAX call (else DROMEDARY_* env)
    maybe_initialize(dist.to_dict() if hasattr(dist, "to_dict") else dist)
    import jax

    from dromedary_jax.workdir_lock import workdir_lock

    with workdir_lock(workdir, jax.process_index()):
        msg = _train(cfg, workdir)
    if jax.process_index() == 0:
        print(msg, flush=True)


def _train(cfg, workdir: str) -> str:
    from dromedary_jax import sharding as shd
    from dromedary_jax.tokenizer import load_tokenizer
    from dromedary_jax.training import prepare_data, run_sft
    from dromedary_jax.training.config import config_path

    with config_path("config."):  # the library names keys as in the fine-tune config
        tokenizer = load_tokenizer(cfg.tokenizer)
        prepare_data(cfg, tokenizer, None, workdir)  # bad records fail here, before model loading
        mesh = shd.make_mesh(tuple(cfg.mesh.shape)) if "mesh" in cfg else None
        model = build_model(cfg, mesh)
        result = run_sft(cfg, model, tokenizer, None, workdir, mesh=mesh)
        path = export(result, cfg, workdir, tokenizer)
    msg = f"done: {result.step} steps"
    if result.final_loss is not None:
        msg += f", final loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        msg += f", eval loss {result.eval_loss:.4f}"
    if path:
        msg += f", weights in {path}"
    return msg


@cli_main
def _entry() -> None:
    from absl import flags
    from absl import logging as absl_logging

    rest = flags.FLAGS(sys.argv, known_only=True)  # absl's own flags (--verbosity, ...)
    absl_logging.use_absl_handler()
    main(rest)


if __name__ == "__main__":
    _entry()
