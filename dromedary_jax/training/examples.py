"""(prompt, response) records -> token ids + loss mask.

A record is one JSON object per line of a JSONL file, with the prompt and the response under the
field names ``data.prompt_field`` / ``data.response_field`` (default ``"prompt"`` /
``"response"``) and an optional id under ``data.id_field`` (default ``"id"``; when absent the id
is ``"<file>:<line>"``).

Rendering: the prompt goes through a meta-prompt template (every ``{prompt}`` is replaced by the
record's prompt; nothing else in the template is interpreted). Tokens are

    encode(rendered prompt + response) + [eos]

the joined text encoded ONCE (with BOS when the tokenizer's own rule adds it, see
``Tokenizer.add_bos``), so the model reads exactly the tokens the same text gets at inference:
encoding the two parts apart and concatenating the ids is not the same (a SentencePiece
tokenizer puts a lone "▁" token before a response that starts with a space). The prompt/response
boundary of the loss mask is where the joined ids stop matching ``encode(rendered prompt)``
(:func:`split_at_seam`): normally exactly after the prompt's ids; when a token merges across the
seam, that token is a target. The loss mask is 1 on response tokens (and the EOS) and 0 on
bos/prompt tokens. Examples longer than
``max_len`` keep their prompt and lose the end of the response (no EOS then); an example left
with no response token is dropped and counted.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import iter_jsonl
from dromedary_jax.tokenizer import split_at_seam  # noqa: F401  (also this module's API)


@dataclasses.dataclass
class Example:
    """One tokenized example: ``tokens`` and ``loss_mask`` int32 [n] (n <= ``max_len``),
    ``truncated`` when the response was cut to fit."""

    id: str
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # int32 [n]; 1 where tokens[i] is a target (predicted from tokens[:i])
    truncated: bool = False


@dataclasses.dataclass
class Record:
    """One (prompt, response) record read from a JSONL line, with its id (the record's id
    field, else ``source``) and ``source`` (``"<file>:<line>"``)."""

    id: str
    prompt: str
    response: str
    source: str  # "<file>:<line>"


def expand_files(spec: str | Sequence[str], key: str = "data.train_files") -> list[str]:
    """Comma-separated string or list of paths / glob patterns -> sorted existing files."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = [str(s) for s in spec if str(s).strip()]
    if not items:
        raise UserError(f"{key} is empty: give one or more JSONL files (comma-separated or a glob)")
    out: list[str] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise UserError(f"{key}: the pattern {item!r} matches no file")
            out.extend(matches)
        elif os.path.isdir(item):
            matches = sorted(glob.glob(os.path.join(item, "*.jsonl")))
            if not matches:
                raise UserError(f"{key}: the folder {item!r} holds no *.jsonl file")
            out.extend(matches)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise UserError(f"{key}: no such file {item!r}")
    return out


def read_sft_records(paths: Iterable[str], prompt_field: str = "prompt",
                 response_field: str = "response", id_field: str = "id") -> Iterator[Record]:
    """Parse JSONL files; a malformed line raises UserError naming its file and line number."""
    for path in paths:
        for where, obj in iter_jsonl(path):
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for field, key in ((prompt_field, "prompt_field"), (response_field, "response_field")):
                if field not in obj:
                    raise UserError(f"{where}: record has no field {field!r} "
                                    f"(set data.{key} to the field name your records use)")
                if not isinstance(obj[field], str):
                    raise UserError(f"{where}: field {field!r} must be a string")
            rid = obj.get(id_field)
            yield Record(id=str(rid) if rid is not None else where, prompt=obj[prompt_field],
                         response=obj[response_field], source=where)


def load_template(template: str, template_file: str = "") -> str:
    """The meta-prompt template (from ``data.template_file`` when set); must hold ``{prompt}``."""
    if template_file:
        if not os.path.isfile(template_file):
            raise UserError(f"data.template_file: no such file {template_file!r}")
        with open(template_file, encoding="utf-8") as f:
            template = f.read()
        key = f"data.template_file ({template_file})"
    else:
        key = "data.template"
    if "{prompt}" not in template:
        raise UserError(f"{key} must contain the placeholder {{prompt}}")
    return template


def render_prompt(template: str, prompt: str) -> str:
    """``template`` with every ``{prompt}`` replaced by ``prompt`` (nothing else interpreted)."""
    return template.replace("{prompt}", prompt)


def tokenize_example(tokenizer, prompt_text: str, response: str, max_len: int, *,
                     add_bos: bool | None = None, add_eos: bool = True, id: str = ""
                     ) -> Example | None:
    """Token ids and loss mask for one rendered prompt + response; None if no target is left.

    ``add_bos``: None = the tokenizer's own rule (``tokenizer.add_bos``), True/False force it.
    The ids are ``encode(prompt_text + response)`` (see :func:`split_at_seam`) plus EOS when
    ``add_eos``."""
    p, r = split_at_seam(tokenizer, prompt_text, response, bos=add_bos)
    if add_eos:
        r = r + [tokenizer.eos_id]
    truncated = len(p) + len(r) > max_len
    if truncated:
        r = r[: max(0, max_len - len(p))]
        p = p[:max_len]
    tokens = np.asarray(p + r, dtype=np.int32)
    mask = np.zeros(len(tokens), dtype=np.int32)
    mask[len(p):] = 1
    if mask[1:].sum() == 0:  # tokens[0] is never predicted
        return None
    return Example(id=id, tokens=tokens, loss_mask=mask, truncated=truncated)


def model_inputs(tokens: np.ndarray, loss_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Shift for next-token prediction: inputs = tokens[:-1], targets = tokens[1:]."""
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask[1:]}
