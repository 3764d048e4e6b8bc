"""Run the SELF-ALIGN stages in order.

    python -m dromedary_jax.run --config configs/demo.py --workdir /tmp/run \\
        [--stages self_instruct,self_align,engrave,verbose_clone] [--config.x=y ...] [--dry_run]

A finished stage is skipped, an interrupted one resumes; at the end ``<workdir>/report.md``
summarises the run. ``--dry_run`` prints the resolved config, the mesh, parameter and
per-device memory estimates and the stage plan, and runs nothing.

Stages come from the ``STAGES`` registry (name -> "module:function"), run in registry order; a
stage whose manifest says it is done under the same config is skipped. Every stage has the
signature ``run(config, workdir, resources=None)``; one ``Resources`` (lazily built model /
generator, host layout) is shared by the stages of a run.
"""
from __future__ import annotations

import importlib
import logging
import sys

from dromedary_jax.errors import UserError, check_workdir, cli_main, parse_flags

STAGES: dict[str, str] = {
    "self_instruct": "dromedary_jax.pipeline.self_instruct:run",
    "self_align": "dromedary_jax.pipeline.self_align:run",
    "engrave": "dromedary_jax.pipeline.engrave:run",
    "verbose_clone": "dromedary_jax.pipeline.verbose_clone:run",
}
# stage -> the stage whose output it reads
REQUIRES = {"self_align": "self_instruct", "engrave": "self_align", "verbose_clone": "engrave"}

log = logging.getLogger("dromedary_jax.run")


def stage_fn(name: str):
    module, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def select_stages(names) -> list[str]:
    if not names:
        return list(STAGES)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    return [n for n in STAGES if n in names]


def stage_status(config, workdir: str, name: str) -> str:
    """"done" (finished under this config: skipped), "changed" (finished under another config:
    refused unless config.overwrite/force), "resume" (started), or "run". ``config``: completed."""
    import os

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


def run_stages(config, workdir: str, stages=None, resources=None, report: bool = True) -> dict[str, dict]:
    """Run the selected stages in registry order, then write the run report; returns
    {stage: manifest counts}."""
    from dromedary_jax.pipeline.defaults import complete
    from dromedary_jax.pipeline.resources import Resources

    check_workdir(workdir)
    config = complete(config)
    selected = select_stages(stages or list(config.stages))
    check_order(config, workdir, selected)
    resources = resources or Resources(config, workdir=workdir)
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
        counts = stage_fn(name)(config, workdir, resources=resources)
        log.info("stage %s: %s%s", name, "already done; " if was_done else "", counts)
        out[name] = counts
    if report and resources.hosts.is_main:
        from dromedary_jax.pipeline.run_report import write_report

        print(f"report: {write_report(config, workdir, resources)}")
    return out


def main(argv) -> None:
    from absl import flags

    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / jax chatter; ours stays INFO
    FLAGS = flags.FLAGS
    config = FLAGS.config
    if config is None:
        raise UserError("--config is required (an ml_collections config file, e.g. configs/demo.py)")
    if FLAGS.dry_run:
        from dromedary_jax.pipeline.plan import print_dry_run

        from dromedary_jax.pipeline.defaults import complete

        stages = select_stages(FLAGS.stages or list(complete(config).stages))
        print_dry_run(config, FLAGS.workdir, stages, FLAGS.devices)
        return
    from dromedary_jax.distributed import maybe_initialize
    from dromedary_jax.pipeline.defaults import complete

    maybe_initialize(complete(config).distributed.to_dict())
    import jax

    if jax.process_index() != 0:  # logs and progress bars only on process 0
        logging.getLogger("dromedary_jax").setLevel(logging.WARNING)
    results = run_stages(config, FLAGS.workdir, FLAGS.stages)
    if jax.process_index() != 0:
        return
    for name, counts in results.items():
        short = {k: v for k, v in counts.items() if not isinstance(v, dict)}
        print(f"{name}: {short}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (path.py or path.py:arg)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "output folder (one subfolder per stage)")
    flags.DEFINE_list("stages", None, f"comma-separated stages to run (default: all of {list(STAGES)})")
    flags.DEFINE_bool("dry_run", False, "print the resolved config, mesh, memory estimates and stage "
                      "plan; run nothing")
    flags.DEFINE_integer("devices", 0, "with --dry_run: plan the mesh for this many devices "
                         "(default: the devices visible here)")


@cli_main
def _entry() -> None:
    from absl import app

    _define_flags()
    logging.getLogger("dromedary_jax").setLevel(logging.INFO)
    app.run(cli_main(main), argv=sys.argv, flags_parser=parse_flags)


if __name__ == "__main__":
    _entry()
