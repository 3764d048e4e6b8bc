"""Reading and writing JSON files: one-line UserErrors that name the file and line, atomic
replacement, and append-only logs that survive a kill.

Every reader of user-supplied record files (pipeline inputs, training data, evaluation sets) goes
through these functions, so a bad line is reported the same way everywhere:
``<file>:<line>: malformed JSON line (<reason> at column <n>)`` (``malformed JSON`` for a file
that holds one JSON document).
Files the project writes itself are read with :func:`read_log` (a cut-short LAST line, left by a
kill, is skipped) and written with the atomic writers or :class:`AppendLog` below.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

from dromedary_jax.errors import DISK_FULL, UserError, disk_full_error


def _malformed(where: str, e: json.JSONDecodeError, what: str = "JSON line") -> UserError:
    return UserError(f"{where}: malformed {what} ({e.msg} at column {e.colno})")


def read_json(path: str, note: str = "") -> Any:
    """One JSON document from a file (e.g. a BIG-bench ``task.json``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}{note}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}{note}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _malformed(f"{path}:{e.lineno}{note}", e, "JSON") from None


def iter_jsonl(path: str, note: str = "") -> Iterator[tuple[str, Any]]:
    """``("<path>:<line>", value)`` for every non-blank line of a JSONL file. ``note`` (e.g.
    ``" (config.data.files)"``) is appended to the location in error messages."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}{note}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise _malformed(where + note, e) from None


def read_json_records(path: str, note: str = "", objects: bool = False) -> list[Any]:
    """A JSONL file (one record a line, blank lines skipped) or a JSON file holding a list of
    records; a file whose text starts with ``[`` is read as the latter. With ``objects`` every
    record must be a JSON object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}{note}: file not found")
    with open(path, "rb") as f:
        starts_with_list = f.read(4096).lstrip().startswith(b"[")
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


# ------------------------------------------------------------------------------------ writing
# Every file the project writes is either replaced atomically (written to a temporary file in the
# same folder, flushed, then ``os.replace``d over the old one: a kill leaves the old file or the
# new one, never half of one) or an append-only JSONL log whose cut last line is dropped when it
# is opened again (:class:`AppendLog`). A full disk raises the one-line ``disk_full_error``.

def _write_atomic(path: str, write: Callable[[Any], Any], mode: str = "w") -> Any:
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            out = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise disk_full_error(path, e) from None
        raise
    return out


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    _write_atomic(path, lambda f: f.write(text))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, ``os.replace``); a
    full disk raises the one-line ``disk_full_error`` (a UserError)."""
    _write_atomic(path, lambda f: f.write(data), mode="wb")


def write_json_atomic(path: str, obj: Any, indent: int = 2) -> None:
    """Replace ``path`` with ``obj`` as JSON (sorted keys) atomically."""
    def write(f):
        json.dump(obj, f, indent=indent, sort_keys=True, ensure_ascii=False)
        f.write("\n")

    _write_atomic(path, write)


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> int:
    """Replace ``path`` with one JSON object a line atomically; returns the number of rows."""
    def write(f):
        n = 0
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        return n

    return _write_atomic(path, write)


def repair_tail(path: str) -> bool:
    """Cut a last line that has no newline (a write cut short by a kill); True if one was cut."""
    if not os.path.exists(path):
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            return True
    return False


def read_log(path: str) -> list[dict]:
    """The records of an append-only JSONL log the project wrote: blank lines skipped, a cut last
    line (no newline: the write was killed) ignored; any other bad line is a UserError naming
    the file and line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # cut short by a kill: dropped, repaired on the next append
                continue
            raise UserError(f"{path}: line {i + 1} is not valid JSON ({e.msg} at column "
                            f"{e.colno}); the file is corrupt: delete that line (or the file) "
                            f"and rerun") from None
    return out


class AppendLog:
    """An append-only JSONL log (training metrics, example-id logs): a cut last line is dropped
    when it is opened, ``keep`` (a predicate on records) drops the records a resumed run will
    write again (the file is rewritten atomically without them), and every ``write`` is flushed
    (``fsync`` with ``durable``). A full disk raises the one-line ``disk_full_error``."""

    def __init__(self, path: str, keep: Callable[[dict], bool] | None = None,
                 durable: bool = False):
        self.path, self.durable = os.fspath(path), durable
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            repair_tail(self.path)
            if keep is not None and os.path.exists(self.path):
                rows = read_log(self.path)
                kept = [r for r in rows if keep(r)]
                if len(kept) != len(rows):
                    write_jsonl_atomic(self.path, kept)
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full_error(self.path, e) from None
            raise

    def write(self, record: Mapping) -> None:
        """Append ``record`` as one JSON line and flush (see :meth:`write_many`)."""
        self.write_many([record])

    def write_many(self, records: Iterable[Mapping]) -> None:
        """Append each record as one JSON line in one write, then flush (and fsync when
        ``durable``). A full disk raises the one-line ``disk_full_error`` (a UserError); a line
        it cut short is dropped when the log is opened again."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not text:
            return
        try:
            self._f.write(text)
            self._f.flush()
            if self.durable:
                os.fsync(self._f.fileno())
        except OSError as e:
            if e.errno in DISK_FULL:  # a cut line is repaired when the log is opened again
                raise disk_full_error(self.path, e) from None
            raise

    def sync(self) -> None:
        """Flush and fsync what was written (e.g. before a checkpoint that covers it is saved)."""
        if self._f is None:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full_error(self.path, e) from None
            raise

    def close(self) -> None:
        """Close the file (idempotent); a full disk while flushing on close is ignored (the
        cut line is repaired on the next open), other OSErrors propagate."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError as e:
                if e.errno not in DISK_FULL:
                    raise
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
