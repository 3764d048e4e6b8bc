"""Reading local evaluation files: JSON or JSONL records, with one-line UserErrors that name the
file and the line / record."""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json_records


def read_json_or_jsonl(path: str) -> list[Any]:
    """A ``.jsonl`` file (one record a line; blank lines skipped) or a ``.json`` file holding a
    list of records. Anything else is a UserError naming the file and line."""
    return read_json_records(path)


def read_text(path: str, what: str) -> str:
    """The whole UTF-8 text of ``path``; UserError ``<what> file not found: <path>`` when it is
    not a file (``what`` names the flag, e.g. ``--meta_prompt``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def fingerprint(keys: Iterable[str]) -> str:
    """A short stable hash of a question set (order-free): sha256 of the sorted keys, 16 hex
    digits. Result files record it so that ``compare`` can refuse results scored on different
    questions."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]
