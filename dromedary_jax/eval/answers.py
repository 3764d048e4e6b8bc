"""Open-ended answers: answer a list of questions with a given meta-prompt and write them in
FastChat's answer-file format, so an external judge (FastChat's ``gen_judgment``, a human, ...)
can grade them.

Questions: JSONL in the Vicuna-80 / MT-bench format, ``{"question_id", "category", "turns":
[str, ...]}`` (a single ``"text"`` string is accepted as one turn).

Prompt for turn k of a question (the meta-prompt's trailing user tag, if any, is dropped first so
that a meta-prompt file ending with ``### User`` works as is; otherwise a non-empty meta-prompt
is followed by a blank line)::

    meta_prompt + "{user}\\n{q1}\\n\\n{assistant}\\n{a1}\\n\\n" ...
                + "{user}\\n{qk}\\n\\n{assistant}\\n"

``user`` / ``assistant`` default to ``### User`` / ``### Dromedary``; generation stops at the next
user tag. Turns are generated in order across all questions (turn 2 needs every turn-1 answer).

Answer records (one JSON line each)::

    {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [str, ...]}],
     "tstamp"}

``answer_id`` is derived from (model_id, question_id), so a rerun gives the same ids.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Mapping, Sequence

import jax

from dromedary_jax.distributed import allgather_texts
from dromedary_jax.errors import UserError
from dromedary_jax.eval.data import read_json_or_jsonl
from dromedary_jax.jsonl import write_jsonl_atomic
from dromedary_jax.output_paths import check_out_file


def load_questions(path: str) -> list[dict]:
    """The questions of a JSON / JSONL file, checked by :func:`validate_questions` (UserError
    naming the file and record when one is malformed)."""
    return validate_questions(read_json_or_jsonl(path), source=str(path))


def validate_questions(records: Sequence[Any], source: str = "questions") -> list[dict]:
    """Copies of ``records`` with ``turns`` always a list (a lone ``"text"`` becomes one turn).
    UserError (``<source>: record <i>: ...``) for a non-object, a missing / non str-or-int /
    duplicate ``question_id``, turns that are not a non-empty list of non-empty strings, or no
    records at all."""
    out, seen = [], set()
    for i, rec in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(rec, Mapping):
            raise UserError(f"{where}: expected an object, got {type(rec).__name__}")
        if "question_id" not in rec:
            raise UserError(f"{where}: missing 'question_id'")
        qid = rec["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise UserError(f"{where}: 'question_id' must be a string or an integer, got "
                            f"{type(qid).__name__} {repr(qid)[:40]}")
        turns = rec.get("turns")
        if turns is None and isinstance(rec.get("text"), str):
            turns = [rec["text"]]
        if (not isinstance(turns, list) or not turns
                or not all(isinstance(t, str) and t.strip() for t in turns)):
            raise UserError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
        if rec["question_id"] in seen:
            raise UserError(f"{where}: duplicate question_id {rec['question_id']!r}")
        seen.add(rec["question_id"])
        out.append({**rec, "turns": list(turns)})
    if not out:
        raise UserError(f"{source}: no questions")
    return out


def split_prompt(meta_prompt: str, turns: Sequence[str], answers: Sequence[str], *,
                 user: str = "### User", assistant: str = "### Dromedary") -> tuple[str, str]:
    """(head, conversation) of the prompt for turn ``len(answers)`` (0-based): the head is the
    meta-prompt (common to every question), the conversation the turns so far."""
    head = meta_prompt.rstrip()
    if head.endswith(user):
        head = head[: -len(user)]
    elif head:
        head += "\n\n"
    parts = []
    for k, q in enumerate(turns[: len(answers) + 1]):
        parts.append(f"{user}\n{q.strip()}\n\n{assistant}\n")
        if k < len(answers):
            parts.append(f"{answers[k].strip()}\n\n")
    return head, "".join(parts)


def build_prompt(meta_prompt: str, turns: Sequence[str], answers: Sequence[str], *,
                 user: str = "### User", assistant: str = "### Dromedary") -> str:
    """The prompt for turn ``len(answers)`` (0-based) given the earlier answers."""
    return "".join(split_prompt(meta_prompt, turns, answers, user=user, assistant=assistant))


def answer_id(model_id: str, question_id) -> str:
    """A stable answer id: the first 22 hex digits of sha256(``model_id`` NUL
    ``question_id``), so a rerun with the same model id gives the same ids."""
    return hashlib.sha256(f"{model_id}\0{question_id}".encode()).hexdigest()[:22]


def answer_questions(model, tokenizer, questions: Sequence[Mapping], *, meta_prompt: str = "",
                     model_id: str = "dromedary_jax", max_new_tokens: int = 512,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                     user: str = "### User", assistant: str = "### Dromedary",
                     stop: Sequence[str] | None = None, batch_size: int = 32,
                     share_meta_prompt: bool = False, generate_text=None) -> list[dict]:
    """FastChat answer records, one per question (see module doc). Multi-host: every process
    calls this with all the questions, answers its share and returns all the records.

    ``generate_text`` defaults to :func:`dromedary_jax.generate_text`; randomness per (seed,
    question index, turn), so answers do not depend on batching. ``share_meta_prompt``: prefill
    the meta-prompt once (the sampler's ``shared_prefix``); faster, but the conversation is then
    tokenized on its own, which can differ from tokenizing the whole prompt at the seam.
    """
    questions = validate_questions(questions)
    if generate_text is None:
        from dromedary_jax.sampling import generate_text
    stop = tuple(stop) if stop is not None else (user,)
    answers: list[list[str]] = [[] for _ in questions]
    n_turns = max(len(q["turns"]) for q in questions)
    # Multi-host: each process answers every procs-th question of a turn, and the answers are
    # gathered so that every process holds all of them (the next turn's prompts need them).
    procs, pid = jax.process_count(), jax.process_index()
    head = split_prompt(meta_prompt, [], [], user=user, assistant=assistant)[0]
    for turn in range(n_turns):
        todo_all = [i for i, q in enumerate(questions) if len(q["turns"]) > turn]
        todo = todo_all[pid::procs]
        parts = [split_prompt(meta_prompt, questions[i]["turns"], answers[i], user=user,
                              assistant=assistant) for i in todo]
        kw = {}
        if share_meta_prompt and head:
            prompts, kw["shared_prefix"] = [conv for _, conv in parts], head
        else:
            prompts = [h + conv for h, conv in parts]
        outs = generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
                             seed=seed, ids=[i * n_turns + turn for i in todo],
                             batch_size=batch_size, **kw)
        if procs > 1:
            texts = allgather_texts(list(outs))
            todo = [i for p in range(procs) for i in todo_all[p::procs]]
            outs = [t for p in range(procs) for t in texts[p]]
        for i, text in zip(todo, outs):
            answers[i].append(text.strip())
    now = time.time()
    return [{"question_id": q["question_id"], "answer_id": answer_id(model_id, q["question_id"]),
             "model_id": model_id, "choices": [{"index": 0, "turns": a}], "tstamp": now}
            for q, a in zip(questions, answers)]


def write_answers(records: Sequence[Mapping], path: str) -> None:
    """Write answer records to ``path`` as JSONL, atomically (a kill leaves the old file or the
    new one). UserError when ``path`` is a folder, not writable, or its folder cannot be made."""
    check_out_file(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl_atomic(path, records)  # a kill leaves the old file or the new one, never half
