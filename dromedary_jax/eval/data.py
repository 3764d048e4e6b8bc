"""Reading local evaluation files: JSON or JSONL records, with one-line UserErrors that name the
file and the line / record."""
from __future__ import annotations

import os
from typing import Any

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_records


def read_json_or_jsonl(path: str) -> list[Any]:
    """A ``.jsonl`` file (one record a line; blank lines skipped) or a ``.json`` file holding a
    list of records. Anything else is a UserError naming the file and line."""
    return read_records(path)


def read_text(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()
