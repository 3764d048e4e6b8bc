"""Reading local evaluation files: JSON or JSONL records, with one-line UserErrors that name the
file and the line / record; checking output paths before any work is done."""
from __future__ import annotations

import os
from typing import Any, Sequence

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


def _check_creatable_folder(folder: str, what: str, path: str) -> None:
    """``folder`` exists, or can be created: its nearest existing ancestor is a folder we can
    write in."""
    p = os.path.abspath(folder)
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UserError(f"{what} {path}: {p} is not a folder, so the output cannot be written "
                        f"there; pick another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: no permission to write in {p}; pick another path")


def check_out_file(path: str, what: str = "--out") -> None:
    """An output file path: not an existing folder, writable, its folder creatable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{what} {path}: is an existing folder; pass a file path, e.g. "
                        f"{os.path.join(path, 'result.json')}")
    if os.path.lexists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path}: the file exists and is not writable; pick another path")
    _check_creatable_folder(os.path.dirname(os.path.abspath(path)), what, path)


def check_out_folder(path: str, what: str = "--out", files: Sequence[str] = ()) -> None:
    """An output folder path: an existing folder or one that can be created, with none of
    ``files`` (the names written into it) an existing folder."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path}: exists and is not a folder; pass a folder path (it is "
                        f"created if missing)")
    _check_creatable_folder(path, what, path)
    for name in files:
        target = os.path.join(path, name)
        if os.path.isdir(target) or (os.path.lexists(target) and not os.access(target, os.W_OK)):
            raise UserError(f"{what} {path}: {target} cannot be written (a folder, or a file "
                            f"without write permission); remove it or pick another folder")
