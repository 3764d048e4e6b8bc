"""Errors meant for the user: the CLIs print them as one line and exit non-zero.

:func:`cli_main` is the one place where a CLI's failures become one line on stderr:

* a :class:`UserError` (bad input or config): ``error: <message>``, exit status 2;
* a full disk (``ENOSPC`` / ``EDQUOT`` / ``EFBIG`` anywhere in the exception's chain, from any
  writer: records, checkpoints, the HF export, metrics, reports): ``error: <file>: no space left
  on device ...``, exit status 2;
* Ctrl-C (SIGINT) or SIGTERM (what a preempted TPU VM gets): ``interrupted (SIGTERM) ...``,
  exit status 130 / 143, after the ``finally`` blocks on the way out have flushed and closed what
  was being written (record shards, metrics, async checkpoints).

:func:`absl_cli_args` / :func:`absl_cli_flags` are the one command-line parser of every CLI
(absl flags: underscore names, ``--name value`` or ``--name=value``, ``--name`` / ``--noname``
for a boolean, ``--config.<key>=value`` overrides where a CLI takes a config); a bad flag or
override is one line too. Old spellings (:data:`DEPRECATED_FLAGS`) still work for one release,
each with one deprecation line.
"""
from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import re
import signal
import sys
import threading

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")
EXIT_USER_ERROR = 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report


class UserError(Exception):
    """Bad input or config: the message alone says what is wrong and how to fix it."""


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the SIGTERM handler :func:`cli_main` installs (SIGINT raises
    a plain KeyboardInterrupt), so both unwind through the same ``finally`` blocks."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_workdir(workdir: str | None) -> str:
    """A run's output folder: required, a filesystem path (records, checkpoints and reports are
    written with plain file I/O, and every host of a multi-host run must see the same folder:
    mount a bucket or share, e.g. with gcsfuse or Filestore), and not an existing file. Creates
    nothing (``workdir_lock.workdir_lock`` creates it and checks that it is writable)."""
    if not workdir:
        raise UserError("--workdir is required")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", workdir):
        raise UserError(f"--workdir {workdir}: URLs are not supported; mount the bucket or share "
                        f"on every host (e.g. gcsfuse, Filestore) and pass the mounted path")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir}: is a file, not a folder; pass a folder path (it is "
                        f"created if missing)")
    return workdir


def disk_full_error(path: str | None, e: BaseException | None = None,
                    what: str = "writing") -> UserError:
    """The one-line error of a full disk (or quota) hit while ``what`` ``path``: free space, then
    the same command resumes (every writer keeps what it finished: records are append-only,
    other files are replaced atomically, training resumes from its last checkpoint)."""
    code = getattr(e, "errno", None)
    text = str(e or "")
    if code == errno.EDQUOT or "quota exceeded" in text.lower():
        cause, fix = "disk quota exceeded", "raise the quota (or free some space)"
    elif code == errno.EFBIG or "file too large" in text.lower():
        cause, fix = "file too large", "raise the file-size limit (ulimit -f) or use a filesystem " \
                                       "that takes larger files"
    else:
        cause, fix = "no space left on device", "free some space (or raise the quota)"
    where = f"{path}: " if path else ""
    return UserError(f"{where}{cause} while {what}; {fix}, then rerun the same command: it "
                     f"resumes from what was already written")


