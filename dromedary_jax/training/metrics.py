"""Training metrics to ``metrics.jsonl`` (one JSON object per line, appended) and TensorBoard
event files (tensorboardX, no TensorFlow).

The JSONL file survives kills: a line cut short is dropped when the writer opens it again, and a
resumed run (``resume_step``) first drops the lines of steps after the checkpoint it restored, so
re-running those steps writes them once: the finished file equals an uninterrupted run's, apart
from the timing fields (:data:`TIMING_KEYS`). Only the writer on process 0 writes; the others are
silent.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

from dromedary_jax.jsonl import AppendLog, read_log

TIMING_KEYS = ("tokens_per_s", "mfu")  # measured wall-clock rates: differ from run to run


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0):
        """``resume_step``: the step the run restored (0: a fresh start); lines of later steps
        are dropped, since this run writes them again."""
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self._tb = None
        self._log = None
        if enabled:
            self._log = AppendLog(self.jsonl_path,
                                  keep=lambda r: int(r.get("step", 0)) <= resume_step)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(logdir=self.tensorboard_dir)

    def write(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        self.write_many([(step, values)], prefix)

    def write_many(self, rows, prefix: str = "") -> None:
        """``rows``: (step, {name: value}) pairs, written in one flushed append."""
        if not self.enabled:
            return
        lines = []
        for step, values in rows:
            clean = {}
            for k, v in values.items():
                v = float(v)
                clean[prefix + k] = v if math.isfinite(v) else str(v)
            lines.append({"step": int(step), **clean})
            if self._tb is not None:
                for k, v in clean.items():
                    if isinstance(v, float):
                        self._tb.add_scalar(k, v, global_step=int(step))
        self._log.write_many(lines)

    def sync(self) -> None:
        """Everything written so far reaches the disk (before a checkpoint is saved)."""
        if self._log is not None:
            self._log.sync()
        if self._tb is not None:
            self._tb.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> list[dict]:
    """The lines of a metrics.jsonl, in order (a line cut short by a kill is skipped; a corrupt
    line elsewhere is a UserError naming the file and line)."""
    return read_log(path)


def without_timing(rows: list[dict]) -> list[dict]:
    """``rows`` without the wall-clock fields (to compare two runs' metrics)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
