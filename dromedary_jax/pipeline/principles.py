"""The stage-2 principle prompt: principles + in-context exemplars, with ablations.

Both our files (a principle-set JSON, an exemplar JSON and a frame template) and the original
``watson_self_align_prompt.txt`` load into one ``PromptSpec``: a head, numbered principle lines,
a middle part, exemplar conversations and a tail (ending in ``User:``). Inside the spec the
assistant's name is ``{assistant}`` and principle citations in exemplar thoughts are
``{cites:key|key|...}``, so rendering after an ablation (drop principles, shuffle them, fewer
exemplars) renumbers every citation consistently. With no ablation, the original file renders
back byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline.data_files import read_text

_PRINCIPLE_LINE = re.compile(r"^(\d+) \(([^)\n]+)\)\. (.*)$", re.MULTILINE)
_CITE_GROUP = re.compile(r"\{cites:([^{}]*)\}")
_CITATION = re.compile(r"(\d+)\s*\(([^()\n]{1,60})\)")


@dataclasses.dataclass(frozen=True)
class Principle:
    """One principle: its short ``key`` (e.g. "ethical", cited as ``N (key)``) and its ``text``."""

    key: str
    text: str  # may contain {assistant} and {cutoff}


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """One in-context exemplar conversation: ``name`` (for ``self_align.exemplar_names``),
    ``text`` (``User:`` / ``{assistant} (internal thoughts):`` / ``{assistant}:`` turns, closed by
    an ``{assistant} (auto reply):`` turn) and the ``leak_markers`` whose presence in a generated
    answer means it copied this exemplar."""

    name: str
    text: str                       # one conversation, with {assistant}/{cutoff}/{cites:...}
    leak_markers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A principle prompt before rendering (see the module docstring): ``head`` (text before the
    principle lines), ``principles``, ``mid``, ``exemplars``, ``tail`` and the exemplars'
    ``feedback_lines``. Rendered by :func:`build_prompt`."""

    head: str
    principles: tuple[Principle, ...]
    mid: str                        # between the last principle line and the first exemplar
    exemplars: tuple[Exemplar, ...]
    tail: str                       # after the exemplars (ends with "User:")
    feedback_lines: tuple[str, ...] = ()  # user turns that only close an exemplar conversation


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    """A rendered principle prompt and what the answer cleaner needs from it: ``prefix`` (the
    text shared by every question, ending in ``User:``), ``numbering`` (principle key -> its
    1-based number here), the chosen ``exemplar_names``, their ``leak_markers`` (distinct, in
    order), ``exemplar_sentences`` (sentences of >= 8 words from the exemplar answers) and
    ``exemplar_questions`` (each exemplar's first user turn) for copy detection, and the
    ``assistant`` name filled in."""

    prefix: str                     # the shared prefix: principles + exemplars, ends with "User:"
    numbering: dict                 # principle key -> number in this prompt
    exemplar_names: tuple[str, ...]
    leak_markers: tuple[str, ...]
    exemplar_sentences: tuple[str, ...]  # long sentences from exemplar answers (copy detection)
    exemplar_questions: tuple[str, ...]
    assistant: str


# ------------------------------------------------------------------------------------ loading

def load_principles(path: str, key: str = "self_align.principles_file") -> list[Principle]:
    """The principles of a JSON file, in file order: ``{"principles": [{"key", "text"}, ...]}``
    or the bare list (key and text stripped). UserError naming ``config.<key>`` when the file is
    missing or not JSON, the list is absent or empty, an entry lacks ``key`` / ``text``, or two
    entries share a key."""
    try:
        obj = json.loads(read_text(path, key))
    except json.JSONDecodeError as e:
        raise UserError(f"config.{key}: {path}: invalid JSON: {e}") from None
    rows = obj.get("principles") if isinstance(obj, dict) else obj
    if not isinstance(rows, list) or not rows:
        raise UserError(f"config.{key}: {path} must hold a non-empty 'principles' list")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "key" not in r or "text" not in r:
            raise UserError(f"config.{key}: {path}: principle {i + 1} needs 'key' and 'text'")
        out.append(Principle(str(r["key"]).strip(), str(r["text"]).strip()))
    keys = [p.key for p in out]
    if len(set(keys)) != len(keys):
        raise UserError(f"config.{key}: {path}: duplicate principle keys")
    return out


