"""Stand-alone supervised fine-tune from a config file.

    python -m dromedary_jax.train --config configs/sft_tiny.py --workdir /tmp/sft \
        --config.data.train_files=records.jsonl --config.tokenizer=tokenizer.model \
        --config.train.learning_rate=1e-3

Model: ``model.checkpoint`` (a Hugging Face, Meta or dromedary_jax folder, read with
``dj.load_model``); when it is empty the ``model.preset`` is initialised RANDOMLY from
``model.seed`` (for demos and tests only). Rerunning the same command in the same workdir
resumes from the newest checkpoint there. At the end the final weights (LoRA merged in) are
exported to ``<workdir>/final`` (``export.format``: checkpoint | hf | none).
Bad input or config: one ``error: ...`` line and exit status 2.
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from dromedary_jax.errors import UserError, check_workdir, cli_main, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "fine-tune config file (.py)",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics, data)")


def build_model(cfg, mesh=None):
    """The model to fine-tune: a checkpoint folder, or a randomly initialised preset, placed on
    ``mesh`` (needed with several processes: each host holds only its shards)."""
    from flax import nnx

    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama

    mcfg = cfg.model
    if mcfg.get("checkpoint"):
        from dromedary_jax.checkpoint import load_model

        model = load_model(mcfg.checkpoint, dtype=mcfg.get("dtype", "float32"), mesh=mesh)
        config = model.config.replace(remat=mcfg.get("remat", "none"))
        return Llama(config, params=model.params, mesh=model.mesh)
    config = preset(mcfg.preset, dtype=mcfg.get("dtype", "float32"),
                    remat=mcfg.get("remat", "none"))
    return Llama(config, rngs=nnx.Rngs(int(mcfg.get("seed", 0))), mesh=mesh)


def export(result, cfg, workdir: str) -> str | None:
    fmt = cfg.export.format
    out = os.path.join(workdir, "final")
    if fmt == "none":
        return None
    if fmt == "checkpoint":
        from dromedary_jax.checkpoint import save_checkpoint

        return save_checkpoint(result.model, out, overwrite=True)
    if fmt == "hf":
        from dromedary_jax.checkpoint import save_hf

        return save_hf(result.model, out, overwrite=True)  # a rerun re-exports, as above
    raise UserError(f"export.format={fmt!r}: use checkpoint, hf or none")


@cli_main
def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax) only on request
        logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    if cfg is None:
        raise UserError("--config is required (e.g. --config configs/sft_tiny.py)")
    check_workdir(workdir)
    from dromedary_jax import sharding as shd
    from dromedary_jax.distributed import maybe_initialize
    from dromedary_jax.tokenizer import load_tokenizer

    dist = cfg.get("distributed")  # multi-host: before any JAX call (else DROMEDARY_* env)
    maybe_initialize(dist.to_dict() if hasattr(dist, "to_dict") else dist)
    from dromedary_jax.training import prepare_data, run_sft

    if not cfg.get("tokenizer"):
        raise UserError("config key tokenizer is empty: set --config.tokenizer=PATH")
    tokenizer = load_tokenizer(cfg.tokenizer)
    prepare_data(cfg, tokenizer, None, workdir)  # bad records fail here, before model loading
    mesh = shd.make_mesh(tuple(cfg.mesh.shape)) if "mesh" in cfg else None
    model = build_model(cfg, mesh)
    result = run_sft(cfg, model, tokenizer, None, workdir, mesh=mesh)
    path = export(result, cfg, workdir)
    msg = f"done: {result.step} steps"
    if result.final_loss is not None:
        msg += f", final loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        msg += f", eval loss {result.eval_loss:.4f}"
    if path:
        msg += f", weights in {path}"
    import jax

    if jax.process_index() == 0:
        print(msg, flush=True)


@cli_main
def _entry() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    _entry()
