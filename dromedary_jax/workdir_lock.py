"""One run at a time per workdir: an exclusive ``fcntl.flock`` on a lock file in the workdir.

    with workdir_lock(workdir, process_index=jax.process_index()):
        ...  # run the stages / the fine-tune

The lock is held while the ``with`` block runs (for a CLI: the process's lifetime). The kernel
drops it when the process ends in any way, SIGKILL included, so a killed run never leaves the
workdir stuck: the next run takes the lock and resumes. A second run started on a workdir in use
fails at once with one line naming the holder's pid.

Multi-host runs: each process locks its own file (``.dromedary.lock`` for process 0,
``.dromedary.lock.<index>`` for the others), so every process of a second run on the same
workdir refuses, and process 0 of a one-host run and of a multi-host run use the same file. On a
filesystem without flock support (some network mounts) the lock is skipped with a warning.

Locks are re-entrant within a process (a runner that calls the fine-tune inside its own lock).
Also checks, before anything is written, that the workdir is a folder that can be created and
written to (one UserError line otherwise).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from typing import Iterator

from dromedary_jax.errors import DISK_FULL, UserError, disk_full_error

LOCK_NAME = ".dromedary.lock"
log = logging.getLogger("dromedary_jax")
_HELD: dict[str, list] = {}  # lock path -> [fd, depth]
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_path(workdir: str, process_index: int = 0) -> str:
    """Absolute path of the lock file of process ``process_index`` in ``workdir``:
    ``.dromedary.lock`` for process 0, ``.dromedary.lock.<index>`` for the others."""
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
    return os.path.join(os.path.abspath(workdir), name)


def _make_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir}: is a file, not a folder; pass a folder path (it is "
                        f"created if missing)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(workdir, e, "creating the workdir") from None
        raise UserError(f"--workdir {workdir}: cannot create it ({e.strerror}); pass a folder "
                        f"you can write to") from None


def _open(path: str, workdir: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(path, e, "creating the lock file") from None
        raise UserError(f"--workdir {workdir}: not writable ({e.strerror}); pass a folder you can "
                        f"write to") from None
    return fd


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


def acquire(workdir: str, process_index: int = 0) -> str:
    """Take the lock of ``workdir`` for this process (creating the folder); returns the lock
    file's path. Raises UserError if the folder cannot be written or another run holds it."""
    _make_workdir(workdir)
    path = lock_path(workdir, process_index)
    held = _HELD.get(path)
    if held is not None:
        held[1] += 1
        return path
    fd = _open(path, workdir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise UserError(f"--workdir {workdir} is in use by another run{who}; wait for it to finish "
                        f"(or stop it: the same command then resumes), or use another "
                        f"--workdir") from None
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            os.close(fd)
            raise
        log.warning("%s: this filesystem does not support file locks (%s): two runs on this "
                    "workdir would not be stopped", workdir, e.strerror)
    try:  # who holds it, for the message of a second run (informational only)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        if e.errno in DISK_FULL:
            raise disk_full_error(path, e, "writing the lock file") from None
        raise UserError(f"--workdir {workdir}: not writable ({e.strerror}); pass a folder you can "
                        f"write to") from None
    _HELD[path] = [fd, 1]
    return path


def release(path: str) -> None:
    """Undo one :func:`acquire` of the lock file ``path``; the last one closes the file, which
    drops the lock. A path this process does not hold is ignored."""
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[path]
        os.close(held[0])  # closing the descriptor drops the flock


@contextlib.contextmanager
def workdir_lock(workdir: str, process_index: int = 0) -> Iterator[str]:
    """Hold the lock of ``workdir`` for the ``with`` block (see the module docstring)."""
    path = acquire(workdir, process_index)
    try:
        yield path
    finally:
        release(path)
