"""Loaders for the pipeline's data files: ours (data/) and the original Dromedary / self-instruct
formats (``self_instruct_seed_tasks.jsonl``, ``tgrt_*`` files), which share field names.

Paths in a config are tried as given (absolute or relative to the working directory), then
relative to the repository root, so ``data/...`` works from anywhere in a source checkout.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping, Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json_records

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_path(path: str, key: str) -> str:
    """An existing file for config key ``key`` (UserError naming the key if there is none)."""
    if not path:
        raise UserError(f"config.{key} is empty; set it to a file path")
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise UserError(f"config.{key}: file not found: {path}")


def read_text(path: str, key: str) -> str:
    """The whole text of the file for config key ``key`` (resolved as in :func:`resolve_path`);
    UserError naming the key when the file is missing or is not UTF-8."""
    full = resolve_path(path, key)
    try:
        with open(full, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"config.{key}: {full} is not UTF-8 text ({e.reason} at byte {e.start})") \
            from None


def load_json_or_jsonl(path: str, key: str) -> list[dict]:
    """A JSONL file (one object per line) or a JSON list of objects."""
    return read_json_records(resolve_path(path, key), note=f" (config.{key})", objects=True)


def _need(row: dict, fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}")


# ------------------------------------------------------------------------------------ seeds

def load_seed_tasks(path: str, key: str = "self_instruct.seed_tasks") -> list[dict]:
    """Self-instruct seed tasks -> [{"id", "instruction", "input", "output", "is_classification"}]
    (first instance of each task, as the self-instruct / Alpaca scripts use them)."""
    rows = load_json_or_jsonl(path, key)
    out = []
    for i, row in enumerate(rows):
        where = f"{path} record {i + 1} (config.{key})"
        _need(row, ("instruction", "instances"), where)
        if not row["instances"]:
            raise UserError(f"{where}: 'instances' is empty")
        inst = row["instances"][0]
        out.append({"id": str(row.get("id", f"seed_task_{i}")), "instruction": str(row["instruction"]),
                    "input": str(inst.get("input", "")), "output": str(inst.get("output", "")),
                    "is_classification": bool(row.get("is_classification", False))})
    if not out:
        raise UserError(f"config.{key}: {path} holds no seed tasks")
    return out


def load_red_team_seeds(path: str, key: str = "self_instruct.red_team_seeds") -> list[dict]:
    """Red-teaming seed questions -> [{"question_type", "topic", "question"}] (type order kept)."""
    rows = load_json_or_jsonl(path, key)
    out = []
    for i, row in enumerate(rows):
        _need(row, ("question_type", "topic", "question"), f"{path} record {i + 1} (config.{key})")
        out.append({"question_type": str(row["question_type"]).strip(), "topic": str(row["topic"]).strip(),
                    "question": str(row["question"]).strip()})
    if not out:
        raise UserError(f"config.{key}: {path} holds no seed questions")
    return out


def question_types(seeds: Sequence[Mapping]) -> list[str]:
    """Distinct question types in first-seen order."""
    seen: dict[str, None] = {}
    for s in seeds:
        seen.setdefault(s["question_type"], None)
    return list(seen)


# ------------------------------------------------------------------------------------ templates

_SLOT = re.compile(r"\{([a-z_]+)\}")


@dataclasses.dataclass(frozen=True)
class Template:
    """A text with named ``{slot}`` placeholders; only the declared slots are substituted, so any
    other braces in the text are left alone. Positional ``{}`` slots (the original Dromedary
    files) are mapped to the declared slots in order."""

    text: str
    slots: tuple[str, ...]
    path: str = ""
    positional: bool = False  # loaded from an original-format file with '{}' slots

    @classmethod
    def load(cls, path: str, key: str, slots: Sequence[str]) -> "Template":
        """The template in file ``path`` (config key ``key``), stripped, with the declared
        ``slots``; UserError when the file is missing, not UTF-8, or has too many ``{}`` slots."""
        return cls.from_text(read_text(path, key).strip(), slots, path=path, key=key)

    @classmethod
    def from_text(cls, text: str, slots: Sequence[str], path: str = "", key: str = "") -> "Template":
        """A template from ``text``. When it has positional ``{}`` slots, the i-th one becomes
        ``{slots[i]}`` (``positional=True``); more ``{}`` than ``slots`` is a UserError naming
        ``config.<key>`` and ``path``."""
        slots = tuple(slots)
        n_pos = text.count("{}")
        if n_pos:
            if n_pos > len(slots):
                raise UserError(f"config.{key}: {path} has {n_pos} '{{}}' slots, expected at most "
                                f"{len(slots)} ({', '.join(slots)})")
            parts = text.split("{}")
            text = parts[0] + "".join("{" + slots[i] + "}" + p for i, p in enumerate(parts[1:]))
        return cls(text, slots, path, positional=bool(n_pos))

    def render(self, **values) -> str:
        """The text with each declared ``{slot}`` given in ``values`` replaced by ``str(value)``;
        declared slots not given, and any other braces, are left as they are. ValueError (a
        programming error, not a user one) for a keyword that is not a declared slot."""
        unknown = set(values) - set(self.slots)
        if unknown:
            raise ValueError(f"unknown template slots {sorted(unknown)}")

        def sub(m):
            name = m.group(1)
            if name in self.slots and name in values:
                return str(values[name])
            return m.group(0)

        return _SLOT.sub(sub, self.text)


# ------------------------------------------------------------------------------------ questions

def load_question_file(path: str, key: str = "self_align.questions_file") -> list[dict]:
    """Questions for stage 2: our stage-1 ``prompts.jsonl`` or any JSON/JSONL list of
    ``{"instruction" (or "question"), "input"?, "id"?}`` (e.g. the original merged inputs, or a
    red-teaming seed file). Missing ids become
    ``q-<index>``; ids must be unique; a file with no questions is a UserError (stage 2 would be
    "done" with nothing for stage 3 to train on)."""
    rows = load_json_or_jsonl(path, key)
    out, seen = [], set()
    for i, row in enumerate(rows):
        text = row.get("instruction", row.get("question"))
        if text is None:
            raise UserError(f"{path} record {i + 1} (config.{key}): missing field 'instruction' (or 'question')")
        qid = str(row.get("id", f"q-{i:07d}"))
        if qid in seen:
            raise UserError(f"{path} (config.{key}): duplicate id {qid!r}")
        seen.add(qid)
        out.append({"id": qid, "instruction": str(text), "input": str(row.get("input", "") or ""),
                    "source": row.get("source", ""), "question_type": row.get("question_type", "")})
    if not out:
        raise UserError(f"config.{key}: {path} holds no questions (an empty file, or the stage "
                        f"that wrote it kept none: see the funnel.md next to it)")
    return out


@dataclasses.dataclass(frozen=True)
class Assistant:
    """The assistant's identity as the prompts use it: ``name`` (e.g. "Dromedary"),
    ``prompt_name`` (the name written in the stage-2 prompts; ``name`` unless overridden) and
    ``cutoff`` (the knowledge-cutoff text, "" when unset). Built by :func:`load_assistant`."""

    name: str
    prompt_name: str
    cutoff: str


def load_assistant(data_cfg, prompt_name_override: str = "") -> Assistant:
    """The assistant's names and knowledge cutoff: ``config.data.assistant_file`` with non-empty
    ``config.data.assistant_name`` / ``knowledge_cutoff`` and ``prompt_name_override`` on top."""
    rows = {}
    if data_cfg.assistant_file:
        text = read_text(data_cfg.assistant_file, "data.assistant_file")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config.data.assistant_file: invalid JSON: {e}") from None
    name = data_cfg.assistant_name or rows.get("name", "")
    prompt_name = prompt_name_override or rows.get("prompt_name", "") or name
    cutoff = data_cfg.knowledge_cutoff or rows.get("knowledge_cutoff", "")
    if not name:
        raise UserError("config.data.assistant_name is empty and data.assistant_file gives no 'name'")
    for label, v in (("data.assistant_name", name), ("self_align.prompt_name", prompt_name)):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _.-]*", v):
            raise UserError(f"config.{label}={v!r}: use letters, digits, spaces, '_', '.', '-'")
    return Assistant(name=name, prompt_name=prompt_name, cutoff=cutoff)