def find_disk_full(e: BaseException | None) -> BaseException | None:
    """The exception in ``e``'s chain (causes, contexts, exception groups) that says the disk or
    quota is full, if any (an ``OSError`` with ENOSPC/EDQUOT, or an error of a C++ writer such as
    TensorStore whose message carries the OS text)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_FULL:
            return x
        if any(t in str(x) for t in _DISK_FULL_TEXT):
            return x
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None


def _disk_full_path(x: BaseException) -> str | None:
    path = getattr(x, "filename", None)
    if path:
        return os.fspath(path)
    # a C++ writer's message (TensorStore: ... Failed writing: "/path/file": ...): the longest
    # absolute path in it whose folder exists, else the longest
    found = sorted(set(re.findall(r"(/[^\s'\":\[\]]+)", str(x))), key=len, reverse=True)

    def in_a_folder(p: str) -> bool:
        parent = os.path.dirname(p.rstrip("/"))
        return parent not in ("", "/") and os.path.isdir(parent)

    return ([p for p in found if in_a_folder(p)] or found or [None])[0]


class _DropDiskFullLogs(logging.Filter):
    """Library threads (Orbax's async writers) log the same disk-full error with its traceback
    before it reaches the CLI; the CLI reports it once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and find_disk_full(record.exc_info[1]) is not None:
            return False
        return not any(t in str(record.msg) for t in _DISK_FULL_TEXT)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _quiet_closed_loops(hook):
    """A ``sys.unraisablehook`` that drops TensorStore's late callbacks into the event loop of an
    Orbax save that was aborted (``RuntimeError: Event loop is closed``, raised in C++ threads
    while the process is already reporting the real error); anything else goes to ``hook``."""

    def unraisable(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        hook(u)

    unraisable.quiet_closed_loops = True
    return unraisable


def cli_main(fn):
    """Wrap a CLI ``main``: see the module docstring. Nesting is harmless (the inner wrapper
    exits; the outer one lets ``SystemExit`` through)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _raise_interrupted)
        if not getattr(sys.unraisablehook, "quiet_closed_loops", False):
            sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
        quiet = _DropDiskFullLogs()
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(quiet)
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            print(f"interrupted ({signal.Signals(signum).name}): what was finished is saved; run "
                  f"the same command again to resume", file=sys.stderr, flush=True)
            sys.exit(EXIT_SIGNAL[signum])
        except Exception as e:  # noqa: BLE001 - only a full disk is turned into one line
            full = find_disk_full(e)
            if full is None:
                raise
            print(f"error: {disk_full_error(_disk_full_path(full), full)}", file=sys.stderr,
                  flush=True)
            # the process is exiting: the aborted save's futures are collected after this
            # wrapper returns, and asyncio then logs each one's error ("exception was never
            # retrieved") with its traceback; keep those quiet for good
            for name in ("absl", "asyncio"):
                logging.getLogger(name).addFilter(_DropDiskFullLogs())
            sys.exit(EXIT_USER_ERROR)
        finally:
            absl_logger.removeFilter(quiet)
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    return wrapper


def parse_flags(argv, flag_values=None):
    """absl flag parsing for the CLIs: a bad config file, flag value or ``--config.x=y``
    override becomes a one-line UserError, e.g. ``config.self_align.temprature: unknown key
    (Did you mean "temperature" ...?)``. ``flag_values``: default absl's global ``FLAGS`` (as
    ``app.run(..., flags_parser=parse_flags)`` needs); the runner and the fine-tune CLI pass
    their own ``FlagValues``, so their ``main(argv)`` can be called again in one process."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    try:
        rest = fv(argv)
        config = fv["config"].value if "config" in fv else None
        if config is not None:
            config.keys()  # config_flags defers a config file's loading error to the first access
        return rest
    except OSError as e:
        raise UserError(f"--config: {' '.join(str(e).split())}") from None
    except flags.Error as e:
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        msg = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        raise UserError(msg) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e)
        if "\\" in text:  # a KeyError's repr-quoted text: \' and \n
            try:
                text = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
            except UnicodeDecodeError:
                pass
        text = " ".join(text.split()).strip("\"' ")
        overrides = [a for a in argv if a.startswith("--config.")]
        m = re.match(r"'?([A-Za-z_][A-Za-z_0-9]*)'?(?:\s|$)", text)
        key = m.group(1) if m else ""
        if isinstance(e, (AttributeError, KeyError)) and key:
            for a in overrides:  # the override naming that key: report its path up to the key
                parts = a[2:].split("=")[0].split(".")
                if key in parts[1:]:
                    where = ".".join(parts[:parts.index(key, 1) + 1])
                    hint = text[m.end():].strip()
                    raise UserError(f"{where}: unknown key" + (f" ({hint})" if hint else "")) \
                        from None
        named = [a for a in overrides if key and key in a] or overrides
        where = f" ({', '.join(named)})" if named else ""
        raise UserError(f"bad config file or override{where}: {type(e).__name__}: {text}") from None


