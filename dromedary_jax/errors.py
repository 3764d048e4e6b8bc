"""Errors meant for the user: the CLIs print them as one line and exit non-zero."""
from __future__ import annotations

import functools
import re
import sys


class UserError(Exception):
    """Bad input or config: the message alone says what is wrong and how to fix it."""


def check_workdir(workdir: str | None) -> str:
    """A run's output folder: required, and a filesystem path (records, checkpoints and reports
    are written with plain file I/O, and every host of a multi-host run must see the same
    folder: mount a bucket or share, e.g. with gcsfuse or Filestore)."""
    if not workdir:
        raise UserError("--workdir is required")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", workdir):
        raise UserError(f"--workdir {workdir}: URLs are not supported; mount the bucket or share "
                        f"on every host (e.g. gcsfuse, Filestore) and pass the mounted path")
    return workdir


def cli_main(fn):
    """Wrap a CLI ``main``: a UserError becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def parse_flags(argv):
    """absl flag parsing for the CLIs (``app.run(..., flags_parser=parse_flags)``): a bad config
    file, flag value or ``--config.x=y`` override becomes a one-line UserError, e.g.
    ``config.self_align.temprature: unknown key (Did you mean "temperature" ...?)``."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
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
