"""Launch the principle-set ablations and tabulate their results.

    python experiments/ablation_sweep.py --base demo --root runs/sweep            # run all, locally
    python experiments/ablation_sweep.py --base dromedary_65b --root /mnt/sweep --dry_run  # print
    python experiments/ablation_sweep.py --root runs/sweep --tabulate             # the table only

Each ablation of ``configs/ablation.py`` (the control, 16 leave-one-principle-out runs, no
exemplars) runs the pipeline into ``<root>/<name>``. ``--only`` picks a subset, ``--stages``
limits the stages (e.g. self_align alone to compare funnels cheaply), ``--launcher`` prefixes every
command (e.g. "experiments/tpu/launch.sh --wait --name x --zone z --accelerator v4-256 --": --wait, since the launcher otherwise returns at once and refuses the next run while one is going). The table
(``<root>/ablations.md``) has, per run: stage-2 kept answers, how often the thoughts cite each
principle, the held-out losses of stages 3 and 4, and any eval results found in
``<root>/<name>/eval/*.json`` (written by ``python -m dromedary_jax.eval --out``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "configs"))

import ablation  # noqa: E402  (configs/ablation.py)


def run_name(arg: str) -> str:
    return arg.replace("=", "-").replace(" ", "_").replace("&", "and") or "control"


def commands(base: str, root: str, only, stages, launcher: str) -> list[tuple[str, list[str]]]:
    out = []
    for arg in ablation.ablations():
        name = run_name(arg)
        if only and name not in only and arg not in only:
            continue
        cfg_arg = ",".join(x for x in (f"base={base}", arg.replace(" ", "_")) if x)
        # through a launcher the command runs elsewhere (e.g. on TPU workers): name the remote
        # python3, not this machine's interpreter
        python = "python3" if launcher else sys.executable
        cmd = shlex.split(launcher) + [
            python, "-m", "dromedary_jax.run", "--config", f"configs/ablation.py:{cfg_arg}",
            "--workdir", os.path.join(root, name)]
        if stages:
            cmd += ["--stages", stages]
        out.append((name, cmd))
    return out


def _manifest(run_dir: str, stage: str) -> dict:
    p = os.path.join(run_dir, stage, "manifest.json")
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f).get("counts", {})


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def tabulate(root: str) -> str:
    runs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    eval_keys: list[str] = []
    rows = []
    for name in runs:
        d = os.path.join(root, name)
        sa, en, vc = (_manifest(d, s) for s in ("self_align", "engrave", "verbose_clone"))
        evals = {}
        for p in sorted(glob.glob(os.path.join(d, "eval", "*.json"))):
            with open(p) as f:
                res = json.load(f)
            task = os.path.splitext(os.path.basename(p))[0]
            for k, v in (res.get("metrics", res) if isinstance(res, dict) else {}).items():
                if isinstance(v, (int, float)):
                    evals[f"{task}.{k}"] = v
        eval_keys += [k for k in evals if k not in eval_keys]
        cites = sa.get("citations", {})
        top = ", ".join(f"{k} {v}" for k, v in sorted(cites.items(), key=lambda kv: -kv[1])[:3]) or "-"
        rows.append((name, sa.get("kept"), sa.get("generated"), top, en.get("heldout_loss"),
                     vc.get("heldout_loss"), evals))
    head = ["run", "stage-2 kept", "generated", "most cited principles", "engrave held-out loss",
            "verbose held-out loss"] + eval_keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, kept, gen, top, el, vl, evals in rows:
        cells = [name, _fmt(kept), _fmt(gen), top, _fmt(el), _fmt(vl)] + [_fmt(evals.get(k)) for k in eval_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="demo", help="experiment config to ablate (configs/NAME.py)")
    ap.add_argument("--root", required=True, help="folder holding one workdir per ablation")
    ap.add_argument("--only", default="", help="comma-separated run names or args to run")
    ap.add_argument("--stages", default="", help="stages to run (default: all)")
    ap.add_argument("--launcher", default="", help="command prefix, e.g. the TPU launch script")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--tabulate", action="store_true", help="only write the results table")
    args = ap.parse_args(argv)
    if not args.tabulate:
        only = {x.strip() for x in args.only.split(",") if x.strip()}
        for name, cmd in commands(args.base, args.root, only, args.stages, args.launcher):
            print("+ " + shlex.join(cmd), flush=True)
            if not args.dry_run:
                res = subprocess.run(cmd, cwd=ROOT)
                if res.returncode != 0:
                    print(f"error: ablation {name} failed (exit {res.returncode})", file=sys.stderr)
                    return res.returncode
        if args.dry_run:
            return 0
    if not os.path.isdir(args.root):
        print(f"error: {args.root}: no such folder", file=sys.stderr)
        return 2
    table = tabulate(args.root)
    with open(os.path.join(args.root, "ablations.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
