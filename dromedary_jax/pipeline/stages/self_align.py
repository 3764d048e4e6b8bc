"""Stage 2: principle-driven self-alignment.

    SelfAlign (run by runner.run_stage)  ->  <workdir>/self_align/kept.jsonl
                                             ({id, instruction, input, output, ...})

Every question from stage 1 (or ``self_align.questions_file``) is appended to the principle
prompt (principles + exemplars, ending in ``User:``) as ``" <question>\\n\\n<Name> (internal
thoughts):"``; the principle prompt is the generator's shared prefix (prefilled once). The
continuation is parsed into internal thoughts and an answer and cleaned:

* the answer is cleaned by the rule stage 4 shares (``answer_filters.clean``): cut at the next
  turn (a ``User:``, ``<Name>:`` or ``<Name> (...):`` line for the codename or the assistant's
  name, the prompt's ``# <Name>`` header, a ``###`` separator line), and at the first repeated
  sentence (a repetition loop); a trailing sentence cut off by the token limit is trimmed;
* filters, in order (the first failing one is the record's ``filter``): ``no_thoughts``,
  ``no_answer`` (thoughts only), ``empty``, ``too_short`` (< ``min_answer_chars``), then the
  shared ``answer_filters.degenerate`` checks: ``thoughts_leak`` (the answer restates the
  internal-thoughts template: "internal thoughts", principle citations, "The user asks ...", a
  sentence of its own or an exemplar's thoughts), ``turn_marker`` (a turn header left inside
  the answer), ``repetition`` (runaway repetition); then ``exemplar_leak`` (a leak marker of the
  exemplars, an exemplar question or a long exemplar sentence appears in the answer but not in
  the question, or >= ``EXEMPLAR_SHARED_5GRAMS`` word 5-grams of the exemplar answers that are
  not in the question: a reworded copy), ``apology`` (answer starts with one of
  ``apology_prefixes``);
* the prompt codename is renamed to the assistant's name.

Records (shard ``responses``): id, prompt_id (the question's id), prefix_id (digest of the
principle prompt), question, input, source, raw generation, thoughts, answer, cited principles
(keys), filter (null if kept), cleaning flags. Derived: ``kept.jsonl``, ``funnel.md/png``,
``manifest.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import Counter
from typing import Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import write_text_atomic
from dromedary_jax.pipeline import answer_filters as AF
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.generation import generate_into
from dromedary_jax.pipeline.principles import (RenderedPrompt, build_prompt, cited_principles, load_spec,
                                               question_suffix)
from dromedary_jax.pipeline.records import (model_fingerprint, stage_done, strip_non_semantic, text_digest,
                                            write_jsonl_atomic)
from dromedary_jax.pipeline.reports.funnel import funnel_steps, write_funnel
from dromedary_jax.pipeline.stage import DefaultStage, StageContext, StageResult
from dromedary_jax.sampling.settings import SamplingSettings

STAGE = "self_align"
REASONS = ("no_thoughts", "no_answer", "empty", "too_short", *AF.REASONS, "exemplar_leak", "apology")
EXEMPLAR_SHARED_5GRAMS = 4  # word 5-grams shared with the exemplar answers that make a copy
cut_repeated_sentence = AF.cut_repeated_sentence  # (kept importable from here)
trim_incomplete = AF.trim_incomplete


@dataclasses.dataclass
class Cleaner:
    """Parses and filters one raw continuation (after '(internal thoughts):')."""

    prompt: RenderedPrompt
    prompt_name: str
    assistant_name: str
    min_answer_chars: int = 20
    leak_markers: Sequence[str] = ()
    apology_prefixes: Sequence[str] = ()
    rename: bool = True
    require_answer_header: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """Names that open a turn besides ``User``: the codename and the assistant's name."""
        return tuple(dict.fromkeys(n for n in (self.prompt_name, self.assistant_name) if n))

    @functools.cached_property
    def exemplar_thoughts(self) -> tuple[str, ...]:
        """The exemplars' internal thoughts, as rendered in the prompt."""
        pat = rf"(?m)^{re.escape(self.prompt_name)} \(internal thoughts\):[ \t]*(.*)$"
        return tuple(re.findall(pat, self.prompt.prefix))

    def process(self, raw: str, question: str) -> dict:
        """Parse ``raw`` (the continuation of one question's prompt) into ``{"thoughts",
        "answer", "cited_principles", "filter", "cleaning"}``: cut at the first ``User:`` line;
        the thoughts run up to the first ``<codename>:`` line and the answer follows it (with
        ``require_answer_header`` False and no such line, the whole text is the answer and there
        are no thoughts); the answer is cleaned by ``answer_filters.clean``, filtered by
        :meth:`reason` (``filter``: its reason, ``no_thoughts`` / ``no_answer`` when the parse
        fails, None when kept) and the codename renamed to the assistant's name (``rename``).
        ``cleaning``: {cut_user_turn, cut_repeat, trimmed, renamed} flags. ``question``: the
        question text (with its input) the leak checks compare against."""
        flags = {"cut_user_turn": False, "cut_repeat": False, "trimmed": False, "renamed": False}
        text = raw
        m = re.search(r"\n\s*User:", text)
        if m:
            text, flags["cut_user_turn"] = text[:m.start()], True
        name = re.escape(self.prompt_name)
        split = re.search(rf"\n\s*{name}:", text)
        thoughts = (text[:split.start()] if split else text).strip()
        out = {"thoughts": thoughts, "answer": "", "cited_principles": cited_principles(thoughts, self.prompt.numbering),
               "filter": None, "cleaning": flags}
        relaxed = not split and not self.require_answer_header
        if relaxed:  # demo relaxation: the whole continuation is the answer
            out["thoughts"], out["cited_principles"] = "", []
        elif not thoughts:
            out["filter"] = "no_thoughts"
            return out
        elif not split:
            out["filter"] = "no_answer"
            return out
        answer = text if relaxed else text[split.end():]
        answer, cleaned = AF.clean(answer, self.names)  # the rule stage 4 shares
        flags["cut_user_turn"] = flags["cut_user_turn"] or cleaned["cut_user_turn"]
        flags["cut_repeat"], flags["trimmed"] = cleaned["cut_repeat"], cleaned["trimmed"]
        out["filter"] = self.reason(answer, question, out["thoughts"])  # before the rename
        if self.rename and self.prompt_name != self.assistant_name:
            renamed = re.sub(rf"\b{name}\b", self.assistant_name, answer)
            flags["renamed"] = renamed != answer
            answer = renamed
        out["answer"] = answer
        return out

    def reason(self, answer: str, question: str, thoughts: str = "") -> str | None:
        """The first filter ``answer`` (cleaned, not yet renamed) fails, or None."""
        if not answer:
            return "empty"
        if len(answer) < self.min_answer_chars:
            return "too_short"
        bad = AF.degenerate(answer, self.names, question=question, thoughts=(thoughts, *self.exemplar_thoughts),
                            principle_keys=tuple(self.prompt.numbering))
        if bad:
            return bad
        if self.leaks(answer, question):
            return "exemplar_leak"
        if any(answer.startswith(p) for p in self.apology_prefixes if p):
            return "apology"
        return None

    def leaks(self, answer: str, question: str) -> bool:
        """Whether ``answer`` copies the exemplars rather than answering ``question``: a leak
        marker (``leak_markers`` and the exemplars' own), an exemplar question or a long exemplar
        sentence appears in it but not in the question, or it shares at least
        :data:`EXEMPLAR_SHARED_5GRAMS` word 5-grams with the exemplar answers that the question
        does not contain."""
        markers = list(self.leak_markers) + list(self.prompt.leak_markers)
        if any(m and m in answer and m not in question for m in markers):
            return True
        pieces = list(self.prompt.exemplar_questions) + list(self.prompt.exemplar_sentences)
        if any(p and p in answer and p not in question for p in pieces):
            return True
        shared = (_five_grams(answer) - _five_grams(question)) & self.exemplar_five_grams
        return len(shared) >= EXEMPLAR_SHARED_5GRAMS

    @functools.cached_property
    def exemplar_five_grams(self) -> frozenset:
        """Word 5-grams of the exemplar answers, as rendered in the prompt."""
        pat = rf"(?ms)^{re.escape(self.prompt_name)}: (.*?)(?=^User:|\Z)"
        return frozenset().union(*(_five_grams(a) for a in re.findall(pat, self.prompt.prefix)))