def _turns_text(turns: Sequence[dict], where: str) -> tuple[str, list[str]]:
    parts, feedback = [], []
    for t in turns:
        if "user" not in t:
            raise UserError(f"{where}: every turn needs 'user'")
        parts.append(f"User: {t['user']}")
        if "auto_reply" in t:
            parts.append(f"{{assistant}} (auto reply): {t['auto_reply']}")
            feedback.append(str(t["user"]))
            continue
        if "answer" not in t or "thoughts" not in t:
            raise UserError(f"{where}: a turn needs 'thoughts' and 'answer' (or 'auto_reply')")
        cites = "{cites:" + "|".join(t.get("cites", [])) + "}"
        parts.append(f"{{assistant}} (internal thoughts): {t['thoughts'].replace('{cites}', cites)}")
        parts.append(f"{{assistant}}: {t['answer']}")
    return "\n\n".join(parts), feedback


def load_exemplars(path: str, key: str = "self_align.exemplars_file") -> tuple[list[Exemplar], list[str]]:
    """(exemplars, feedback lines) of a JSON file ``{"exemplars": [...]}`` (or the bare list),
    each ``{"name"?, "leak_markers"?, "turns": [...]}``; a turn is ``{"user", "thoughts",
    "answer", "cites"?}`` (``{cites}`` in the thoughts becomes the citations of the ``cites``
    keys) or ``{"user", "auto_reply"}``. Feedback lines are the distinct user turns answered by
    an auto reply, in first-seen order. UserError naming ``config.<key>`` for a missing or
    non-JSON file, no exemplar list, or a malformed turn."""
    try:
        obj = json.loads(read_text(path, key))
    except json.JSONDecodeError as e:
        raise UserError(f"config.{key}: {path}: invalid JSON: {e}") from None
    rows = obj.get("exemplars") if isinstance(obj, dict) else obj
    if not isinstance(rows, list):
        raise UserError(f"config.{key}: {path} must hold an 'exemplars' list")
    out, feedback = [], []
    for i, r in enumerate(rows):
        where = f"config.{key}: {path}: exemplar {i + 1}"
        text, fb = _turns_text(r.get("turns", []), where)
        out.append(Exemplar(str(r.get("name", f"exemplar_{i}")), text, tuple(r.get("leak_markers", ()))))
        feedback += [f for f in fb if f not in feedback]
    return out, feedback


def spec_from_files(frame_path: str, principles_path: str, exemplars_path: str) -> PromptSpec:
    """Our format: a frame template with {principles} and {exemplars} slots + the two JSON files."""
    frame = read_text(frame_path, "self_align.frame_template").strip()
    if "{principles}" not in frame or "{exemplars}" not in frame:
        raise UserError(f"config.self_align.frame_template: {frame_path} needs both "
                        f"'{{principles}}' and '{{exemplars}}'")
    head, rest = frame.split("{principles}", 1)
    mid, tail = rest.split("{exemplars}", 1)
    exemplars, feedback = load_exemplars(exemplars_path)
    return PromptSpec(head=head, principles=tuple(load_principles(principles_path)), mid=mid,
                      exemplars=tuple(exemplars), tail=tail, feedback_lines=tuple(feedback))


