"""The runner: the stage registry and the one lifecycle every stage goes through.

:func:`run_stages` checks everything before anything runs (config values, every input file of
the selected stages, the model, the meshes, the workdir lock), then runs the selected stages in
registry order through :func:`run_stage`:

    complete the config -> build (or share) the resources -> check the required stages are done
    -> read the inputs once -> fingerprint -> skip when done under the same fingerprint / refuse
    another config -> open the folder -> Stage.run -> write the manifest

and writes ``<workdir>/report.md``. Stages implement :class:`dromedary_jax.pipeline.stage.Stage`;
adding one is a module in ``pipeline/stages/`` and a line in :data:`STAGES`.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from typing import Mapping

from dromedary_jax.errors import UserError, check_workdir
from dromedary_jax.jsonl import write_json_atomic
from dromedary_jax.memory import peak_rss_bytes, reset_peak_rss
from dromedary_jax.pipeline.defaults import complete
from dromedary_jax.pipeline.records import StageDir, stage_done
from dromedary_jax.pipeline.resources import Resources, check_model
from dromedary_jax.pipeline.stage import Stage, StageContext
from dromedary_jax.pipeline.stages.engrave import Engrave
from dromedary_jax.pipeline.stages.evaluate import Evaluate
from dromedary_jax.pipeline.stages.self_align import SelfAlign
from dromedary_jax.pipeline.stages.self_instruct import SelfInstruct
from dromedary_jax.pipeline.stages.verbose_clone import VerboseClone

# the registry: name -> stage, in the order a run goes through them
STAGES: dict[str, Stage] = {s.name: s for s in (
    SelfInstruct(), SelfAlign(), Engrave(), VerboseClone(), Evaluate())}
STATS_FILE = "run_stats.json"  # per stage: wall time and peak RSS of the run that did the work

log = logging.getLogger("dromedary_jax.run")


def select_stages(names, config=None) -> list[str]:
    """The stages to run, in registry order: ``names`` (checked: UserError naming ``--stages``
    for an unknown one), else every stage that is ``default_on`` for ``config`` (completed)."""
    if not names:
        return [n for n, s in STAGES.items() if config is None or s.default_on(config)]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    return [n for n in STAGES if n in names]


def required_manifests(stage: Stage, config, workdir: str) -> dict[str, Mapping]:
    """{stage: manifest} of the stages ``stage`` reads; UserError naming the one to run first."""
    out = {}
    for need in stage.requires(config):
        manifest = stage_done(workdir, need)
        if manifest is None:
            raise UserError(f"stage {stage.name} needs the output of stage {need}, which has not "
                            f"finished in {workdir}: run it first (--stages {need},{stage.name})")
        out[need] = manifest
    return out


def stage_dir(stage: Stage, config, workdir: str, hosts=None) -> tuple[StageDir, object]:
    """(the folder of ``stage`` under ``config`` (completed) with its fingerprint, the inputs it
    read); opens nothing. The required stages are checked first (UserError naming the one to
    run), then the inputs are read once."""
    upstream = required_manifests(stage, config, workdir)
    inputs = stage.read_inputs(config, workdir)
    kw = {} if hosts is None else {"hosts": hosts}
    folder = StageDir(workdir, stage.name, stage.fingerprint(config, inputs, upstream),
                      overwrite=config.overwrite, force=config.force, **kw)
    return folder, inputs


def run_stage(stage: Stage, config, workdir: str, resources: Resources | None = None) -> dict:
    """Run one stage through the lifecycle (see the module docstring); returns its manifest
    counts (a finished stage under the same config is skipped: its recorded counts)."""
    config = complete(config)
    res = resources or Resources(config, workdir=workdir)
    folder, inputs = stage_dir(stage, config, workdir, res.hosts)
    return _run_in(stage, config, workdir, res, folder, inputs)


def _run_in(stage: Stage, config, workdir: str, res: Resources, folder: StageDir, inputs) -> dict:
    """The rest of :func:`run_stage` once the folder is built and the inputs are read."""
    if folder.is_done():
        return folder.manifest()["counts"]
    folder.open()
    result = stage.run(StageContext(config, workdir, folder, res), inputs)
    folder.write_manifest(result.counts, result.outputs)
    return dict(result.counts)


def stage_status(config, workdir: str, name: str, folder: StageDir | None = None) -> str:
    """"done" (finished under this config: skipped), "changed" (finished under another config:
    refused unless config.overwrite/force), "resume" (started), or "run". ``config``: completed.
    ``folder``: the stage's :func:`stage_dir` when the caller has built it (its inputs are then
    not read again)."""
    if not workdir or not os.path.isdir(os.path.join(workdir, name)):
        return "run"
    if stage_done(workdir, name) is None:
        return "resume"
    if folder is None:
        try:
            folder = stage_dir(STAGES[name], config, workdir)[0]
        except (UserError, OSError):  # its inputs are missing: it cannot be skipped as done
            return "changed"
    return "done" if stage_done(workdir, name, folder.hash) is not None else "changed"


def check_order(config, workdir: str, selected: list[str]) -> None:
    """Each selected stage's required stages are finished already or selected before it."""
    for name in selected:
        for need in STAGES[name].requires(config):
            if need not in selected and stage_done(workdir, need) is None:
                hint = (" or set config.self_align.questions_file" if name == "self_align" else "")
                raise UserError(f"--stages {','.join(selected)}: stage {name} needs stage {need}, "
                                f"which has not finished in {workdir}; add it (--stages "
                                f"{need},{name}){hint}")


