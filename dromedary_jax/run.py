"""Run the SELF-ALIGN stages in order.

    python -m dromedary_jax.run --config configs/demo.py --workdir /tmp/run \\
        [--stages self_instruct,self_align,engrave,verbose_clone,evaluate] [--config.x=y ...] \\
        [--dry_run [--devices 128]]

Flags are absl's (``--name value`` or ``--name=value``; ``--dry_run`` / ``--nodry_run``); any
config value is overridden with ``--config.<section>.<key>=value``, e.g. the device mesh
(``data,fsdp,tensor``, one -1): ``--config.model.mesh=1,-1,4``.

A finished stage is skipped, an interrupted one resumes; at the end ``<workdir>/report.md``
summarises the run. ``--dry_run`` prints the resolved config, the mesh, parameter and
per-device memory estimates and the stage plan, and runs nothing; ``--devices N`` plans it for
N devices (another machine) instead of the devices visible here.

Before any stage runs (and before ``--dry_run`` prints its plan): every config value is checked
(``pipeline.defaults.validate``), every input file of the selected stages is read and checked
(:func:`check_inputs`), the model checkpoint / tokenizer must exist, and the workdir is locked
(``workdir_lock``: a second run on it refuses at once; a killed run leaves no stale lock). So bad
input costs one ``error:`` line (exit 2) and writes nothing a fixed rerun trips over. Ctrl-C /
SIGTERM print one ``interrupted`` line (exit 130 / 143); the same command resumes.
``main(argv)`` can be called in-process (``main(["run", "--config", ...])``).

Stages come from the ``STAGES`` registry (name -> "module:function"), run in registry order; a
stage whose manifest says it is done under the same config is skipped. Every stage has the
signature ``run(config, workdir, resources=None)``; one ``Resources`` (lazily built model /
generator, host layout) is shared by the stages of a run.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from dromedary_jax.errors import UserError, absl_cli_flags, check_workdir, cli_main

STAGES: dict[str, str] = {
    "self_instruct": "dromedary_jax.pipeline.self_instruct:run",
    "self_align": "dromedary_jax.pipeline.self_align:run",
    "engrave": "dromedary_jax.pipeline.engrave:run",
    "verbose_clone": "dromedary_jax.pipeline.verbose_clone:run",
    "evaluate": "dromedary_jax.pipeline.evaluate:run",
}
# stage -> the stage whose output it reads
REQUIRES = {"self_align": "self_instruct", "engrave": "self_align", "verbose_clone": "engrave",
            "evaluate": "verbose_clone"}
# stages a run includes by default only when the config asks for them
OPT_IN = {"evaluate": lambda config: bool(config.evaluate.truthfulqa or config.evaluate.hhh)}

log = logging.getLogger("dromedary_jax.run")


def stage_fn(name: str):
    module, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def select_stages(names, config=None) -> list[str]:
    """The stages to run, in registry order: ``names`` (checked), else every stage (an
    :data:`OPT_IN` stage only when ``config``, a completed config, asks for it)."""
    if not names:
        return [n for n in STAGES
                if n not in OPT_IN or (config is not None and OPT_IN[n](config))]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    return [n for n in STAGES if n in names]


def stage_status(config, workdir: str, name: str) -> str:
    """"done" (finished under this config: skipped), "changed" (finished under another config:
    refused unless config.overwrite/force), "resume" (started), or "run". ``config``: completed."""
    from dromedary_jax.pipeline.records import stage_done

    if not workdir or not os.path.isdir(os.path.join(workdir, name)):
        return "run"
    if stage_done(workdir, name) is None:
        return "resume"
    module = importlib.import_module(STAGES[name].split(":")[0])
    try:
        expected = module.stage_dir(config, workdir).hash
    except (UserError, OSError):  # its inputs are missing: it cannot be skipped as done
        return "changed"
    return "done" if stage_done(workdir, name, expected) is not None else "changed"


def check_order(config, workdir: str, selected: list[str]) -> None:
    """Each selected stage's input stage must be finished already or selected before it."""
    from dromedary_jax.pipeline.records import stage_done

    for name in selected:
        need = REQUIRES.get(name)
        if name == "self_align" and config.self_align.questions_file:
            need = None  # reads its questions from a file instead
        if need and need not in selected and stage_done(workdir, need) is None:
            raise UserError(f"--stages {','.join(selected)}: stage {name} needs stage {need}, which "
                            f"has not finished in {workdir}; add it (--stages {need},{name})"
                            + (" or set config.self_align.questions_file" if name == "self_align" else ""))


