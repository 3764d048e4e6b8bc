"""Output folders of the checkpoint writers (``save_hf``, ``save_checkpoint``, the convert CLI):
checked before anything is read or written, so a bad path is one UserError, not an OSError."""
from __future__ import annotations

import os

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
        raise UserError(f"{arg} {path} exists and is not a folder; choose a folder path")


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