def _five_grams(text: str) -> frozenset:
    words = AF.words(text)
    return frozenset(zip(words, words[1:], words[2:], words[3:], words[4:]))


def make_cleaner(config, rendered: RenderedPrompt, assistant: D.Assistant) -> Cleaner:
    """The :class:`Cleaner` for ``rendered`` (the principle prompt) and ``assistant``, with the
    ``config.self_align`` filter settings (min_answer_chars, leak_markers, apology_prefixes,
    rename, require_answer_header)."""
    sa = config.self_align
    return Cleaner(prompt=rendered, prompt_name=assistant.prompt_name, assistant_name=assistant.name,
                   min_answer_chars=int(sa.min_answer_chars), leak_markers=tuple(sa.leak_markers),
                   apology_prefixes=tuple(sa.apology_prefixes), rename=bool(sa.rename),
                   require_answer_header=bool(sa.require_answer_header))


def render_prompt(config) -> tuple[RenderedPrompt, D.Assistant]:
    """The principle prompt (shared prefix) this config asks for."""
    sa = config.self_align
    assistant = D.load_assistant(config.data, sa.prompt_name)
    rendered = build_prompt(load_spec(sa), assistant=assistant.prompt_name, cutoff=assistant.cutoff,
                            drop=tuple(sa.drop_principles), shuffle_seed=int(sa.shuffle_principles_seed),
                            num_exemplars=int(sa.num_exemplars), exemplar_names=tuple(sa.exemplar_names))
    return rendered, assistant


