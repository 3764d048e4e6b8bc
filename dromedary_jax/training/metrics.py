"""Training metrics: ``metrics.jsonl`` (one JSON object per line, appended; always written) plus
optional scalar writers (TensorBoard, Weights & Biases, CLU, or one registered in-process), and
the per-device peak FLOP/s that MFU is measured against.

The JSONL file survives kills: a line cut short is dropped when the writer opens it again, and a
resumed run (``resume_step``) first drops the lines of steps after the checkpoint it restored, so
re-running those steps writes them once: the finished file equals an uninterrupted run's, apart
from the timing fields (:data:`TIMING_KEYS`). Only the writer on process 0 writes; the others are
silent.

Order: lines come in step order; within one step the train line comes before the eval line
(:func:`row_rank`). A write that would break the order is logged as a warning.

Writers (``metrics.writers`` in the fine-tune config, ``metrics.tensorboard`` for TensorBoard):
each is an object with ``write_scalars(step, {name: float})`` and ``close()`` (``flush()``
optional), made by a factory ``factory(workdir, run_config) -> writer`` registered under a name
with :func:`register_writer`. Built in: ``tensorboard`` (tensorboardX, ``<workdir>/tensorboard``),
``wandb`` (``wandb.init(dir=<workdir>)``; project etc. from the usual ``WANDB_*`` variables) and
``clu`` (``clu.metric_writers.create_default_writer(<workdir>/clu)``); wandb and clu are imported
only when asked for, and a missing package is a UserError naming the pip package. After a
resume, a writer receives the re-run steps again (TensorBoard shows the newest value; wandb keeps
the first, since its steps only go forward).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from typing import Callable, Iterable, Mapping, Protocol

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import AppendLog, read_log

log = logging.getLogger("dromedary_jax.training")

TIMING_KEYS = ("tokens_per_s", "mfu")  # measured wall-clock rates: differ from run to run


# ----------------------------------------------------------------------------- scalar writers
class ScalarWriter(Protocol):
    """Where training scalars go besides metrics.jsonl. ``flush()`` is optional."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record the finite float values of one metrics line (``{name: value}``) at ``step``
        (optimizer steps)."""

    def close(self) -> None:
        """Flush and release the writer; called once at the end of the run."""


WriterFactory = Callable[[str, Mapping], ScalarWriter]  # (workdir, run config as a dict)
_WRITERS: dict[str, WriterFactory] = {}
# pip package each built-in writer needs (checked before the run starts)
_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "wandb": ("wandb", "wandb"),
             "clu": ("clu", "clu")}


def register_writer(name: str, factory: WriterFactory) -> None:
    """Make ``name`` usable in ``metrics.writers``: ``factory(workdir, run_config)`` returns an
    object with ``write_scalars(step, dict)`` and ``close()``. Re-registering a name replaces
    it (e.g. a test's fake)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"writer name must be a plain non-empty string, got {name!r}")
    _WRITERS[name] = factory


def unregister_writer(name: str) -> None:
    """Forget a writer registered with :func:`register_writer` (a built-in one stays)."""
    if name not in _PACKAGES:
        _WRITERS.pop(name, None)


def writer_names() -> list[str]:
    """The names ``metrics.writers`` accepts."""
    return sorted(_WRITERS)


def writers_problem(names) -> str | None:
    """What is wrong with a ``metrics.writers`` value (a message), or None: each name must be
    registered and, for a built-in writer, its package installed."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or \
            not all(isinstance(n, str) for n in names):
        return (f"must be a tuple of writer names among {writer_names()}, e.g. \"('wandb',)\" "
                f"(got {names!r})")
    for n in names:
        if n not in _WRITERS:
            return (f"unknown writer {n!r}; use names among {writer_names()} (or register one "
                    f"with dromedary_jax.training.metrics.register_writer)")
        if n in _PACKAGES:
            module, pip_name = _PACKAGES[n]
            if importlib.util.find_spec(module) is None:
                return (f"the {n!r} writer needs the {pip_name} package, which is not "
                        f"installed (pip install {pip_name})")
    return None


def check_writers(names, where: str = "") -> tuple[str, ...]:
    """``names`` as a tuple, after :func:`writers_problem`; a problem raises
    ``UserError("<where>metrics.writers: ...")``."""
    msg = writers_problem(names)
    if msg:
        raise UserError(f"{where}metrics.writers: {msg}")
    return tuple(names)


def _import(name: str):
    """Import a built-in writer's package, or a UserError naming it."""
    module, pip_name = _PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"metrics.writers: the {name!r} writer needs the {pip_name} package "
                        f"({e}); pip install {pip_name}") from None


class _TensorBoard:
    def __init__(self, workdir: str, run_config: Mapping):
        self._w = _import("tensorboard").SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step, scalars):
        for k, v in scalars.items():
            self._w.add_scalar(k, v, global_step=int(step))

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


