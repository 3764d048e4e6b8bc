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

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.finetune import (finetune_and_save, kept_answers, meta_template,
                                             question_text, section_fingerprint, train_config,
                                             write_sft_files)
from dromedary_jax.pipeline.records import text_digest
from dromedary_jax.pipeline.stage import DefaultStage, StageContext, StageResult

STAGE = "engrave"


def sft_examples(config, workdir: str) -> list[dict]:
    """The SFT examples ({id, prompt, response}) from stage 2's kept answers (the first
    ``engrave.max_records`` when > 0; empty answers dropped)."""
    rows = kept_answers(workdir)
    if config.engrave.max_records > 0:
        rows = rows[: config.engrave.max_records]
    return [{"id": r["id"], "prompt": question_text(r), "response": " " + r["output"].strip()}
            for r in rows if r["output"].strip()]


def template_of(config) -> str:
    """This stage's meta-prompt template."""
    return meta_template(config.engrave.template, "engrave.template", D.load_assistant(config.data))


class Engrave(DefaultStage):
    """Stage 3 (see the module docstring) as a :class:`~dromedary_jax.pipeline.stage.Stage`."""

    name = STAGE

    def requires(self, config) -> tuple[str, ...]:
        """It trains on stage 2's kept answers."""
        return ("self_align",)

    def check(self, config, workdir: str) -> None:
        """The meta-prompt template and the assistant files read and fill."""
        template_of(config)

    def read_inputs(self, config, workdir: str) -> dict:
        """{"template": the meta-prompt, "examples": the SFT examples}; UserError when stage 2
        kept none."""
        examples = sft_examples(config, workdir)
        if not examples:
            raise UserError(f"{workdir}/self_align kept no answers, so there is nothing to engrave; "
                            f"see {workdir}/self_align/funnel.md for why they were filtered")
        return {"template": template_of(config), "examples": examples}

    def fingerprint(self, config, inputs: dict, upstream) -> dict:
        """Seed, base model, this section (bookkeeping keys left out), the stage-2 hash and the
        template's digest."""
        return {"stage": STAGE, "seed": config.seed,
                "model": config.model.checkpoint or config.model.preset,
                "model_overrides": dict(config.model.overrides or {}), "dtype": config.model.dtype,
                "engrave": section_fingerprint(config.engrave), "inputs": upstream["self_align"]["config_hash"],
                "template": text_digest(inputs["template"])}

    def run(self, ctx: StageContext, inputs: dict) -> StageResult:
        """Write the SFT split, fine-tune the base model, save the engraved model (and adapter)."""
        config, stage, e = ctx.config, ctx.dir, ctx.config.engrave
        examples = inputs["examples"]
        files, n_train, n_held = write_sft_files(stage, examples, e.heldout_fraction, config.seed)
        model, tokenizer = ctx.resources.finetune_model_and_tokenizer(e.train)
        metrics = finetune_and_save(stage, train_config(e.train, inputs["template"]), model, tokenizer,
                                    files, n_held, base_model=config.model.checkpoint or None)
        counts = {"examples": len(examples), "train": n_train, "heldout": n_held,
                  **{k: v for k, v in metrics.items() if k not in ("metrics", "model")}}
        return StageResult(counts, {"model": metrics["model"], "metrics": metrics["metrics"], **files})