def parse_original_prompt(text: str, key: str = "self_align.prompt_file") -> PromptSpec:
    """Parse a prompt in the original Dromedary format (``# Name`` header, ``N (key). text`` rule
    lines, conversations closed by a ``Name (auto reply):`` line, final ``User:``)."""
    text = text.strip()
    m = re.match(r"#\s*(\S+)", text)
    if not m:
        raise UserError(f"config.{key}: expected the prompt to start with '# <assistant name>'")
    name = m.group(1)
    lines = list(_PRINCIPLE_LINE.finditer(text))
    if not lines:
        raise UserError(f"config.{key}: no principle lines of the form 'N (name). text' found")
    principles = tuple(Principle(x.group(2), x.group(3).replace(name, "{assistant}")) for x in lines)
    head = text[:lines[0].start()].replace(name, "{assistant}")
    rest = text[lines[-1].end():]
    first_user = re.search(r"(?m)^User:", rest)
    if not first_user:
        raise UserError(f"config.{key}: no 'User:' turn after the principles")
    mid = rest[:first_user.start()].replace(name, "{assistant}")
    convo = rest[first_user.start():]
    auto = re.compile(rf"(?m)^{re.escape(name)} \(auto reply\):[^\n]*$")
    exemplars, feedback, start = [], [], 0
    for a in auto.finditer(convo):
        block = convo[start:a.end()]
        exemplars.append(block)
        start = a.end()
    tail = convo[start:]
    if not tail.strip().endswith("User:"):
        raise UserError(f"config.{key}: the prompt must end with a 'User:' turn")
    keys = {p.key for p in principles}
    out = []
    for i, block in enumerate(exemplars):
        block = block.lstrip("\n") if i else block
        # the user line just before each auto reply only closes the conversation
        fb = re.findall(r"(?m)^User: (.*)\n\n" + re.escape(name) + r" \(auto reply\)", block)
        feedback += [f for f in fb if f not in feedback]
        block = block.replace(name, "{assistant}")
        block = _mark_citations(block, keys)
        out.append(Exemplar(f"exemplar_{i}", block))
    # exemplar blocks are joined with "\n\n" when rendering; strip those separators from the tail
    if out:
        tail = tail[2:] if tail.startswith("\n\n") else tail
        tail = "\n\n" + tail
        mid_end = mid
    else:
        mid_end = mid
    return PromptSpec(head=head, principles=principles, mid=mid_end, exemplars=tuple(out),
                      tail=tail.replace(name, "{assistant}"), feedback_lines=tuple(feedback))


def _mark_citations(block: str, keys: set[str]) -> str:
    """Turn runs of 'N (key), N (key)' in thoughts lines into '{cites:key|key}' placeholders."""
    run = re.compile(r"\d+ \(([^()\n]+)\)(?:, \d+ \(([^()\n]+)\))*")

    def repl(m):
        found = _CITATION.findall(m.group(0))
        if not found or any(k not in keys for _, k in found):
            return m.group(0)
        return "{cites:" + "|".join(k for _, k in found) + "}"

    out = []
    for line in block.split("\n"):
        out.append(run.sub(repl, line) if "(internal thoughts)" in line else line)
    return "\n".join(out)


def load_spec(cfg) -> PromptSpec:
    """``cfg`` is ``config.self_align``: ``prompt_file`` (original format) wins when set."""
    if cfg.prompt_file:
        return parse_original_prompt(read_text(cfg.prompt_file, "self_align.prompt_file"))
    return spec_from_files(cfg.frame_template, cfg.principles_file, cfg.exemplars_file)


# ------------------------------------------------------------------------------------ rendering

def select_principles(spec: PromptSpec, drop: Sequence[str] = (), shuffle_seed: int = -1) -> list[Principle]:
    """The principles of ``spec`` without the ``drop`` keys, in spec order, or shuffled with
    ``random.Random(shuffle_seed)`` when ``shuffle_seed`` >= 0. UserError (naming
    ``config.self_align.drop_principles``) for an unknown key or when every principle is dropped."""
    keys = {p.key for p in spec.principles}
    unknown = [k for k in drop if k not in keys]
    if unknown:
        raise UserError(f"config.self_align.drop_principles: unknown principle(s) {unknown}; "
                        f"known: {[p.key for p in spec.principles]}")
    chosen = [p for p in spec.principles if p.key not in set(drop)]
    if not chosen:
        raise UserError("config.self_align.drop_principles drops every principle")
    if shuffle_seed is not None and shuffle_seed >= 0:
        random.Random(shuffle_seed).shuffle(chosen)
    return chosen


def select_exemplars(spec: PromptSpec, num: int = -1, names: Sequence[str] = ()) -> list[Exemplar]:
    """The exemplars named in ``names`` (in that order; all of ``spec``'s, in spec order, when
    empty), cut to the first ``num`` when ``num`` >= 0. UserError naming
    ``config.self_align.exemplar_names`` for an unknown name, or ``num_exemplars`` when ``num``
    exceeds the exemplars available."""
    if names:
        by_name = {e.name: e for e in spec.exemplars}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UserError(f"config.self_align.exemplar_names: unknown {missing}; known: {list(by_name)}")
        chosen = [by_name[n] for n in names]
    else:
        chosen = list(spec.exemplars)
    if num is not None and num >= 0:
        if num > len(chosen):
            raise UserError(f"config.self_align.num_exemplars={num} but only {len(chosen)} exemplars exist")
        chosen = chosen[:num]
    return chosen