class _Wandb:  # not exercised by the tests (no wandb there); follows wandb's documented API
    def __init__(self, workdir: str, run_config: Mapping):
        wandb = _import("wandb")
        self._run = wandb.init(dir=workdir, config=dict(run_config or {}), resume="allow",
                               id=_wandb_run_id(workdir))

    def write_scalars(self, step, scalars):
        self._run.log(dict(scalars), step=int(step))

    def close(self):
        self._run.finish()


def _wandb_run_id(workdir: str) -> str:
    """One wandb run id per workdir (kept in ``<workdir>/wandb_run_id``), so a resumed run
    continues the same wandb run."""
    from dromedary_jax.jsonl import write_text_atomic

    path = os.path.join(workdir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rid = f.read().strip()
        if rid:
            return rid
    import uuid

    rid = uuid.uuid4().hex[:16]
    os.makedirs(workdir, exist_ok=True)
    write_text_atomic(path, rid + "\n")
    return rid


class _Clu:  # not exercised by the tests (no clu there); follows clu.metric_writers' API
    def __init__(self, workdir: str, run_config: Mapping):
        _import("clu")
        from clu import metric_writers

        self._w = metric_writers.create_default_writer(os.path.join(workdir, "clu"))

    def write_scalars(self, step, scalars):
        self._w.write_scalars(int(step), dict(scalars))

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


register_writer("tensorboard", _TensorBoard)
register_writer("wandb", _Wandb)
register_writer("clu", _Clu)


# ----------------------------------------------------------------------------- peak FLOP/s
# Dense bf16 peak FLOP/s of ONE JAX device (MFU = achieved / (peak x devices)), matched against
# ``jax.devices()[0].device_kind`` (lower-cased) in order; the first pattern that matches wins.
# TPU v2/v3 show each TensorCore as a device (2 per chip): the chip's number is halved. v4 and
# later show one device per chip (megacore or a single core). NVIDIA data sheets quote "with
# sparsity" numbers: the dense peak is half of those.
PEAK_FLOPS: tuple[tuple[str, float, str], ...] = (
    # (regex on device_kind, FLOP/s per device, source)
    (r"^tpu v2\b", 45e12 / 2, "Cloud TPU system architecture docs: v2 45 TFLOP/s/chip, 2 cores"),
    (r"^tpu v3\b", 123e12 / 2, "cloud.google.com/tpu/docs/v3: 123 TFLOP/s per chip, 2 cores"),
    (r"^tpu v4\b(?! ?lite)", 275e12, "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip"),
    (r"^tpu v5 ?(lite|e)\b", 197e12, "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip"),
    (r"^tpu v5p?\b(?! ?lite)", 459e12, "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip"),
    (r"^tpu v6 ?(lite|e)\b", 918e12, "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip"),
    (r"\ba100\b", 312e12, "NVIDIA A100 data sheet: BF16 312 TFLOP/s (624 sparse), SXM = PCIe"),
    (r"\bh100\b.*\bpcie\b", 756e12, "NVIDIA H100 data sheet: PCIe BF16 1,513 TFLOP/s sparse"),
    (r"\bh100\b.*\bnvl\b", 835e12, "NVIDIA H100 data sheet: NVL BF16 1,671 TFLOP/s sparse"),
    (r"\bh100\b", 989e12, "NVIDIA H100 data sheet: SXM BF16 1,979 TFLOP/s sparse"),
    (r"\bh200\b.*\bnvl\b", 835e12, "NVIDIA H200 data sheet: NVL BF16 1,671 TFLOP/s sparse"),
    (r"\bh200\b", 989e12, "NVIDIA H200 data sheet: SXM BF16 1,979 TFLOP/s sparse"),
    (r"\bgh200\b", 989e12, "NVIDIA GH200 data sheet: BF16 1,979 TFLOP/s sparse"),
    (r"\bb200\b", 2.25e15, "NVIDIA HGX B200 spec: BF16 4.5 PFLOP/s sparse per GPU"),
    (r"\bl40s\b", 362e12, "NVIDIA L40S data sheet: BF16 tensor 362 TFLOP/s (733 sparse)"),
    (r"\bl4\b", 121e12, "NVIDIA L4 data sheet: BF16 tensor 242 TFLOP/s sparse"),
    (r"\ba10\b", 125e12, "NVIDIA A10 data sheet: BF16 tensor 125 TFLOP/s (250 sparse)"),
)


def peak_flops_for(device_kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of one JAX device of this ``device_kind`` (as
    ``jax.devices()[0].device_kind`` spells it, e.g. "TPU v4", "TPU v5 lite", "NVIDIA H100 80GB
    HBM3"), or None when unknown (CPU, older GPUs)."""
    kind = str(device_kind).strip().lower()
    for pattern, flops, _source in PEAK_FLOPS:
        if re.search(pattern, kind):
            return flops
    return None


def resolve_peak_flops(configured: float, device_kind: str) -> tuple[float | None, str]:
    """(per-device peak FLOP/s for MFU or None, a one-line note saying where it came from or why
    MFU is not reported). ``configured``: ``metrics.peak_flops`` (> 0 wins; 0: look it up)."""
    if configured and float(configured) > 0:
        return float(configured), (f"MFU against metrics.peak_flops={float(configured):.4g} "
                                   f"FLOP/s per device")
    peak = peak_flops_for(device_kind)
    if peak is None:
        return None, (f"MFU is not reported: no peak FLOP/s is known for device kind "
                      f"{device_kind!r}; set metrics.peak_flops to one device's peak FLOP/s "
                      f"(e.g. --config.metrics.peak_flops=275e12 for a TPU v4 chip) to report it")
    return peak, f"MFU against {peak / 1e12:g} TFLOP/s per device (bf16 peak of {device_kind})"


# ----------------------------------------------------------------------------- the writer
def row_rank(row: Mapping) -> int:
    """Order of the lines of one step: 0 the train line, 1 the eval line (``eval_*`` keys)."""
    return 1 if any(str(k).startswith("eval_") for k in row if k != "step") else 0


class MetricsWriter:
    """metrics.jsonl plus the chosen scalar writers, on process 0 (``enabled``); see the module
    docstring for the file's guarantees and the writers."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0, writers: Iterable[str] = (),
                 run_config: Mapping | None = None):
        """``resume_step``: the step the run restored (0: a fresh start); lines of later steps
        are dropped, since this run writes them again. ``tensorboard`` and ``writers`` (names,
        see :func:`register_writer`) choose the scalar writers besides metrics.jsonl;
        ``run_config``: the run's config as a dict, handed to each writer's factory (wandb
        records it). Unknown names / missing packages raise UserError."""
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        names = list(dict.fromkeys((["tensorboard"] if tensorboard else [])
                                   + list(check_writers(tuple(writers)))))
        self._sinks: list = []
        self._log = None
        self._last: tuple[int, int] | None = None
        self._warned = False
        if enabled:
            self._log = AppendLog(self.jsonl_path,
                                  keep=lambda r: int(r.get("step", 0)) <= resume_step)
            try:
                for n in names:
                    self._sinks.append(_WRITERS[n](workdir, dict(run_config or {})))
            except BaseException:
                self.close()
                raise

    def write(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        """Write one line ``{"step": step, prefix + name: value}`` (see :meth:`write_many`)."""
        self.write_many([(step, values)], prefix)

    def write_many(self, rows, prefix: str = "") -> None:
        """``rows``: (step, {name: value}) pairs, written in one flushed append, in step order
        (and within a step, the train line before the eval line)."""
        if not self.enabled:
            return
        lines = []
        for step, values in rows:
            clean = {}
            for k, v in values.items():
                v = float(v)
                clean[prefix + k] = v if math.isfinite(v) else str(v)
            lines.append({"step": int(step), **clean})
        lines.sort(key=lambda r: (r["step"], row_rank(r)))  # stable: same-rank lines keep order
        if lines and self._last is not None and \
                (lines[0]["step"], row_rank(lines[0])) < self._last and not self._warned:
            self._warned = True
            log.warning("metrics.jsonl: a line of step %d is written after step %d",
                        lines[0]["step"], self._last[0])
        if lines:
            self._last = max(self._last or (-1, 0), (lines[-1]["step"], row_rank(lines[-1])))
        self._log.write_many(lines)
        for line in lines:
            scalars = {k: v for k, v in line.items() if k != "step" and isinstance(v, float)}
            if scalars:
                for sink in self._sinks:
                    sink.write_scalars(line["step"], scalars)

    def sync(self) -> None:
        """Everything written so far reaches the disk (before a checkpoint is saved)."""
        if self._log is not None:
            self._log.sync()
        self.flush()

    def flush(self) -> None:
        """Flush every scalar writer that has a ``flush()`` (metrics.jsonl is flushed on each
        write)."""
        for sink in self._sinks:
            if hasattr(sink, "flush"):
                sink.flush()

    def close(self) -> None:
        """Close metrics.jsonl and every scalar writer (idempotent)."""
        if self._log is not None:
            self._log.close()
            self._log = None
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


def read_metrics(path: str) -> list[dict]:
    """The lines of a metrics.jsonl, in order (a line cut short by a kill is skipped; a corrupt
    line elsewhere is a UserError naming the file and line)."""
    return read_log(path)


def without_timing(rows: list[dict]) -> list[dict]:
    """``rows`` without the wall-clock fields (to compare two runs' metrics)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