def check_inputs(config, workdir: str, selected: list[str], report: bool = True) -> None:
    """Read and check every input file the selected stages (and the report) will read, and the
    model, before any stage runs or anything is written: a bad file fails the run at once
    instead of after hours of generation. ``config``: completed."""
    from dromedary_jax.pipeline import data as D
    from dromedary_jax.pipeline.records import stage_done

    si, sa = config.self_instruct, config.self_align
    if "self_instruct" in selected:
        D.load_red_team_seeds(si.red_team_seeds)
        D.Template.load(si.topic_template, "self_instruct.topic_template",
                        ("question_type", "num_topics"))
        D.Template.load(si.question_template, "self_instruct.question_template",
                        ("hints", "examples", "num"))
        D.Template.load(si.vanilla_template, "self_instruct.vanilla_template", ("num_tasks",))
        tasks = D.load_seed_tasks(si.seed_tasks)
        if si.vanilla.enabled and si.vanilla.prompt_seed_tasks > len(tasks):
            raise UserError(f"config.self_instruct.vanilla.prompt_seed_tasks="
                            f"{si.vanilla.prompt_seed_tasks} but {si.seed_tasks} has only "
                            f"{len(tasks)} tasks")
    if "self_align" in selected:
        from dromedary_jax.pipeline.self_align import render_prompt

        render_prompt(config)  # assistant, principles, exemplars, frame template / prompt file
        prompts = os.path.join(workdir or "", "self_instruct", "prompts.jsonl")
        if sa.questions_file:
            D.load_questions(sa.questions_file, "self_align.questions_file")
        elif workdir and stage_done(workdir, "self_instruct") and os.path.isfile(prompts):
            D.load_questions(prompts, "self_align.questions_file")  # stage 1 kept none: refuse now
    if "engrave" in selected:
        from dromedary_jax.pipeline.engrave import template_of

        template_of(config)
    if "verbose_clone" in selected:
        from dromedary_jax.pipeline.verbose_clone import meta_prompts

        meta_prompts(config)
    if report and int(config.report.num_samples) > 0 and "verbose_clone" in selected:
        D.load_red_team_seeds(si.red_team_seeds)  # the report's before/after questions
    if "evaluate" in selected:
        from dromedary_jax.pipeline.evaluate import check_models, load_benchmarks, sample_prompts

        check_models(config)
        load_benchmarks(config)  # the benchmark files are there and well-formed
        sample_prompts(config)
    check_model(config, selected)


def check_model(config, selected: list[str]) -> None:
    """The model the selected stages load is there: the checkpoint folder (or .gguf file) and
    the tokenizer path exist, or the preset is known (no weights are read)."""
    from dromedary_jax.pipeline.resources import check_checkpoint, model_kind, real_model_kind

    m = config.model
    if model_kind(m) == "scripted" and not {"engrave", "verbose_clone"} & set(selected):
        return  # stages 1-2 with the scripted fake: no model
    kind = real_model_kind(m)
    if kind == "checkpoint":
        check_checkpoint(m)
    elif kind == "preset":
        from dromedary_jax.model.config import preset

        try:
            preset(m.preset)
        except UserError as e:
            raise UserError(f"config.model.preset: {e}") from None
        if not m.tokenizer:
            raise UserError("config.model.tokenizer: a randomly initialised preset needs a "
                            "tokenizer path (or 'builtin:demo' for a tiny tokenizer trained on "
                            "data/)")
    if m.tokenizer and m.tokenizer != "builtin:demo" and not os.path.exists(m.tokenizer):
        raise UserError(f"config.model.tokenizer={m.tokenizer}: does not exist")
    trained = [s for s in ("engrave", "verbose_clone") if s in selected]
    if trained:
        from dromedary_jax.pipeline.plan import model_config_of

        mc, origin = model_config_of(m)  # the preset or the checkpoint's json: no weights
        for s in trained if mc is not None and "not readable" not in origin else ():
            max_len = int(config[s].train.data.max_len)
            if max_len > mc.max_seq_len:
                raise UserError(f"config.{s}.train.data.max_len={max_len} is over the model's "
                                f"maximum sequence length {mc.max_seq_len}; lower it")