def _fill(text: str, assistant: str, cutoff: str) -> str:
    return text.replace("{assistant}", assistant).replace("{cutoff}", cutoff)


def render_cites(keys: Sequence[str], numbering: dict) -> str:
    """The citation text for principle ``keys``: ``"N (key), N (key)"`` sorted by number
    (``numbering``: key -> number); keys not in ``numbering`` (dropped principles) are left out,
    so all dropped gives ""."""
    kept = sorted((numbering[k], k) for k in keys if k in numbering)
    return ", ".join(f"{n} ({k})" for n, k in kept)


def build_prompt(spec: PromptSpec, *, assistant: str, cutoff: str = "", drop: Sequence[str] = (),
                 shuffle_seed: int = -1, num_exemplars: int = -1,
                 exemplar_names: Sequence[str] = ()) -> RenderedPrompt:
    """Render ``spec`` for ``assistant`` (and knowledge ``cutoff``) under an ablation: the
    principles left after ``drop`` (shuffled when ``shuffle_seed`` >= 0) numbered 1.. as
    ``N (key). text``, the exemplars chosen by :func:`select_exemplars` with every
    ``{cites:...}`` renumbered by :func:`render_cites`, ``{assistant}`` / ``{cutoff}`` filled in,
    trailing whitespace stripped. UserError from :func:`select_principles` /
    :func:`select_exemplars` for a bad ablation setting."""
    principles = select_principles(spec, drop, shuffle_seed)
    exemplars = select_exemplars(spec, num_exemplars, exemplar_names)
    numbering = {p.key: i + 1 for i, p in enumerate(principles)}
    lines = "\n".join(f"{i + 1} ({p.key}). {p.text}" for i, p in enumerate(principles))

    def ex_text(e: Exemplar) -> str:
        return _CITE_GROUP.sub(lambda m: render_cites(m.group(1).split("|"), numbering), e.text)

    blocks = [ex_text(e) for e in exemplars]
    if blocks:
        body = spec.mid + "\n\n".join(blocks) + spec.tail
    else:
        body = spec.mid.rstrip() + "\n\n" + spec.tail.lstrip()
    prefix = _fill(spec.head + lines + body, assistant, cutoff).rstrip()
    filled = [_fill(b, assistant, cutoff) for b in blocks]
    sentences, questions = _exemplar_text_features(filled, assistant)
    markers = tuple(dict.fromkeys(m for e in exemplars for m in e.leak_markers))
    return RenderedPrompt(prefix=prefix, numbering=numbering, exemplar_names=tuple(e.name for e in exemplars),
                          leak_markers=markers, exemplar_sentences=sentences, exemplar_questions=questions,
                          assistant=assistant)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def _exemplar_text_features(blocks: Sequence[str], assistant: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sentences of >= 8 words from exemplar answers, and the exemplar users' first questions."""
    sentences, questions = [], []
    answer_re = re.compile(rf"(?ms)^{re.escape(assistant)}: (.*?)(?=^User:|\Z)")
    for b in blocks:
        q = re.match(r"User: (.*)", b)
        if q:
            questions.append(q.group(1).strip())
        for m in answer_re.finditer(b):
            for s in _SENT_SPLIT.split(m.group(1)):
                s = s.strip()
                if len(s.split()) >= 8:
                    sentences.append(s)
    return tuple(dict.fromkeys(sentences)), tuple(questions)


def question_suffix(question: str, input_text: str, assistant: str) -> str:
    """What follows the shared prefix for one question (the prefix ends with 'User:')."""
    body = question.strip()
    if input_text and input_text.strip():
        body += "\n\n" + input_text.strip()
    return f" {body}\n\n{assistant} (internal thoughts):"


def cited_principles(thoughts: str, numbering: dict) -> list[str]:
    """Principle keys a generated 'internal thoughts' text cites, as 'N (key)' (matched by key,
    or by number when the name is not a known key), in order of first mention."""
    by_num = {n: k for k, n in numbering.items()}
    lower = {k.lower(): k for k in numbering}
    out: list[str] = []
    for num, name in _CITATION.findall(thoughts):
        k = lower.get(name.strip().lower()) or by_num.get(int(num))
        if k and k not in out:
            out.append(k)
    return out
