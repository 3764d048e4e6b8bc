"""Output paths of the writers (checkpoints, HF exports, the convert CLI, eval results and
tables): checked before anything is read or written, so a bad path is one UserError naming the
argument, not an OSError after the work is done."""
from __future__ import annotations

import os
from typing import Sequence

from dromedary_jax.errors import UserError


def folder_arg(path, arg: str) -> str:
    """``path`` as a str; UserError naming ``arg`` when it is not a path (e.g. None)."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"{arg}={path!r}: expected a folder path (str or os.PathLike)")
    return os.fspath(path)


def is_nonempty_dir(path: str) -> bool:
    """``path`` is an existing folder with something in it (UserError when it cannot be listed)."""
    if not os.path.isdir(path):
        return False
    try:
        return bool(os.listdir(path))
    except OSError as e:
        raise UserError(f"{path}: cannot list the folder ({e.strerror or e})") from None


def check_out_dir(path: str, arg: str) -> None:
    """UserError when ``path`` exists but is not a folder (a file, a special file)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{arg} {path}: exists and is not a folder; pass a folder path (it is "
                        "created if missing)")


def make_out_dir(path: str, arg: str) -> bool:
    """Create ``path`` (and its parents) if needed; True when it was created. UserError when it
    cannot be (a read-only or missing parent, a file in the way)."""
    check_out_dir(path, arg)
    if os.path.isdir(path):
        return False
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{arg} {path}: cannot create the folder ({e.strerror or e}); choose a "
                        "writable path") from None
    return True


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
    check_out_dir(path, what)
    _check_creatable_folder(path, what, path)
    for name in files:
        target = os.path.join(path, name)
        if os.path.isdir(target) or (os.path.lexists(target) and not os.access(target, os.W_OK)):
            raise UserError(f"{what} {path}: {target} cannot be written (a folder, or a file "
                            f"without write permission); remove it or pick another folder")