def questions_path(config, workdir: str) -> tuple[str, str]:
    """(question file, its config key): ``self_align.questions_file`` when set, else stage 1's
    ``<workdir>/self_instruct/prompts.jsonl``; UserError when that is used but stage 1 has not
    finished or the file is missing."""
    sa = config.self_align
    if sa.questions_file:
        return sa.questions_file, "self_align.questions_file"
    path = os.path.join(workdir, "self_instruct", "prompts.jsonl")
    if not stage_done(workdir, "self_instruct") or not os.path.exists(path):
        raise UserError(f"config.self_align.questions_file is empty and {path} does not exist yet: run "
                        f"the self_instruct stage first or point questions_file at a question file")
    return path, "self_align.questions_file"


def stage_questions(config, workdir: str) -> list[dict]:
    """The questions stage 2 answers (``data_files.load_question_file`` records: id,
    instruction, input, source, question_type) from :func:`questions_path`, cut to the first
    ``self_align.max_questions`` when that is > 0. UserError for a missing, malformed or empty
    file."""
    qpath, qkey = questions_path(config, workdir)
    questions = D.load_question_file(qpath, qkey)
    if config.self_align.max_questions > 0:
        questions = questions[: config.self_align.max_questions]
    return questions


class SelfAlign(DefaultStage):
    """Stage 2 (see the module docstring) as a :class:`~dromedary_jax.pipeline.stage.Stage`."""

    name = STAGE

    def requires(self, config) -> tuple[str, ...]:
        """Stage 1's questions, unless ``self_align.questions_file`` names a question file."""
        return () if config.self_align.questions_file else ("self_instruct",)

    def check(self, config, workdir: str) -> None:
        """The principle prompt renders; the question file (or a finished stage 1's
        prompts.jsonl) reads and is not empty."""
        render_prompt(config)  # assistant, principles, exemplars, frame template / prompt file
        prompts = os.path.join(workdir or "", "self_instruct", "prompts.jsonl")
        if config.self_align.questions_file:
            D.load_question_file(config.self_align.questions_file, "self_align.questions_file")
        elif workdir and stage_done(workdir, "self_instruct") and os.path.isfile(prompts):
            D.load_question_file(prompts, "self_align.questions_file")  # stage 1 kept none: refuse now

    def read_inputs(self, config, workdir: str) -> dict:
        """{"rendered": the principle prompt, "assistant", "questions"}."""
        rendered, assistant = render_prompt(config)
        return {"rendered": rendered, "assistant": assistant,
                "questions": stage_questions(config, workdir)}

    def fingerprint(self, config, inputs: dict, upstream) -> dict:
        """Seed, model (bookkeeping keys left out), data, this section, the prompt's and the
        questions' digests."""
        questions = inputs["questions"]
        return {"stage": STAGE, "seed": config.seed, "model": model_fingerprint(config.model),
                "data": config.data.to_dict(),
                "self_align": strip_non_semantic(config.self_align.to_dict()),
                "prefix": text_digest(inputs["rendered"].prefix),
                "questions": text_digest("\n".join(f"{q['id']}\t{q['instruction']}\t{q['input']}"
                                                    for q in questions))}

    def run(self, ctx: StageContext, inputs: dict) -> StageResult:
        """Answer every question under the principle prompt, parse and filter the answers."""
        config, stage = ctx.config, ctx.dir
        sa = config.self_align
        rendered, assistant, questions = inputs["rendered"], inputs["assistant"], inputs["questions"]
        prefix_id = text_digest(rendered.prefix)
        if stage.hosts.is_main:
            write_text_atomic(stage.file(f"prefix-{prefix_id}.txt"), rendered.prefix)
        cleaner = make_cleaner(config, rendered, assistant)
        by_id = {q["id"]: q for q in questions}

        def record(q: dict, raw: str) -> dict:
            question = q["instruction"] + (("\n\n" + q["input"]) if q["input"] else "")
            parsed = cleaner.process(raw, question)
            return {"id": q["id"], "prompt_id": q["id"], "prefix_id": prefix_id, "question": q["instruction"],
                    "input": q["input"], "source": q.get("source", ""),
                    "prompt": question_suffix(q["instruction"], q["input"], assistant.prompt_name),
                    "raw": raw, **parsed}

        items = [{"id": q["id"], "prompt": question_suffix(q["instruction"], q["input"], assistant.prompt_name)}
                 for q in questions]  # the text after the shared prefix
        generate_into(stage, "responses", items, ctx.resources.generator, batch_size=sa.batch_size,
                      seed=int(config.seed), settings=SamplingSettings.from_config(sa, STAGE),
                      shared_prefix=rendered.prefix,
                      make_record=lambda it, raw: record(by_id[it["id"]], raw), label="self_align")
        # re-derive from the raw generations, so the outputs always match the current filters
        recs = [record(by_id[r["id"]], r["raw"]) for r in stage.records("responses") if r["id"] in by_id]
        kept = [{"id": r["id"], "instruction": r["question"], "input": r["input"], "output": r["answer"],
                 "thoughts": r["thoughts"], "cited_principles": r["cited_principles"], "source": r["source"]}
                for r in recs if r["filter"] is None]
        citations = Counter(k for r in recs for k in r["cited_principles"])
        cleaning = Counter(k for r in recs for k, v in r["cleaning"].items() if v)
        counts = {"generated": len(recs), "kept": len(kept),
                  "filtered": dict(Counter(r["filter"] for r in recs if r["filter"])),
                  "cleaning": dict(cleaning), "citations": dict(citations)}
        outputs = {"kept": stage.file("kept.jsonl")}
        if stage.hosts.is_main:
            write_jsonl_atomic(outputs["kept"], kept)
            notes = [f"Principle prompt {prefix_id}: {len(rendered.numbering)} principles, exemplars "
                     f"{list(rendered.exemplar_names)}.",
                     "Cleaning applied (records affected): "
                     + (", ".join(f"{k} {v}" for k, v in sorted(cleaning.items())) or "none")]
            outputs.update(write_funnel(stage.path, STAGE, [("Self-align responses", funnel_steps(
                "generated", len(recs), [r["filter"] for r in recs], REASONS))],
                citations=dict(citations), notes=notes))
        return StageResult(counts, outputs)
