"""Stage 4, verbose cloning: the ENGRAVED model answers every kept stage-2 question again in
"detailed mode" (paper: temperature 0.3, top_p 0.7, 3-/4-gram repetition penalties, 512 new
tokens); the answers are cleaned and filtered; then the BASE model is fine-tuned on them under
the short distillation meta-prompt (context distillation, 768 tokens).

Outputs in ``<workdir>/verbose_clone/``: responses-*.jsonl (raw generations, resumable),
kept.jsonl, funnel.md/.png, sft_*.jsonl, train/, model/ (the final model) and hf/ (the final
model as a Hugging Face folder).
"""
from __future__ import annotations

import os
import re
import shutil
from collections import Counter

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline import answer_filters as AF
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.finetune import (finetune_and_save, kept_answers, meta_template,
                                             question_text, save_model_tokenizer, section_fingerprint,
                                             train_config, write_sft_files)
from dromedary_jax.pipeline.generation import generate_into
from dromedary_jax.pipeline.records import text_digest, write_jsonl_atomic
from dromedary_jax.pipeline.reports.funnel import funnel_steps, write_funnel
from dromedary_jax.pipeline.resources import Resources, load_run_model, model_generator, model_kind
from dromedary_jax.pipeline.stage import DefaultStage, StageContext, StageResult
from dromedary_jax.sampling.settings import SamplingSettings

STAGE = "verbose_clone"
REASONS = ("empty", "too_short", *AF.REASONS, "persona_leak", "duplicate")


def clean_answer(raw: str, assistant: D.Assistant, leak_markers, min_chars: int, question: str = ""):
    """(answer, filter reason or None) for one raw generation, by the rule stage 2 shares
    (``answer_filters``): cut at the next turn (``User:``, ``<Name>:``, ``<Name> (...):`` for the
    assistant's name or the prompt codename, a ``# <Name>`` header, a ``###`` separator line) and
    at the first repeated sentence, trim a sentence cut off by the token limit; then the first of
    ``REASONS`` that applies: empty, too_short (< ``min_chars``), thoughts_leak, turn_marker,
    repetition (see ``answer_filters``), persona_leak (one of ``leak_markers``, any case).
    ``question``: the user's question (phrases in it do not count as leaks)."""
    names = tuple(dict.fromkeys(n for n in (assistant.name, assistant.prompt_name) if n))
    answer, _ = AF.clean(raw, names)
    if not answer:
        return answer, "empty"
    if len(answer) < min_chars:
        return answer, "too_short"
    bad = AF.degenerate(answer, names, question=question)
    if bad:
        return answer, bad
    low = answer.lower()
    if any(m.lower() in low and m.lower() not in question.lower() for m in leak_markers):
        return answer, "persona_leak"
    return answer, None


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def question_of(prompt: str, assistant: D.Assistant) -> str:
    """The user's question inside a detailed-mode prompt (the text of its last ``User:`` turn,
    up to the closing ``<Name> (...):`` line); "" when the prompt has no ``User:`` turn."""
    i = prompt.rfind("User:")
    if i < 0:
        return ""
    body = prompt[i + len("User:"):]
    end = re.search(rf"\n\s*{re.escape(assistant.name)}(?: \([^()\n]*\))?:\s*$", body)
    return (body[:end.start()] if end else body).strip()


def filter_records(recs, assistant, v) -> list[dict]:
    """Each record with its cleaned answer and filter reason; duplicates (same words as an
    earlier answer, in id order) are dropped."""
    seen: set[str] = set()
    out = []
    for r in sorted(recs, key=lambda r: r["id"]):
        answer, reason = clean_answer(r["raw"], assistant, v.leak_markers, v.min_answer_chars,
                                      question_of(r.get("prompt", ""), assistant))
        if reason is None:
            key = _normal(answer)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        out.append({**r, "answer": answer, "filter": reason})
    return out


def engraved_generator(config, workdir: str, res: Resources):
    """The generator stage 4 samples with: a ModelGenerator around the engraved model
    (``<workdir>/engrave/model``, loaded on the run's mesh and dtype as ``load_run_model`` does)
    with the base model's tokenizer; the run's scripted fake when ``model.kind`` is
    "scripted"."""
    if model_kind(config.model) == "scripted":
        return res.generator
    tokenizer = res.tokenizer
    model = load_run_model(config.model, os.path.join(workdir, "engrave", "model"))
    return model_generator(model, tokenizer, config.model)


def export_hf(model, out_dir: str, hosts, tokenizer=None, meta_prompt: str = "") -> None:
    """Write the HF folder atomically (a temp folder renamed into place), with ``tokenizer``
    and the chat template of ``meta_prompt`` (see ``finetune.chat_template``). Every process
    calls this (save_hf gathers each tensor across hosts); process 0 writes."""
    from dromedary_jax.checkpoint import save_hf

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return
    tmp = out_dir + ".tmp"
    if hosts.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    hosts.barrier(f"{out_dir}-export-start")
    save_hf(model, tmp)
    if hosts.is_main:
        if tokenizer is not None:
            save_model_tokenizer(tokenizer, tmp, meta_prompt)
        os.replace(tmp, out_dir)
    hosts.barrier(f"{out_dir}-export-done")


