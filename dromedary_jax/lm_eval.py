"""``lm_eval`` with the dromedary_jax backend registered:

    python -m dromedary_jax.lm_eval --model dromedary_jax \\
        --model_args pretrained=DIR[,dtype=bfloat16,mesh=1x-1x1,...] --tasks TASKS [lm_eval options]

Takes exactly the arguments of lm-evaluation-harness's ``lm_eval`` command (this module imports
:mod:`dromedary_jax.eval.lm_eval_backend`, which registers ``--model dromedary_jax``, then runs
the harness's own command line). lm-evaluation-harness 0.4.x has no plugin discovery for model
backends, so the plain ``lm_eval`` command does not know ``dromedary_jax``; every other model
(``--model hf`` ...) works here as there.

Multi-host: start the same command on every host with ``DROMEDARY_DISTRIBUTED=auto`` (TPU pods)
or ``DROMEDARY_COORDINATOR`` / ``DROMEDARY_NUM_PROCESSES`` / ``DROMEDARY_PROCESS_ID``;
``jax.distributed`` is started before anything else, the harness gives each process its share of
the requests, process 0 prints and writes the results. Bad input (a wrong model argument, a
missing model folder) prints one ``error: ...`` line and exits with status 2.
"""
from __future__ import annotations

import sys

from dromedary_jax.errors import cli_main


@cli_main
def main(argv=None) -> None:
    """Run ``lm_eval`` with ``argv`` (default: ``sys.argv[1:]``)."""
    from dromedary_jax.distributed import maybe_initialize

    maybe_initialize()
    import dromedary_jax.eval.lm_eval_backend  # noqa: F401  (registers --model dromedary_jax)
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    old = sys.argv
    sys.argv = ["lm_eval"] + argv  # the harness's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = old


if __name__ == "__main__":
    main()