def check_meshes(config, selected: list[str]) -> None:
    """``model.mesh`` (and, without it, the fine-tune sections' ``mesh.shape``) fit the devices
    of this run. Needs JAX (after ``distributed.maybe_initialize``)."""
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
    selected stages in registry order and write the run report; returns {stage: manifest
    counts}."""
    from dromedary_jax.pipeline.defaults import complete
    from dromedary_jax.pipeline.resources import Resources
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
        status = stage_status(config, workdir, name)
        was_done = status == "done"
        if main_host:
            changed = ("done under a different config: " + ("starting it over (overwrite)" if config.overwrite
                       else "appending (force)" if config.force else "refused"))
            state = {"done": "already done, skipped", "changed": changed}.get(status, "running")
            print(f"== stage {name}: {state}", flush=True)
        counts = _measured(name, was_done, workdir, main_host,
                           lambda: stage_fn(name)(config, workdir, resources=resources))
        log.info("stage %s: %s%s", name, "already done; " if was_done else "", counts)
        out[name] = counts
    if report and main_host:
        from dromedary_jax.pipeline.run_report import write_report

        print(f"report: {write_report(config, workdir, resources)}")
        if "evaluate" in selected:
            from dromedary_jax.pipeline.eval_report import table_lines
            from dromedary_jax.pipeline.evaluate import read_results

            print("\n".join(["", "base vs aligned:"] + table_lines(read_results(workdir))))
    return out


STATS_FILE = "run_stats.json"  # per stage: wall time and peak RSS of the run that did the work


def _measured(name: str, was_done: bool, workdir: str, main_host: bool, run):
    """``run()``, with its wall time and peak resident memory (the stage's own peak: the
    high-water mark is reset first, see :mod:`dromedary_jax.memory`) written to
    ``<workdir>/<stage>/run_stats.json`` when the stage did work."""
    import gc
    import time

    from dromedary_jax.jsonl import write_json_atomic
    from dromedary_jax.memory import peak_rss_bytes, reset_peak_rss

    gc.collect()  # what earlier stages dropped does not count against this one
    per_stage = reset_peak_rss()
    t0 = time.perf_counter()
    counts = run()
    if not was_done and main_host and os.path.isdir(os.path.join(workdir, name)):
        write_json_atomic(os.path.join(workdir, name, STATS_FILE),
                          {"wall_s": round(time.perf_counter() - t0, 1),
                           "peak_rss_bytes": peak_rss_bytes(), "peak_is_per_stage": per_stage})
    return counts


def dry_run(config, workdir: str | None, stages, devices: int = 0) -> None:
    """``--dry_run``: the same checks as a run (config values, input files, the model), then the
    plan. With ``--devices N`` (planning for another machine) a model that is not on THIS
    machine is a printed note, not an error."""
    from dromedary_jax.pipeline.defaults import complete
    from dromedary_jax.pipeline.plan import print_dry_run

    if workdir:
        check_workdir(workdir)
    full = complete(config)
    selected = select_stages(stages or list(full.stages), full)
    note = None
    try:
        check_inputs(full, workdir or "", selected)
    except UserError as e:
        if not devices or not str(e).startswith(("config.model.checkpoint",
                                                  "config.model.tokenizer")):
            raise
        note = f"{e} (here; the machine that runs it needs it)"
    print_dry_run(config, workdir, selected, devices)
    if note:
        print(f"== note: {note}")


@cli_main
def main(argv=None) -> None:
    """Run the runner CLI with ``argv`` (program name first; default ``sys.argv``)."""
    fv = absl_cli_flags(list(sys.argv if argv is None else argv), _define_flags, cli="run",
                        usage=__doc__)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / jax chatter; ours stays INFO
    config = fv.config
    if config is None:
        raise UserError("--config is required (an ml_collections config file, e.g. configs/demo.py)")
    if fv.dry_run:
        dry_run(config, fv.workdir, fv.stages, fv.devices)
        return
    from dromedary_jax.pipeline.defaults import complete

    check_workdir(fv.workdir)
    full = complete(config)  # every value checked before JAX (or the coordinator) starts
    check_inputs(full, fv.workdir, select_stages(fv.stages or list(full.stages), full))
    from dromedary_jax.distributed import maybe_initialize

    maybe_initialize(full.distributed.to_dict())
    import jax

    if jax.process_index() != 0:  # logs and progress bars only on process 0
        logging.getLogger("dromedary_jax").setLevel(logging.WARNING)
    results = run_stages(config, fv.workdir, fv.stages)
    if jax.process_index() != 0:
        return
    for name, counts in results.items():
        short = {k: v for k, v in counts.items() if not isinstance(v, dict)}
        print(f"{name}: {short or ', '.join(counts) + ' (see the table above)'}")


def _define_flags(fv, argv) -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (path.py or path.py:arg)",
                                    lock_config=True, flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "output folder (one subfolder per stage)", flag_values=fv)
    flags.DEFINE_list("stages", None, f"comma-separated stages to run (default: all of "
                      f"{list(STAGES)})", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "print the resolved config, mesh, memory estimates and stage "
                      "plan; run nothing", flag_values=fv)
    flags.DEFINE_integer("devices", 0, "with --dry_run: plan the mesh for this many devices "
                         "(default: the devices visible here)", flag_values=fv)


@cli_main
def _entry() -> None:
    from absl import flags
    from absl import logging as absl_logging

    rest = flags.FLAGS(sys.argv, known_only=True)  # absl's own flags (--verbosity, ...)
    absl_logging.use_absl_handler()
    logging.getLogger("dromedary_jax").setLevel(logging.INFO)
    main(rest)


if __name__ == "__main__":
    _entry()
