"""The Stage protocol: what one step of the method provides so that the runner
(:mod:`dromedary_jax.pipeline.runner`) can own its lifecycle.

A stage is an object with a ``name`` and five methods; the runner calls them in this order::

    check(config, workdir)                 before ANY stage runs: read and check the stage's own
                                           input files (templates, prompts, benchmark files)
    requires(config) -> names              the earlier stages whose outputs it reads
    read_inputs(config, workdir) -> inputs read its inputs once (an upstream's records, ...)
    fingerprint(config, inputs, upstream)  what changes its results -> the folder's config hash
    run(ctx, inputs) -> StageResult        the work: records into ``ctx.dir``, counts, outputs

and, between the last two, skips the stage when ``<workdir>/<name>/manifest.json`` says it is
done under the same fingerprint, refuses a folder written under another config (unless
``config.overwrite`` / ``config.force``), and after ``run`` writes the manifest. ``default_on``
says whether a run without ``--stages`` includes it. A new stage is one module in
``pipeline/stages/`` and one line in the registry (:data:`dromedary_jax.pipeline.runner.STAGES`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

from dromedary_jax.pipeline.records import StageDir


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What ``Stage.run`` works with: the completed ``config``, the run's ``workdir``, the stage's
    opened folder ``dir`` (shards, derived files) and the run's shared ``resources``
    (:class:`dromedary_jax.pipeline.resources.Resources`: model, tokenizer, generator, hosts)."""

    config: Any
    workdir: str
    dir: StageDir
    resources: Any

    @property
    def hosts(self):
        """This process's place among the hosts (:class:`dromedary_jax.distributed.Hosts`)."""
        return self.dir.hosts


@dataclasses.dataclass(frozen=True)
class StageResult:
    """A finished stage: ``counts`` (the manifest's summary numbers, JSON-able) and ``outputs``
    ({name: path} of the files it derived)."""

    counts: Mapping[str, Any]
    outputs: Mapping[str, str]


class Stage(Protocol):
    """One step of the method (see the module docstring for the order of calls)."""

    name: str

    def default_on(self, config) -> bool:
        """Whether a run without ``--stages`` includes this stage (``config``: completed)."""

    def requires(self, config) -> Sequence[str]:
        """The stages whose outputs this one reads under ``config`` (each must be finished)."""

    def check(self, config, workdir: str) -> None:
        """Read and check this stage's own input files; UserError naming the config key."""

    def read_inputs(self, config, workdir: str) -> Any:
        """Everything the stage reads, read once (passed to ``fingerprint`` and ``run``)."""

    def fingerprint(self, config, inputs: Any, upstream: Mapping[str, Mapping]) -> dict:
        """What changes this stage's results (``upstream``: {stage: manifest} of ``requires``)."""

    def run(self, ctx: StageContext, inputs: Any) -> StageResult:
        """Do the work into ``ctx.dir``; return the counts and outputs for the manifest."""


class DefaultStage:
    """Defaults for a :class:`Stage` implementation: part of every full run, requires no
    earlier stage, no own input files to check. A stage class inherits it and overrides what
    differs."""

    def default_on(self, config) -> bool:
        """Always part of a full run."""
        return True

    def requires(self, config) -> tuple[str, ...]:
        """No earlier stage."""
        return ()

    def check(self, config, workdir: str) -> None:
        """Nothing of its own to check."""
