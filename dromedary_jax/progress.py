"""Progress bars for the long steps (sampling, scoring, training): one helper so every bar looks
and behaves the same.

* Only process 0 draws (the others get ``None``); ``DROMEDARY_PROGRESS=0`` in the environment
  turns every bar off (e.g. in CI logs).
* On a terminal (or in a notebook) it is an ordinary tqdm bar with its rate and ETA. When stderr
  is NOT a terminal (a log file on a TPU VM, a captured test), the bar is written as one plain
  line at most every ``DROMEDARY_PROGRESS_INTERVAL_S`` seconds (default 30) instead of
  ``\\r``-rewritten text, so a log stays readable and still shows the rate and the ETA.

:class:`TokenProgress` counts work items (prompts, steps) for the ETA and generated tokens for a
tokens/s figure shown after the bar.
"""
from __future__ import annotations

import os
import sys
import time

ENV_SWITCH = "DROMEDARY_PROGRESS"  # "0" / "false" / "off": no bars anywhere
ENV_INTERVAL = "DROMEDARY_PROGRESS_INTERVAL_S"  # seconds between lines when not on a terminal


def enabled_by_env() -> bool:
    """False when ``DROMEDARY_PROGRESS`` is set to 0/false/off/no."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in ("0", "false", "off", "no")


class _LineWriter:
    """A file-like for tqdm that turns each ``\\r``-refresh into one plain line (for logs)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_notebook_tqdm(cls) -> bool:
    return any(c.__module__.startswith("tqdm.notebook") for c in cls.__mro__)


def progress_bar(total: int | None, *, desc: str, unit: str, initial: int = 0,
                 show: bool = True, unit_scale: bool = False):
    """A tqdm bar on process 0 (``None`` elsewhere, when ``show`` is False, or when
    ``DROMEDARY_PROGRESS=0``). ``total``: the count the bar runs to (gives the ETA; None: no
    ETA); ``unit``: what one count is ("prompt", "step", "tok"); ``initial``: already done."""
    if not show or not enabled_by_env():
        return None
    import jax

    if jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    kw = dict(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
              dynamic_ncols=True)
    stream = sys.stderr
    on_terminal = bool(getattr(stream, "isatty", lambda: False)())
    if not on_terminal and not _is_notebook_tqdm(tqdm):
        try:
            interval = float(os.environ.get(ENV_INTERVAL, "30"))
        except ValueError:
            interval = 30.0
        kw.update(file=_LineWriter(stream), mininterval=max(interval, 0.0), ncols=100,
                  dynamic_ncols=False)
    return tqdm(**kw)


class TokenProgress:
    """A bar over work items (``total`` of them: the ETA) that also counts generated tokens and
    shows their rate (``tok/s`` after the bar: all tokens so far over the time since the bar
    was made, compilation included).

    ``update(items, tokens)`` after each batch; ``close()`` at the end. Built by
    :meth:`create`, which returns None where no bar is drawn (see :func:`progress_bar`)."""

    def __init__(self, bar):
        self.bar = bar
        self.tokens = 0
        self._t0 = time.perf_counter()

    @classmethod
    def create(cls, total: int, *, desc: str, unit: str = "prompt",
               show: bool = True) -> "TokenProgress | None":
        """A TokenProgress over ``total`` items (``unit`` names them), or None when
        :func:`progress_bar` draws no bar (``show`` False, not process 0, or
        ``DROMEDARY_PROGRESS=0``)."""
        bar = progress_bar(total, desc=desc, unit=unit, show=show)
        return None if bar is None else cls(bar)

    def update(self, items: int, tokens: int = 0) -> None:
        """``items`` more done (prompts), having generated ``tokens`` tokens."""
        self.tokens += int(tokens)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(int(items))

    def tokens_per_s(self) -> float:
        """Tokens counted so far per second of wall time since the bar was made."""
        return self.tokens / max(time.perf_counter() - self._t0, 1e-9)

    def close(self) -> None:
        """Close the underlying tqdm bar."""
        self.bar.close()
