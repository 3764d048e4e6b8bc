"""Multi-process start-up: ``jax.distributed.initialize`` from config or environment.

* TPU pods: every worker runs the same command; ``initialize()`` needs no arguments
  (set ``DROMEDARY_DISTRIBUTED=auto`` or ``config.distributed.enabled = "auto"``).
* Local multi-process runs (several processes on one machine, e.g. tests with fake CPU devices):
  pass the coordinator address, the process count and this process's id, through config
  (``config.distributed.coordinator/num_processes/process_id``) or environment
  (``DROMEDARY_COORDINATOR``, ``DROMEDARY_NUM_PROCESSES``, ``DROMEDARY_PROCESS_ID``). On CPU the
  gloo collectives are switched on.

Call :func:`maybe_initialize` before any other JAX call that touches devices.

:class:`Hosts` is the pipeline's view of the processes: this one's index and count, a barrier and
an all-process max (the one home of the multi-host helpers the stages use).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from dromedary_jax.errors import UserError

_ENV = {
    "enabled": "DROMEDARY_DISTRIBUTED",
    "coordinator": "DROMEDARY_COORDINATOR",
    "num_processes": "DROMEDARY_NUM_PROCESSES",
    "process_id": "DROMEDARY_PROCESS_ID",
}


def settings(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``config`` (e.g. ``config.distributed``) over the environment."""
    out: dict[str, Any] = {k: os.environ.get(v) for k, v in _ENV.items()}
    for k, v in dict(config or {}).items():
        if v not in (None, "") and not (k in ("num_processes", "process_id") and int(v) < 0) \
                and not (k == "num_processes" and int(v) == 0):
            out[k] = v
    return out


def maybe_initialize(config: Mapping[str, Any] | None = None) -> bool:
    """Initialise jax.distributed if asked to; returns True when this is a multi-process run."""
    import jax

    s = settings(config)
    enabled = str(s.get("enabled") or "").lower()
    if s.get("coordinator") and enabled in ("", "none", "auto", "1", "true"):
        enabled = "explicit"
    if enabled in ("", "0", "false", "none", "off"):
        return False
    if _already_initialized():
        return jax.process_count() > 1
    if enabled in ("auto", "1", "true"):
        jax.distributed.initialize()
        return jax.process_count() > 1
    try:
        num = int(s["num_processes"])
        pid = int(s["process_id"])
    except (TypeError, KeyError, ValueError):
        raise UserError("distributed: a coordinator address needs num_processes and process_id "
                        "(config.distributed.* or DROMEDARY_NUM_PROCESSES / DROMEDARY_PROCESS_ID)"
                        ) from None
    if not 0 <= pid < num:
        raise UserError(f"distributed: process_id={pid} is not in [0, {num})")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=str(s["coordinator"]), num_processes=num,
                               process_id=pid)
    return num > 1


def _already_initialized() -> bool:
    try:
        from jax._src import distributed as _d

        return _d.global_state.client is not None
    except Exception:  # private API moved: assume not initialised
        return False


def is_main_process() -> bool:
    """True on process 0: the one that logs, draws progress bars and writes manifests."""
    import jax

    return jax.process_index() == 0


def allgather_texts(texts: list[str]) -> list[list[str]]:
    """Every process's list of strings, on every process: ``result[p]`` is process p's list
    (the lists may differ in length). One process: ``[texts]``. Sent as UTF-8 bytes through
    ``process_allgather``, so it works wherever the device collectives do (gloo on CPU)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return [list(texts)]
    from jax.experimental import multihost_utils

    enc = [t.encode("utf-8") for t in texts]
    sizes = multihost_utils.process_allgather(
        np.asarray([len(enc), max((len(e) for e in enc), default=0)], np.int64))  # [P, 2]
    rows, width = max(int(sizes[:, 0].max()), 1), max(int(sizes[:, 1].max()), 1)
    buf = np.zeros((rows, width), np.uint8)
    lens = np.zeros((rows,), np.int64)
    for i, e in enumerate(enc):
        buf[i, :len(e)] = np.frombuffer(e, np.uint8)
        lens[i] = len(e)
    all_buf = multihost_utils.process_allgather(buf)  # [P, rows, width]
    all_lens = multihost_utils.process_allgather(lens)
    return [[bytes(all_buf[p, i, :all_lens[p, i]]).decode("utf-8") for i in range(int(n))]
            for p, n in enumerate(sizes[:, 0])]


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This process's place among the hosts and a barrier across them."""

    index: int = 0
    count: int = 1
    barrier: Callable[[str], None] = lambda name: None
    # max of a host integer over all hosts (so every host makes the same number of collective calls)
    allmax: Callable[[int], int] = lambda x: int(x)

    def share(self, items: list) -> list:
        """This host's share of a list (every ``count``-th item from ``index``)."""
        return items[self.index::self.count]

    @property
    def is_main(self) -> bool:
        """True on process 0 (the one that prints and writes shared files)."""
        return self.index == 0

    @classmethod
    def from_jax(cls) -> "Hosts":
        """The hosts as JAX sees them (``jax.process_index()`` / ``process_count()``): one
        process gets no-op collectives; several get a ``sync_global_devices`` barrier and a
        ``process_allgather`` max (every process must make the same calls)."""
        import jax

        count = jax.process_count()
        if count == 1:
            return cls(0, 1)

        def barrier(name: str) -> None:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

        def allmax(x: int) -> int:
            import numpy as np
            from jax.experimental import multihost_utils

            return int(np.max(multihost_utils.process_allgather(np.asarray(int(x), np.int64))))

        return cls(jax.process_index(), count, barrier, allmax)
