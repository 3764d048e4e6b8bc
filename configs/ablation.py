"""Principle-set ablations on top of any experiment config, selected as ``file.py:arg``.

    python -m dromedary_jax.run --config configs/ablation.py:drop=candor --workdir runs/no-candor
    python -m dromedary_jax.run --config configs/ablation.py:base=llama2_7b,no_exemplars ...
    python -m dromedary_jax.run --config configs/ablation.py:base=demo,exemplars=2 ...

arg: comma-separated items, any of
  base=NAME       the experiment config to ablate (configs/NAME.py; default demo)
  drop=KEY        leave one principle out (a key of the principle file, e.g. candor; keys with
                  spaces take underscores, e.g. drop=question_assessment)
  no_exemplars    0 in-context exemplars (the same as exemplars=0)
  exemplars=N     keep the first N exemplars (0-5)
  shuffle=SEED    shuffle the principle order with SEED
An empty arg is the base config unchanged (the control). ``ablations()`` lists the standard
sweep: the control, the 16 leave-one-principle-out runs and no-exemplars.
"""
import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PRINCIPLES = os.path.join(HERE, "..", "data", "principles", "dromedary16.json")


def _base(name):
    path = os.path.join(HERE, f"{name}.py")
    if not os.path.isfile(path):
        raise ValueError(f"configs/ablation.py: base={name!r}: no configs/{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def principle_keys():
    with open(PRINCIPLES, encoding="utf-8") as f:
        return [p["key"] for p in json.load(f)["principles"]]


def ablations():
    """The standard sweep, as config args (the control first)."""
    return [""] + [f"drop={k}" for k in principle_keys()] + ["no_exemplars"]


def get_config(arg=None):
    items = [x.strip() for x in (arg or "").split(",") if x.strip()]
    opts = dict(x.split("=", 1) if "=" in x else (x, "") for x in items)
    known = {"base", "drop", "no_exemplars", "exemplars", "shuffle"}
    unknown = set(opts) - known
    if unknown:
        raise ValueError(f"configs/ablation.py: unknown item(s) {sorted(unknown)}; use {sorted(known)}")
    c = _base(opts.get("base", "demo"))
    sa = c.self_align
    if "drop" in opts:
        keys = principle_keys()
        drop = opts["drop"].replace("_", " ")
        if drop not in keys:
            raise ValueError(f"configs/ablation.py: drop={opts['drop']!r} is not a principle; known: {keys}")
        sa.drop_principles = (drop,)
    if "no_exemplars" in opts:
        sa.num_exemplars = 0
    if "exemplars" in opts:
        sa.num_exemplars = int(opts["exemplars"])
    if "shuffle" in opts:
        sa.shuffle_principles_seed = int(opts["shuffle"])
    return c