# ------------------------------------------------------------------------------ old spellings
# Every CLI takes absl flags: underscore names, ``--name=value`` or ``--name value``, ``--name`` /
# ``--noname`` for a boolean. The dashed spellings the argparse CLIs took before 0.2 (and
# ``run --dry-run``) keep working for ONE release: each use prints one line naming the new
# spelling. CLI -> {old spelling: new spelling}; "eval compare" is its own CLI.
DEPRECATED_FLAGS: dict[str, dict[str, str]] = {
    "run": {"--dry-run": "--dry_run"},
    "convert": {"--vocab-size": "--vocab_size", "--max-seq-len": "--max_seq_len",
                "--max-shard-size": "--max_shard_size"},
    "eval": {"--batch-size": "--batch_size", "--batch-tokens": "--batch_tokens",
             "--row-length": "--row_length", "--no-bos": "--nobos",
             "--mc1-max-false": "--mc1_max_false", "--preamble-file": "--preamble_file",
             "--meta-prompt": "--meta_prompt", "--model-id": "--model_id",
             "--max-new-tokens": "--max_new_tokens", "--top-p": "--top_p",
             "--share-meta-prompt": "--share_meta_prompt"},
}
DEPRECATION_NOTE = "it still works in this release and will be removed in the next"


def deprecated(old: str, new: str) -> None:
    """Print the one deprecation line of an old spelling ``old`` (stderr)."""
    print(f"warning: {old} is deprecated, use {new} ({DEPRECATION_NOTE})", file=sys.stderr,
          flush=True)


def rewrite_deprecated(argv, cli: str) -> list[str]:
    """``argv`` (program name first) with every old spelling :data:`DEPRECATED_FLAGS` lists for
    ``cli`` (as ``--old`` or ``--old=value``) replaced by its new one, printing one
    :func:`deprecated` line per old spelling used. Nothing after a ``--`` is touched."""
    table = DEPRECATED_FLAGS.get(cli, {})
    out, seen = list(argv[:1]), set()
    for i, a in enumerate(argv[1:], 1):
        if a == "--":
            out += argv[i:]
            break
        name, eq, value = a.partition("=")
        if name in table:
            if name not in seen:
                deprecated(name, table[name])
                seen.add(name)
            a = table[name] + eq + value
        out.append(a)
    return out


def _help_text(usage: str | None, fv) -> str:
    """``usage`` then the flags (absl's list without its per-module headings)."""
    listing = [ln for ln in fv.get_help(include_special_flags=False).splitlines()
               if ln.startswith(" ")]  # drop the "<module path>:" headings and blank lines
    return (inspect.cleandoc(usage) + "\n\n" if usage else "") + "flags:\n" + "\n".join(listing)


def absl_cli_args(argv, define, *, cli: str | None = None, usage: str | None = None,
                  positional: bool = False):
    """Parse a CLI's command line: ``argv`` (program name first) with the old spellings of
    ``cli`` rewritten (:func:`rewrite_deprecated`), parsed with :func:`parse_flags` into a fresh
    absl ``FlagValues`` holding the flags ``define(fv, argv)`` declares. Returns ``(fv,
    positional arguments)``; without ``positional`` a positional argument is a UserError.
    ``--help`` / ``-h`` prints ``usage`` (the module docstring) and the flags, and exits 0.

    absl's own flags (``--verbosity`` ...) belong to the global ``FLAGS``: a CLI's entry point
    parses those first (``flags.FLAGS(sys.argv, known_only=True)``) and passes on the rest."""
    from absl import flags

    argv = rewrite_deprecated(list(argv), cli) if cli else list(argv)
    fv = flags.FlagValues()
    define(fv, list(argv))
    if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv[1:]):
        print(_help_text(usage, fv))
        sys.exit(0)
    rest = parse_flags(argv, fv)
    if len(rest) > 1 and not positional:
        raise UserError(f"unexpected argument(s) {rest[1:]} (flags are --name=value)")
    return fv, rest[1:]


def absl_cli_flags(argv, define, *, cli: str | None = None, usage: str | None = None):
    """:func:`absl_cli_args` of a CLI without positional arguments: the parsed ``FlagValues``."""
    return absl_cli_args(argv, define, cli=cli, usage=usage)[0]
