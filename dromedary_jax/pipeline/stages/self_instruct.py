"""Stage 1: topic-guided red-teaming self-instruct (TGRT) + vanilla self-instruct.

    SelfInstruct (run by runner.run_stage)  ->  <workdir>/self_instruct/prompts.jsonl
                                                (questions for stage 2)

1. Topic brainstorm, ``topics.rounds`` rounds. Before each round (and after the last) every
   question type's topics are de-duplicated case-insensitively and every type is cut to the
   smallest type's count. A type with fewer than 2 x ``examples_per_prompt`` topics gets one
   prompt per topic (showing that topic); otherwise one prompt per topic showing a random
   sample of ``examples_per_prompt``. Each generated line is kept if it has <= ``max_words``
   words, starts with a capital letter and does not end with punctuation.
2. Question generation: the (type, topic) pairs of the final pool (round-robin over types),
   ``hints_per_prompt`` per prompt, after ``examples_per_prompt`` seed questions shown as worked hints. Only lines that
   start with one of the prompt's expected new hints are kept; then one question per
   (type, topic) and no repeated text.
3. Vanilla self-instruct in rounds of ``requests_per_round`` prompts (sampled seed tasks plus,
   optionally, machine tasks kept in earlier rounds), ``###``-separated numbered task lists
   parsed, then filters: word count, keyword blacklist, leading punctuation / non-ASCII, and
   ROUGE-L F > threshold against the seeds and EVERY instruction kept so far (all hosts, all
   rounds), until exactly ``num_instructions`` are kept (in id order; candidates of the last
   round that passed the other filters after that are ``target_reached``). Empty pieces
   between ``###`` separators are no candidates.

Records (append-only shards): ``topics``, ``questions``, ``vanilla`` (prompt, raw generation,
parsed fields). Derived files (rewritten by process 0 at the end): ``topics.jsonl``,
``candidates.jsonl`` (every parsed question/instruction with its filter reason, null if kept),
``prompts.jsonl`` (the kept ones), ``funnel.md`` / ``funnel.png``, ``manifest.json``.
Every random choice comes from ``Random(f"{seed}|{record id}")``, so reruns, resumes and any
host count give the same records.
"""
from __future__ import annotations

import dataclasses
import random
import re
import string
from collections import Counter

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.filters import InstructionFilter, RougeLDeduper
from dromedary_jax.pipeline.generation import generate_into, log
from dromedary_jax.pipeline.records import model_fingerprint, strip_non_semantic, text_digest, write_jsonl_atomic
from dromedary_jax.pipeline.reports.funnel import funnel_steps, write_funnel
from dromedary_jax.pipeline.stage import DefaultStage, StageContext, StageResult
from dromedary_jax.sampling.settings import SamplingSettings

STAGE = "self_instruct"
TOPIC_REASONS = ("empty", "too_long", "not_capitalized", "trailing_punctuation")
QUESTION_REASONS = ("truncated", "off_hint", "no_instruction")
MERGE_REASONS = ("duplicate_hint", "duplicate_text")
VANILLA_REASONS = ("malformed",) + InstructionFilter.REASONS + ("rouge_similar", "target_reached")


def _rng(seed: int, rid: str) -> random.Random:
    return random.Random(f"{seed}|{rid}")


# ------------------------------------------------------------------------------------ topics

def parse_topics(text: str, max_topics: int = 10, max_words: int = 3, capitalize: bool = False
                 ) -> tuple[list[str], list[list[str]]]:
    """(accepted topics, [[line, reason], ...]) from a brainstorm continuation: the first
    ``max_topics`` non-blank lines (blank lines are no topics and do not use up the budget; a
    numbered line without a topic is ``empty``), numbering stripped. ``capitalize``: a topic
    starting with a lower-case letter gets a capital (small models write "sports" as often as
    "Sports") instead of being rejected as ``not_capitalized``."""
    accepted, rejected = [], []
    for line in [x for x in text.split("\n") if x.strip()][:max_topics]:
        topic = re.sub(r"^\s*\d+\s*[.)]\s*", "", line).strip()
        if capitalize and topic[:1] in string.ascii_lowercase:
            topic = topic[0].upper() + topic[1:]
        if not topic:
            reason = "empty"
        elif len(topic.split()) > max_words:
            reason = "too_long"
        elif topic[0] not in string.ascii_uppercase:
            reason = "not_capitalized"
        elif topic[-1] in string.punctuation:
            reason = "trailing_punctuation"
        else:
            accepted.append(topic)
            continue
        rejected.append([line, reason])
    return accepted, rejected