def meta_prompts(config) -> tuple[D.Assistant, str, str]:
    """(assistant, generation meta-prompt, distillation meta-prompt) of this stage."""
    v = config.verbose_clone
    assistant = D.load_assistant(config.data)
    return (assistant, meta_template(v.template, "verbose_clone.template", assistant),
            meta_template(v.distill_template, "verbose_clone.distill_template", assistant))


class VerboseClone(DefaultStage):
    """Stage 4 (see the module docstring) as a :class:`~dromedary_jax.pipeline.stage.Stage`."""

    name = STAGE

    def requires(self, config) -> tuple[str, ...]:
        """It samples from the engraved model (and re-asks stage 2's kept questions)."""
        return ("engrave",)

    def check(self, config, workdir: str) -> None:
        """Both meta-prompt templates read and fill."""
        meta_prompts(config)

    def read_inputs(self, config, workdir: str) -> dict:
        """{"questions": stage 2's kept records (first ``max_questions``), "meta": (assistant,
        generation template, distillation template)}."""
        questions = kept_answers(workdir)
        if config.verbose_clone.max_questions > 0:
            questions = questions[: config.verbose_clone.max_questions]
        return {"questions": questions, "meta": meta_prompts(config)}

    def fingerprint(self, config, inputs: dict, upstream) -> dict:
        """Seed, this section (bookkeeping keys left out), the engrave hash, the templates."""
        _, gen_template, distill = inputs["meta"]
        return {"stage": STAGE, "seed": config.seed,
                "verbose_clone": section_fingerprint(config.verbose_clone),
                "inputs": upstream["engrave"]["config_hash"],
                "templates": text_digest(gen_template + distill)}

    def run(self, ctx: StageContext, inputs: dict) -> StageResult:
        """Generate detailed answers with the engraved model, filter them, fine-tune the base
        model on the kept ones, export the HF folder."""
        config, stage, workdir, res = ctx.config, ctx.dir, ctx.workdir, ctx.resources
        v = config.verbose_clone
        questions = inputs["questions"]
        assistant, gen_template, distill = inputs["meta"]
        by_id = {q["id"]: q for q in questions}
        items = [{"id": q["id"], "prompt": gen_template.replace("{prompt}", question_text(q))}
                 for q in questions]
        generate_into(stage, "responses", items, engraved_generator(config, workdir, res),
                      batch_size=v.batch_size, seed=int(config.seed), settings=SamplingSettings.from_config(v, STAGE),
                      make_record=lambda it, raw: {"id": it["id"], "prompt": it["prompt"], "raw": raw},
                      label=STAGE)
        recs = filter_records([r for r in stage.records("responses") if r["id"] in by_id], assistant, v)
        kept = [{"id": r["id"], "prompt": question_text(by_id[r["id"]]), "response": " " + r["answer"]}
                for r in recs if r["filter"] is None]
        if stage.hosts.is_main:
            write_jsonl_atomic(stage.file("kept.jsonl"), kept)
            write_funnel(stage.path, STAGE, [("Verbose answers of the engraved model",
                                              funnel_steps("generated", len(recs), [r["filter"] for r in recs], REASONS))],
                         notes=[f"Sampling: T={v.temperature}, top_p={v.top_p}, n-gram penalties "
                                f"{[tuple(p) for p in v.ngram_penalties]}, {v.max_new_tokens} new tokens."])
        if not kept:
            raise UserError(f"{stage.path}: every verbose answer was filtered out ({dict(Counter(r['filter'] for r in recs))}); "
                            f"see {stage.path}/funnel.md (a tiny random model may need "
                            f"--config.verbose_clone.min_answer_chars=0)")
        files, n_train, n_held = write_sft_files(stage, kept, v.heldout_fraction, config.seed)
        base, tokenizer = res.finetune_model_and_tokenizer(v.train)
        metrics = finetune_and_save(stage, train_config(v.train, distill), base, tokenizer, files, n_held,
                                    base_model=config.model.checkpoint or None)
        outputs = {"model": metrics["model"], "metrics": metrics["metrics"], "kept": stage.file("kept.jsonl"), **files}
        if v.export_hf:
            # on the run's mesh and dtype (a 65B model does not fit one chip); save_hf gathers per tensor
            export_hf(load_run_model(config.model, metrics["model"]), stage.file("hf"), stage.hosts,
                      tokenizer, distill)
            outputs["hf"] = stage.file("hf")
        counts = {"generated": len(recs), "kept": len(kept),
                  "filtered": dict(Counter(r["filter"] for r in recs if r["filter"])),
                  "train": n_train, "heldout": n_held,
                  **{k: v_ for k, v_ in metrics.items() if k not in ("metrics", "model")}}
        return StageResult(counts, outputs)
