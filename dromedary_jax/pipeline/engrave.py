"""Stage 3, principle engraving: fine-tune the base model on the kept stage-2 (question, answer)
pairs under a short meta-prompt WITHOUT the principles or exemplars, so the behaviour the
principles produced is engraved into the weights. LoRA by default (paper: r=16, alpha=16,
q/k/v/o, lr 4e-4, 1 epoch, 512 tokens, held-out split); ``engrave.train.lora.enabled=False``
fine-tunes every weight.

Outputs in ``<workdir>/engrave/``: sft_train.jsonl / sft_heldout.jsonl, train/ (Orbax checkpoints,
metrics.jsonl, TensorBoard events), model/ (the engraved model, adapters merged) and, for LoRA,
adapter/ (the adapters alone as a PEFT adapter folder for the base model).
A killed run resumes from its last training checkpoint.
"""
from __future__ import annotations

import os

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline import data as D
from dromedary_jax.pipeline.defaults import complete
from dromedary_jax.pipeline.finetune import (finetune_and_save, meta_template, question_text,
                                             train_config, write_sft_files)
from dromedary_jax.pipeline.records import (Hosts, StageDir, finetune_fingerprint, read_jsonl, stage_done,
                                            text_digest)
from dromedary_jax.pipeline.resources import Resources

STAGE = "engrave"


def require(workdir: str, stage: str, needed_by: str) -> dict:
    """The manifest of a finished earlier stage, or a UserError saying which stage to run."""
    manifest = stage_done(workdir, stage)
    if manifest is None:
        raise UserError(f"stage {needed_by} needs the output of stage {stage}, which has not "
                        f"finished in {workdir}: run it first (--stages {stage},{needed_by})")
    return manifest


def kept_answers(workdir: str) -> list[dict]:
    return read_jsonl(os.path.join(workdir, "self_align", "kept.jsonl"))


def fingerprint_of(section, legacy: bool = False) -> dict:
    """What changes a stage's results: not the sampler batch size nor the fine-tune's checkpoint/
    eval/metrics intervals, progress, mesh or dataset-reading knobs (``legacy``: only metrics and
    debug left out, as older versions did)."""
    d = section.to_dict()
    if legacy:
        for k in ("metrics", "debug"):
            d.get("train", {}).pop(k, None)
        return d
    d.pop("batch_size", None)
    if "train" in d:
        d["train"] = finetune_fingerprint(section.train)
    return d


def _examples(config, workdir: str) -> list[dict]:
    rows = kept_answers(workdir)
    if config.engrave.max_records > 0:
        rows = rows[: config.engrave.max_records]
    return [{"id": r["id"], "prompt": question_text(r), "response": " " + r["output"].strip()}
            for r in rows if r["output"].strip()]


def template_of(config) -> str:
    """This stage's meta-prompt template."""
    return meta_template(config.engrave.template, "engrave.template", D.load_assistant(config.data))


def stage_dir(config, workdir: str, hosts: Hosts = Hosts(), template: str | None = None) -> StageDir:
    """This stage's folder under ``config`` (a completed config; ``template``: its
    :func:`template_of`, when already read); opens nothing."""
    upstream = require(workdir, "self_align", STAGE)
    template = template_of(config) if template is None else template

    def fp(legacy: bool) -> dict:
        return {"stage": STAGE, "seed": config.seed,
                "model": config.model.checkpoint or config.model.preset,
                "model_overrides": dict(config.model.overrides or {}), "dtype": config.model.dtype,
                "engrave": fingerprint_of(config.engrave, legacy), "inputs": upstream["config_hash"],
                "template": text_digest(template)}

    return StageDir(workdir, STAGE, fp(False), hosts, overwrite=config.overwrite, force=config.force,
                    legacy=[fp(True)])


def run(config, workdir: str, resources: Resources | None = None) -> dict:
    config = complete(config)
    res = resources or Resources(config, workdir=workdir)
    e = config.engrave
    require(workdir, "self_align", STAGE)
    template = template_of(config)
    examples = _examples(config, workdir)
    if not examples:
        raise UserError(f"{workdir}/self_align kept no answers, so there is nothing to engrave; "
                        f"see {workdir}/self_align/funnel.md for why they were filtered")
    stage = stage_dir(config, workdir, res.hosts, template)
    if stage.is_done():
        return stage.manifest()["counts"]
    stage.open()
    files, n_train, n_held = write_sft_files(stage, examples, e.heldout_fraction, config.seed)
    model, tokenizer = res.finetune_model_and_tokenizer(e.train)
    metrics = finetune_and_save(stage, train_config(e.train, template), model, tokenizer, files,
                                n_held, base_model=config.model.checkpoint or None)
    counts = {"examples": len(examples), "train": n_train, "heldout": n_held,
              **{k: v for k, v in metrics.items() if k not in ("metrics", "model")}}
    stage.write_manifest(counts, {"model": metrics["model"], "metrics": metrics["metrics"],
                                  **files})
    return counts