def normalize_topics(by_type: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
    """Case-insensitive dedup per type, then every type cut to the smallest type's count.
    Returns (pool, number of topics that survived dedup before the cut)."""
    deduped = {}
    for qt, topics in by_type.items():
        seen, out = set(), []
        for t in topics:
            if t.lower() not in seen:
                seen.add(t.lower())
                out.append(t)
        deduped[qt] = out
    unique = sum(len(v) for v in deduped.values())
    m = min((len(v) for v in deduped.values()), default=0)
    return {qt: v[:m] for qt, v in deduped.items()}, unique


def topic_prompts(template: D.Template, pool: dict[str, list[str]], types: list[str], rnd: int, tcfg,
                  seed: int) -> list[dict]:
    """The brainstorm prompts of round ``rnd``: for each question type (``types`` order), one per
    topic of ``pool[type]`` (at most ``tcfg.max_prompts_per_type`` when > 0). Each is
    ``template`` (question_type, num_topics = ``topics_per_call``) followed by a numbered topic
    list: the i-th topic alone while the type has fewer than 2 x ``examples_per_prompt`` topics,
    else ``examples_per_prompt`` topics sampled with ``Random(f"{seed}|{id}")``. Items:
    {"id", "prompt", "round", "question_type"}."""
    items = []
    for ti, qt in enumerate(types):
        topics = pool[qt]
        n = len(topics) if tcfg.max_prompts_per_type <= 0 else min(len(topics), tcfg.max_prompts_per_type)
        for i in range(n):
            rid = f"topics-r{rnd:02d}-t{ti:02d}-{i:05d}"
            ex = tcfg.examples_per_prompt
            shown = [topics[i]] if len(topics) < 2 * ex else _rng(seed, rid).sample(topics, ex)
            head = template.render(question_type=qt, num_topics=tcfg.topics_per_call)
            prompt = head.rstrip() + "\n\n" + "".join(
                f"{k + 1}. {t}\n" for k, t in enumerate(shown))
            items.append({"id": rid, "prompt": prompt, "round": rnd, "question_type": qt})
    return items


def run_topics(stage, gen, cfg, seeds, seed) -> tuple[dict[str, list[str]], list]:
    """Step 1 (see the module docstring): ``cfg.topics.rounds`` brainstorm rounds with generator
    ``gen`` into shard ``topics`` of ``stage`` (a StageDir), starting from the seeds' topics
    (``cfg``: ``config.self_instruct``; ``seeds``: the red-teaming seeds). Returns (final pool
    {question type: topics}, deduplicated and balanced over types; its funnel steps). UserError
    for a missing or malformed topic template."""
    tcfg = cfg.topics
    template = D.Template.load(cfg.topic_template, "self_instruct.topic_template",
                               ("question_type", "num_topics"))
    types = D.question_types(seeds)
    by_type = {qt: [s["topic"] for s in seeds if s["question_type"] == qt] for qt in types}
    kw = SamplingSettings.from_config(tcfg, "self_instruct.topics")
    lines_total, reasons, new_unique = 0, [], 0
    for rnd in range(tcfg.rounds):
        pool, _ = normalize_topics(by_type)
        items = topic_prompts(template, pool, types, rnd, tcfg, seed)

        def make(it, text, _max=tcfg.topics_per_call, _w=tcfg.max_words, _c=tcfg.capitalize):
            acc, rej = parse_topics(text, _max, _w, _c)
            return {"id": it["id"], "round": it["round"], "question_type": it["question_type"],
                    "prompt": it["prompt"], "generation": text, "topics": acc, "rejected": rej}

        generate_into(stage, "topics", items, gen, batch_size=cfg.batch_size, seed=seed, settings=kw,
                      make_record=make, label=f"topics round {rnd}")
        wanted = {it["id"] for it in items}
        recs = [r for r in stage.records("topics") if r["id"] in wanted]
        nxt = {qt: list(v) for qt, v in pool.items()}
        for r in recs:
            acc, rej = parse_topics(r["generation"], tcfg.topics_per_call, tcfg.max_words,
                                    tcfg.capitalize)
            lines_total += len(acc) + len(rej)
            reasons += [x[1] for x in rej] + [None] * len(acc)
            nxt[r["question_type"]].extend(acc)
        before = sum(len(v) for v in pool.values())
        _, unique = normalize_topics(nxt)
        new_unique += unique - before
        by_type = nxt
        log.info("topics round %d: %d prompts, pool %d -> %d unique", rnd, len(items), before, unique)
    final, _ = normalize_topics(by_type)
    steps = funnel_steps("topic lines generated", lines_total, reasons, TOPIC_REASONS)
    steps += [("new after case-insensitive dedup", new_unique),
              ("final pool (balanced over types)", sum(len(v) for v in final.values()))]
    return final, steps


# ------------------------------------------------------------------------------------ questions

def _hint(i: int, qt: str, topic: str) -> str:
    return f"{i}. type: {qt}, topic: {topic}"


def question_prompts(template: D.Template, pool: dict[str, list[str]], types: list[str], seeds, qcfg,
                     seed: int) -> list[dict]:
    """The question-generation prompts: the (type, topic) pairs of ``pool`` taken round-robin
    over ``types``, ``qcfg.hints_per_prompt`` per prompt (the first ``max_prompts`` x that many
    pairs when ``max_prompts`` > 0), each after ``examples_per_prompt`` seed questions (sampled
    with ``Random(f"{seed}|{id}")``) shown as worked hints. Items: {"id", "prompt", "expected":
    [[hint line, type, topic], ...] (the new hints)}; with ``qcfg.one_per_prompt`` one item per
    new hint (id ``<id>-NN``) whose prompt ends with that hint's line up to ``instruction:``
    (also in ``"prefill"``)."""
    # round-robin over types, so every prompt (and a capped run) mixes question types
    depth = max((len(pool.get(qt, [])) for qt in types), default=0)
    pairs = [(qt, pool[qt][i]) for i in range(depth) for qt in types if i < len(pool.get(qt, []))]
    per = qcfg.hints_per_prompt
    if qcfg.max_prompts > 0:
        pairs = pairs[: qcfg.max_prompts * per]
    items = []
    for c in range(0, len(pairs), per):
        rid = f"questions-{c // per:06d}"
        examples = _rng(seed, rid).sample(seeds, min(qcfg.examples_per_prompt, len(seeds)))
        hints = [(s["question_type"], s["topic"]) for s in examples] + pairs[c:c + per]
        hint_lines = [_hint(i + 1, qt, t) for i, (qt, t) in enumerate(hints)]
        ex_lines = [f"{_hint(i + 1, s['question_type'], s['topic'])}, instruction: {s['question']}"
                    for i, s in enumerate(examples)]
        sep = "\n" if template.positional else ""  # the original scripts put a newline before each block
        prompt = template.render(hints=sep + "\n".join(hint_lines), examples=sep + "\n".join(ex_lines),
                                 num=len(hint_lines)).rstrip() + "\n"
        expected = [[_hint(i + 1, qt, t), qt, t] for i, (qt, t) in enumerate(hints) if i >= len(examples)]
        if not qcfg.one_per_prompt:
            items.append({"id": rid, "prompt": prompt, "expected": expected})
            continue
        # one item per new hint: the prompt ends with that hint's own line up to "instruction:",
        # so the model writes only the request (small models do not copy hint lines reliably)
        for k, exp in enumerate(expected):
            prefill = exp[0] + ", instruction:"
            items.append({"id": f"{rid}-{k:02d}", "prompt": prompt + prefill, "expected": [exp],
                          "prefill": prefill})
    return items


def parse_questions(text: str, expected) -> tuple[list[dict], list[list[str]]]:
    """Questions from lines that start with an expected hint ``N. type: T, topic: X,`` (so the
    line belongs to a hint this prompt asked for). A last line that neither ends the text with a
    newline nor ends like a sentence is treated as cut off."""
    lines = text.split("\n")
    rejected: list[list[str]] = []
    if lines and not text.endswith("\n") and lines[-1].strip() and \
            not re.search(r"[.?!\"')\]]$", lines[-1].strip()):
        rejected.append([lines[-1], "truncated"])
        lines = lines[:-1]
    out, used = [], set()
    for line in lines:
        s = line.strip()
        if not s:
            continue
        for k, (prefix, qt, topic) in enumerate(expected):
            if s.startswith(prefix + ","):
                if "instruction:" not in s or not s.split("instruction:")[-1].strip():
                    rejected.append([line, "no_instruction"])
                elif k not in used:
                    used.add(k)
                    out.append({"hint": k, "question_type": qt, "topic": topic,
                                "instruction": s.split("instruction:")[-1].strip()})
                else:
                    rejected.append([line, "off_hint"])
                break
        else:
            rejected.append([line, "off_hint"])
    return out, rejected


def run_questions(stage, gen, cfg, seeds, pool, seed) -> tuple[list[dict], list]:
    """Step 2 (see the module docstring): generate into shard ``questions`` of ``stage`` for the
    topic ``pool``, parse the lines, and drop a repeated (type, topic) (``duplicate_hint``) or a
    repeated question text (``duplicate_text``, case and punctuation ignored). Returns
    (candidates {"id", "source": "tgrt", "instruction", "input": "", "question_type", "topic",
    "filter": reason or None}, funnel steps). UserError for a missing or malformed question
    template."""
    qcfg = cfg.questions
    template = D.Template.load(cfg.question_template, "self_instruct.question_template",
                               ("hints", "examples", "num"))
    items = question_prompts(template, pool, D.question_types(seeds), seeds, qcfg, seed)

    def make(it, text):
        qs, rej = parse_questions(it.get("prefill", "") + text, it["expected"])
        rec = {"id": it["id"], "prompt": it["prompt"], "expected": it["expected"], "generation": text,
               "questions": qs, "rejected": rej}
        if "prefill" in it:
            rec["prefill"] = it["prefill"]
        return rec

    kw = SamplingSettings.from_config(qcfg, "self_instruct.questions")
    if qcfg.one_per_prompt:
        kw = dataclasses.replace(kw, stop=("\n",))  # one request: the hint's own line
    generate_into(stage, "questions", items, gen, batch_size=cfg.batch_size, seed=seed,
                  settings=kw, make_record=make, label="questions")
    cands, reasons, lines = [], [], 0
    seen_hint, seen_text = set(), set()
    wanted = {it["id"] for it in items}
    for r in (r for r in stage.records("questions") if r["id"] in wanted):
        qs, rej = parse_questions(r.get("prefill", "") + r["generation"], r["expected"])
        lines += len(qs) + len(rej)
        reasons += [x[1] for x in rej]
        for q in qs:
            key_hint = (q["question_type"], q["topic"].lower())
            key_text = re.sub(r"\W+", " ", q["instruction"].lower()).strip()
            reason = None
            if key_hint in seen_hint:
                reason = "duplicate_hint"
            elif key_text in seen_text:
                reason = "duplicate_text"
            else:
                seen_hint.add(key_hint)
                seen_text.add(key_text)
            reasons.append(reason)
            cands.append({"id": f"{r['id']}-h{q['hint']:02d}", "source": "tgrt", "instruction": q["instruction"],
                          "input": "", "question_type": q["question_type"], "topic": q["topic"], "filter": reason})
    steps = funnel_steps("lines generated", lines, reasons, QUESTION_REASONS + MERGE_REASONS)
    return cands, steps


# ------------------------------------------------------------------------------------ vanilla

def encode_vanilla_prompt(preamble: str, examples: list[dict]) -> str:
    """A vanilla self-instruct prompt: ``preamble``, then per example task a ``###`` block
    ``N. Instruction: <instruction>`` / ``N. Input:`` / ``<input or <noinput>>`` (whitespace
    runs in the instruction collapsed, a trailing ":" dropped), ending in ``###`` and the next
    ``N. Instruction:``. This is Stanford Alpaca's ``encode_prompt`` layout without the
    ``Output`` lines."""
    prompt = preamble.rstrip() + "\n\n"
    for i, ex in enumerate(examples):
        instruction = re.sub(r"\s+", " ", ex["instruction"]).strip().rstrip(":")
        inp = ex.get("input", "") or "<noinput>"
        prompt += f"###\n{i + 1}. Instruction: {instruction}\n{i + 1}. Input:\n{inp}\n"
    return prompt + f"###\n{len(examples) + 1}. Instruction:"


_EMPTY_VANILLA_PIECE = re.compile(r"(?:\s|\d+\.\s*(?:Instruction|Input):|<noinput>)*", re.IGNORECASE)


def parse_vanilla(text: str, num_examples: int) -> list[dict]:
    """Numbered ``Instruction:`` / ``Input:`` pairs from a continuation; the piece after the last
    ``###`` is dropped (likely cut off by the token limit). Malformed pieces are returned with
    ``malformed=True``. Empty pieces (nothing but whitespace, ``N. Instruction:`` / ``N. Input:``
    headers or ``<noinput>``, e.g. from a run of ``###`` lines) are no candidates and are skipped;
    the pieces that remain are expected to be numbered on from ``num_examples + 1``. ``k`` is a
    candidate's piece index in the continuation (stable, used in candidate ids)."""
    raw = f"{num_examples + 1}. Instruction:" + text
    pieces = re.split("###", raw)[:-1]
    out = []
    for k, piece in enumerate(pieces):
        if _EMPTY_VANILLA_PIECE.fullmatch(piece):
            continue
        idx = num_examples + 1 + len(out)
        parts = re.split(rf"{idx}\.\s+(Instruction|Input):", piece)
        if len(parts) != 5:
            out.append({"k": k, "instruction": piece.strip(), "input": "", "malformed": True})
            continue
        inp = parts[4].strip()
        out.append({"k": k, "instruction": parts[2].strip(),
                    "input": "" if inp.lower() == "<noinput>" else inp, "malformed": False})
    return out


def run_vanilla(stage, gen, cfg, seed) -> tuple[list[dict], list]:
    """Step 3 (see the module docstring): rounds of ``requests_per_round`` prompts into shard
    ``vanilla`` of ``stage`` until ``num_instructions`` are kept or ``max_rounds`` have run.
    Returns (candidates {"id", "source": "vanilla", "instruction", "input", "question_type": "",
    "topic": "", "filter": reason or None}, funnel steps). UserError for missing seed tasks or
    template, or when ``vanilla.prompt_seed_tasks`` exceeds the seed tasks available."""
    vcfg = cfg.vanilla
    seed_tasks = D.load_seed_tasks(cfg.seed_tasks)
    template = D.Template.load(cfg.vanilla_template, "self_instruct.vanilla_template", ("num_tasks",))
    preamble = template.render(num_tasks=vcfg.num_tasks_in_template)
    if vcfg.prompt_seed_tasks > len(seed_tasks):
        raise UserError(f"config.self_instruct.vanilla.prompt_seed_tasks={vcfg.prompt_seed_tasks} but "
                          f"{cfg.seed_tasks} has only {len(seed_tasks)} tasks")
    filt = InstructionFilter(vcfg.min_words, vcfg.max_words, tuple(vcfg.blacklist))
    dedup = RougeLDeduper([t["instruction"] for t in seed_tasks], vcfg.rouge_threshold)
    machine: list[dict] = []
    cands, reasons = [], []
    kw = SamplingSettings.from_config(vcfg, "self_instruct.vanilla")
    for rnd in range(vcfg.max_rounds):
        if len(machine) >= vcfg.num_instructions:
            break
        items = []
        for j in range(vcfg.requests_per_round):
            rid = f"vanilla-r{rnd:04d}-{j:04d}"
            rng = _rng(seed, rid)
            examples = rng.sample(seed_tasks, vcfg.prompt_seed_tasks)
            n_m = min(vcfg.prompt_machine_tasks, len(machine))
            if n_m:
                examples += rng.sample(machine, n_m)
                rng.shuffle(examples)
            items.append({"id": rid, "prompt": encode_vanilla_prompt(preamble, examples), "round": rnd,
                          "examples": [e["id"] for e in examples], "num_examples": len(examples)})

        def make(it, text):
            return {"id": it["id"], "round": it["round"], "prompt": it["prompt"], "examples": it["examples"],
                    "num_examples": it["num_examples"], "generation": text}

        generate_into(stage, "vanilla", items, gen, batch_size=cfg.batch_size, seed=seed, settings=kw,
                      make_record=make, label=f"vanilla round {rnd}")
        wanted = {it["id"] for it in items}
        kept_before = len(machine)
        # records come sorted by id, candidates in text order: the same ones are kept on every host
        for r in (r for r in stage.records("vanilla") if r["id"] in wanted):
            for c in parse_vanilla(r["generation"], r["num_examples"]):
                reason = "malformed" if c["malformed"] else filt.reason(c["instruction"], c["input"])
                if reason is None and len(machine) >= vcfg.num_instructions:
                    reason = "target_reached"  # not needed: exactly num_instructions are kept
                elif reason is None and not dedup.keep([c["instruction"]])[0]:
                    reason = "rouge_similar"
                cid = f"{r['id']}-{c['k']:02d}"
                row = {"id": cid, "source": "vanilla", "instruction": c["instruction"], "input": c["input"],
                       "question_type": "", "topic": "", "filter": reason}
                cands.append(row)
                reasons.append(reason)
                if reason is None:
                    machine.append(row)
        log.info("vanilla round %d: kept %d (total %d of %d)", rnd, len(machine) - kept_before,
                 len(machine), vcfg.num_instructions)
    steps = funnel_steps("instructions parsed", len(cands), reasons, VANILLA_REASONS)
    return cands, steps


# ------------------------------------------------------------------------------------ stage

INPUT_FILES = ("red_team_seeds", "seed_tasks", "topic_template", "question_template", "vanilla_template")


class SelfInstruct(DefaultStage):
    """Stage 1 (see the module docstring) as a :class:`~dromedary_jax.pipeline.stage.Stage`."""

    name = STAGE  # the first stage: requires nothing (DefaultStage), reads only data files

    def check(self, config, workdir: str) -> None:
        """Seeds, seed tasks and the three templates read and fill; enough seed tasks for the
        vanilla prompts."""
        si = config.self_instruct
        D.load_red_team_seeds(si.red_team_seeds)
        D.Template.load(si.topic_template, "self_instruct.topic_template",
                        ("question_type", "num_topics"))
        D.Template.load(si.question_template, "self_instruct.question_template",
                        ("hints", "examples", "num"))
        D.Template.load(si.vanilla_template, "self_instruct.vanilla_template", ("num_tasks",))
        tasks = D.load_seed_tasks(si.seed_tasks)
        if si.vanilla.enabled and si.vanilla.prompt_seed_tasks > len(tasks):
            raise UserError(f"config.self_instruct.vanilla.prompt_seed_tasks="
                            f"{si.vanilla.prompt_seed_tasks} but {si.seed_tasks} has only "
                            f"{len(tasks)} tasks")

    def read_inputs(self, config, workdir: str) -> dict:
        """{"files": {key: text} of :data:`INPUT_FILES`, "seeds": the red-teaming seeds}."""
        cfg = config.self_instruct
        return {"files": {k: D.read_text(cfg[k], f"self_instruct.{k}") for k in INPUT_FILES},
                "seeds": D.load_red_team_seeds(cfg.red_team_seeds)}

    def fingerprint(self, config, inputs: dict, upstream) -> dict:
        """Seed, model (bookkeeping keys left out), this section, the input files' digests."""
        return {"stage": STAGE, "seed": config.seed, "model": model_fingerprint(config.model),
                "self_instruct": strip_non_semantic(config.self_instruct.to_dict()),
                "inputs": {k: text_digest(v) for k, v in sorted(inputs["files"].items())}}

    def run(self, ctx: StageContext, inputs: dict) -> StageResult:
        """Topics, then red-teaming questions, then vanilla self-instruct; the kept prompts."""
        config, stage = ctx.config, ctx.dir
        cfg, seeds = config.self_instruct, inputs["seeds"]
        gen, seed = ctx.resources.generator, int(config.seed)
        sections, cands = [], []
        types = D.question_types(seeds)
        if cfg.topics.enabled:
            pool, steps = run_topics(stage, gen, cfg, seeds, seed)
            sections.append(("Topic brainstorm", steps))
        else:
            pool, _ = normalize_topics({qt: [s["topic"] for s in seeds if s["question_type"] == qt]
                                        for qt in types})
        if cfg.questions.enabled:
            qc, steps = run_questions(stage, gen, cfg, seeds, pool, seed)
            cands += qc
            sections.append(("Topic-guided red-teaming questions", steps))
        if cfg.vanilla.enabled:
            vc, steps = run_vanilla(stage, gen, cfg, seed)
            cands += vc
            sections.append(("Vanilla self-instruct", steps))
        kept = [{k: c[k] for k in ("id", "source", "instruction", "input", "question_type", "topic")}
                for c in cands if c["filter"] is None]
        counts = {"topics": sum(len(v) for v in pool.values()), "candidates": len(cands),
                  "prompts": len(kept), "tgrt_kept": sum(c["source"] == "tgrt" for c in kept),
                  "vanilla_kept": sum(c["source"] == "vanilla" for c in kept),
                  "filtered": dict(Counter(c["filter"] for c in cands if c["filter"]))}
        outputs = {"prompts": stage.file("prompts.jsonl"), "candidates": stage.file("candidates.jsonl"),
                   "topics": stage.file("topics.jsonl")}
        if stage.hosts.is_main:
            write_jsonl_atomic(outputs["topics"], ({"question_type": qt, "topic": t}
                                                   for qt in types for t in pool.get(qt, [])))
            write_jsonl_atomic(outputs["candidates"], cands)
            write_jsonl_atomic(outputs["prompts"], kept)
            outputs.update(write_funnel(stage.path, STAGE, sections))
        return StageResult(counts, outputs)