def check_inputs(config, workdir: str, selected: list[str], report: bool = True) -> None:
    """Read and check every input file the selected stages (and the report) will read, and the
    model, before any stage runs or anything is written: a bad file fails the run at once
    instead of after hours of generation. ``config``: completed."""
    for name in selected:
        STAGES[name].check(config, workdir)
    if report and int(config.report.num_samples) > 0 and "verbose_clone" in selected:
        from dromedary_jax.pipeline.data_files import load_red_team_seeds

        load_red_team_seeds(config.self_instruct.red_team_seeds)  # the report's questions
    check_model(config, selected)


def check_meshes(config, selected: list[str]) -> None:
    """``model.mesh`` (and, without it, the fine-tune sections' ``mesh.shape``) fit the devices
    of this run; UserError naming the key. Needs JAX (after ``distributed.maybe_initialize``)."""
    import jax

    from dromedary_jax.sharding import resolve_mesh_shape

    keys = [("model.mesh", config.model.mesh)] if config.model.mesh else [
        (f"{s}.train.mesh.shape", config[s].train.mesh.shape)
        for s in ("engrave", "verbose_clone") if s in selected]
    for key, shape in keys:
        try:
            resolve_mesh_shape(tuple(shape), jax.device_count())
        except UserError as e:
            raise UserError(f"config.{key}: {e}") from None


def run_stages(config, workdir: str, stages=None, resources=None, report: bool = True) -> dict[str, dict]:
    """Check everything (config values, input files, the model, the workdir lock), then run the
    selected stages (names; default ``config.stages``) in registry order and write the run
    report; returns {stage: manifest counts}. Errors: UserError (one line) for bad input."""
    from dromedary_jax.workdir_lock import workdir_lock

    check_workdir(workdir)
    config = complete(config)
    selected = select_stages(stages or list(config.stages), config)
    check_order(config, workdir, selected)
    check_inputs(config, workdir, selected, report)
    check_meshes(config, selected)
    resources = resources or Resources(config, workdir=workdir)
    with workdir_lock(workdir, resources.hosts.index):
        return _run_locked(config, workdir, selected, resources, report)


def _run_locked(config, workdir: str, selected: list[str], resources, report: bool) -> dict:
    main_host = resources.hosts.is_main  # only process 0 prints and logs
    if config.notice and main_host:
        print(f"NOTE: {config.notice}", flush=True)
    out = {}
    for name in selected:
        counts, was_done = _measured(name, workdir, main_host, lambda: _announce_and_run(
            STAGES[name], config, workdir, resources, main_host))
        log.info("stage %s: %s%s", name, "already done; " if was_done else "", counts)
        out[name] = counts
    if report and main_host:
        from dromedary_jax.pipeline.reports.run_report import write_report

        print(f"report: {write_report(config, workdir, resources)}")
        if "evaluate" in selected:
            from dromedary_jax.pipeline.reports.eval_table import table_lines
            from dromedary_jax.pipeline.stages.evaluate import read_results

            print("\n".join(["", "base vs aligned:"] + table_lines(read_results(workdir))))
    return out


def _announce_and_run(stage: Stage, config, workdir: str, resources, main_host: bool):
    """Build the stage's folder and read its inputs ONCE, print its status line (process 0),
    run it; returns (manifest counts, whether it was done already)."""
    folder, inputs = stage_dir(stage, config, workdir, resources.hosts)
    status = stage_status(config, workdir, stage.name, folder)
    if main_host:
        changed = ("done under a different config: " + ("starting it over (overwrite)" if config.overwrite
                   else "appending (force)" if config.force else "refused"))
        state = {"done": "already done, skipped", "changed": changed}.get(status, "running")
        print(f"== stage {stage.name}: {state}", flush=True)
    return _run_in(stage, config, workdir, resources, folder, inputs), status == "done"


def _measured(name: str, workdir: str, main_host: bool, run):
    """``run()`` -> (counts, was_done), with its wall time and peak resident memory (the
    stage's own peak: the high-water mark is reset first, see :mod:`dromedary_jax.memory`)
    written to ``<workdir>/<stage>/run_stats.json`` when the stage did work."""
    gc.collect()  # what earlier stages dropped does not count against this one
    per_stage = reset_peak_rss()
    t0 = time.perf_counter()
    counts, was_done = run()
    if not was_done and main_host and os.path.isdir(os.path.join(workdir, name)):
        write_json_atomic(os.path.join(workdir, name, STATS_FILE),
                          {"wall_s": round(time.perf_counter() - t0, 1),
                           "peak_rss_bytes": peak_rss_bytes(), "peak_is_per_stage": per_stage})
    return counts, was_done
