"""Reading JSON records from files, with one-line UserErrors that name the file and line.

Every reader of user-supplied record files (pipeline inputs, training data, evaluation sets) goes
through these functions, so a bad line is reported the same way everywhere:
``<file>:<line>: malformed JSON line (<reason> at column <n>)`` (``malformed JSON`` for a file
that holds one JSON document).
(The pipeline's own append-only shards have their own reader in ``pipeline/records.py``: there a
cut-short LAST line is expected after a kill and skipped.)
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from dromedary_jax.errors import UserError


def _malformed(where: str, e: json.JSONDecodeError, what: str = "JSON line") -> UserError:
    return UserError(f"{where}: malformed {what} ({e.msg} at column {e.colno})")


def read_json(path: str, note: str = "") -> Any:
    """One JSON document from a file (e.g. a BIG-bench ``task.json``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}{note}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _malformed(f"{path}:{e.lineno}{note}", e, "JSON") from None


def iter_jsonl(path: str, note: str = "") -> Iterator[tuple[str, Any]]:
    """``("<path>:<line>", value)`` for every non-blank line of a JSONL file. ``note`` (e.g.
    ``" (config.data.files)"``) is appended to the location in error messages."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise _malformed(where + note, e) from None


def read_records(path: str, note: str = "", objects: bool = False) -> list[Any]:
    """A JSONL file (one record a line, blank lines skipped) or a JSON file holding a list of
    records; a file whose text starts with ``[`` is read as the latter. With ``objects`` every
    record must be a JSON object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}{note}: file not found")
    with open(path, encoding="utf-8") as f:
        starts_with_list = f.read(4096).lstrip().startswith("[")
    if starts_with_list or path.endswith(".json"):
        rows = read_json(path, note)
        if not isinstance(rows, list):
            raise UserError(f"{path}{note}: expected a JSON list of records (or a .jsonl file "
                            f"with one record a line), got {type(rows).__name__}")
    else:
        rows = [value for _, value in iter_jsonl(path, note)]
    if objects:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(f"{path}{note}: record {i + 1} is not a JSON object")
    return rows
