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

The stages, their order and their lifecycle live in :mod:`dromedary_jax.pipeline.runner`
(``STAGES``, ``run_stages``); this module is the command line around it.
"""
from __future__ import annotations

import logging
import sys

from dromedary_jax.errors import UserError, absl_cli_flags, check_workdir, cli_main
from dromedary_jax.pipeline.defaults import complete
from dromedary_jax.pipeline.runner import STAGES, check_inputs, run_stages, select_stages

log = logging.getLogger("dromedary_jax.run")


def dry_run(config, workdir: str | None, stages, devices: int = 0) -> None:
    """``--dry_run``: the same checks as a run (config values, input files, the model), then the
    plan. With ``--devices N`` (planning for another machine) a model that is not on THIS
    machine is a printed note, not an error."""
    from dromedary_jax.pipeline.dry_run import print_dry_run

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
