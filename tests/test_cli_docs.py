"""Documented commands cannot rot (issue 18): every ``python -m dromedary_jax.*`` command shown in
README.md, docs/*.md, experiments/README.md, benchmarks/README.md and the module docstrings of
dromedary_jax/ and configs/ is extracted and run on tiny inputs; every CLI's ``--help`` works
and lists its flags; every old (deprecated) flag spelling still works and prints one line naming
the new spelling.

How a shown command is run: optional ``[...]`` parts are dropped, ``a|b`` takes ``a``, ``...`` is
dropped, placeholders (``DIR``, ``x.gguf``, ``FILE``, ``/path/to/...``, ``$G`` ...) become tiny
fixtures (a tiny HF folder with its tokenizer, a tiny GGUF, the BIG-bench fixtures of
tests/data/eval, a fetch cache holding both), output paths go to a scratch folder shared by the
commands of one file (so ``convert --dst ckpt/`` then ``--src ckpt/`` works), and the command is
made cheap: ``run`` gets ``--dry_run``, ``train`` one short step, ``plan`` (a 65B compile for
64-256 simulated devices) is parsed, not compiled. Every flag a shown command names, optional
ones included, must be a flag of that CLI in its new spelling. Commands that cannot run here
are listed in ``SKIP`` with the reason.
"""
import ast
import glob
import importlib
import json
import os
import re
import shlex
import shutil

import pytest

from dromedary_jax.errors import DEPRECATED_FLAGS, absl_cli_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "eval")
CMD = re.compile(r"python -m dromedary_jax\.[\w.]+")
# inline code: `x` or ``x`` (not ``` fences), not across a blank line
SPAN = re.compile(r"(?<!`)(`{1,2})(?!`)(.+?)(?<!`)\1(?!`)", re.S)

# CLI -> (module, whether main(argv) takes the program name first, the flags' define function)
CLIS = {
    "run": ("dromedary_jax.run", True, "_define_flags"),
    "train": ("dromedary_jax.train", True, "_define_flags"),
    "plan": ("dromedary_jax.plan", True, "_define_flags"),
    "convert": ("dromedary_jax.convert", False, "_define_flags"),
    "fetch": ("dromedary_jax.fetch", False, "_define_flags"),
    "eval": ("dromedary_jax.eval.__main__", False, "_define_eval_flags"),
    "eval compare": ("dromedary_jax.eval.__main__", False, "_define_compare_flags"),
}
# Shown commands that are not run here (their flags are still checked, except lm_eval's).
SKIP = [
    (r"^python -m dromedary_jax\.lm_eval\b",
     "lm-evaluation-harness's own command line (the harness's argparse flags, not this "
     "project's parser); needs the optional lm-eval package"),
    (r"^python -m dromedary_jax\.run \.\.\.$",
     "the command launch.sh starts on every worker of a TPU slice (needs a TPU pod); "
     "experiments/README.md shows it in full"),
    (r"^python -m dromedary_jax\.eval --task \S+ --mesh 1,-1,8 \.\.\.$",
     "a multi-host fragment for the workers of a TPU slice (a 1,-1,8 mesh needs 8 chips per "
     "host and a model whose heads divide by 8)"),
    (r"configs/ablation\.py:base=llama2_7b",
     "needs a Llama-2-7B checkpoint (the command elides its flags with ...)"),
    (r"^python -m dromedary_jax\.run --dry_run$", "names the flag in prose (no --config)"),
]
PARSE_ONLY = {"plan": "compiling a 65B step for 64-256 simulated devices takes 3-50 s each; the "
                      "flags, the mesh and the config are parsed, and tests/test_plan.py runs "
                      "the CLI on a tiny config"}
OUT_FLAGS = ("--workdir", "--out", "--dst")


# ----------------------------------------------------------------------------- extraction
def doc_sources() -> list[tuple[str, str]]:
    """(path relative to the repo, text) of every file whose shown commands are checked."""
    out = []
    for p in ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT)),
              "experiments/README.md", "benchmarks/README.md"]:
        with open(os.path.join(ROOT, p), encoding="utf-8") as f:
            out.append((p, f.read()))
    pys = sorted(glob.glob("dromedary_jax/**/*.py", recursive=True, root_dir=ROOT))
    for p in pys + sorted(glob.glob("configs/*.py", root_dir=ROOT)):
        with open(os.path.join(ROOT, p), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        if doc and CMD.search(doc):
            out.append((p, doc))
    return out


def _cut(code: str, shell_sub: bool) -> str:
    for stop in (" #", ";", " | ", "`"):  # a comment, the next shell command, a pipe
        if stop in code:
            code = code[:code.index(stop)]
    if shell_sub and ")" in code:  # G=$(python -m ...)
        code = code[:code.index(")")]
    return " ".join(code.split())


def commands_in(text: str) -> list[tuple[int, str]]:
    """(line, command) of every ``python -m dromedary_jax.*`` in ``text``: an inline code span
    up to its end, else the code line up to its end with ``\\`` continuations joined."""
    spans = [(m.start(2), m.end(2)) for m in SPAN.finditer(text) if "\n\n" not in m.group(2)]
    lines = text.split("\n")
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln) + 1)
    out = []
    for m in CMD.finditer(text):
        a = m.start()
        i = text.count("\n", 0, a)
        span = next(((s, e) for s, e in spans if s <= a < e), None)
        if span:
            code = text[a:span[1]].replace("\\\n", " ")
        else:
            code = text[a:starts[i] + len(lines[i])]
            j = i
            while code.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                code = code.rstrip()[:-1] + " " + lines[j].strip()
        out.append((i + 1, _cut(code, "$(" in text[starts[i]:a])))
    return out


def shown_commands() -> dict[str, list[tuple[int, str]]]:
    """source -> its commands (a bare module name in prose is a mention, not a command)."""
    out = {}
    for src, text in doc_sources():
        cmds = [(n, c) for n, c in commands_in(text) if len(c.split()) > 3]
        if cmds:
            out[src] = cmds
    return out


SHOWN = shown_commands()


def cli_of(tokens: list[str]) -> str:
    module = tokens[2].split(".", 1)[1]
    return "eval compare" if module == "eval" and tokens[3:4] == ["compare"] else module


def skip_reason(cmd: str) -> str | None:
    return next((why for pattern, why in SKIP if re.search(pattern, cmd)), None)


# ----------------------------------------------------------------------------- flags of a CLI
_FLAGS: dict[str, object] = {}


def define_of(cli: str):
    module, _, define = CLIS[cli]
    return getattr(importlib.import_module(module), define)


def flags_of(cli: str):
    """A FlagValues holding the flags CLI ``cli`` defines (its config file not loaded)."""
    if cli not in _FLAGS:
        from absl import flags

        fv = flags.FlagValues()
        define_of(cli)(fv, [cli])
        _FLAGS[cli] = fv
    return _FLAGS[cli]


def check_flag_names(cli: str, tokens: list[str]) -> None:
    """Every ``--name`` of a shown command (optional parts included) is a flag of ``cli`` in its
    new spelling."""
    fv = flags_of(cli)
    for t in tokens:
        t = t.lstrip("[").rstrip("]")
        if not t.startswith("--") or t == "--":
            continue
        assert t.split("=")[0] not in DEPRECATED_FLAGS.get(cli, {}), f"old spelling {t}"
        name = t[2:].split("=")[0]
        if name.startswith("config."):
            assert "config" in fv, f"{cli} takes no config overrides ({t})"
            continue
        ok = name in fv or name == "help" or (name.startswith("no") and name[2:] in fv
                                                and fv[name[2:]].boolean)
        assert ok, f"{cli} has no flag --{name}"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fx(tmp_path_factory, sp_model_path):
    """Tiny stand-ins for every placeholder: an HF folder with its tokenizer, a GGUF, a fetch
    cache holding that GGUF as SmolLM2 and the BIG-bench fixtures, SFT records."""
    from flax import nnx

    from dromedary_jax import fetch
    from dromedary_jax.checkpoint import save_hf
    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama
    from gguf_helpers import byte_bpe_vocab, write_llama_gguf

    d = tmp_path_factory.mktemp("cli_docs")
    hf = d / "tiny_hf"
    save_hf(Llama(preset("tiny").replace(max_seq_len=8192), rngs=nnx.Rngs(0)), str(hf))
    shutil.copy(sp_model_path, hf / "tokenizer.model")
    cache = d / "cache"
    gguf = cache / fetch.SMOLLM2_DIR / fetch.SMOLLM2_FILE
    gguf.parent.mkdir(parents=True)
    write_llama_gguf(str(gguf), byte_bpe_vocab(), context_length=8192)
    bb = cache / fetch.BIGBENCH_DIR
    (bb / "truthful_qa").mkdir(parents=True)
    shutil.copy(os.path.join(DATA, "bigbench_truthful_qa", "questions.json"), bb / "truthful_qa")
    shutil.copytree(os.path.join(DATA, "hhh"), bb / "hhh_alignment")
    records = d / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"question {i}", "response": f"answer {i}"})
                               + "\n" for i in range(8)))
    questions, hhh = fetch.bigbench_paths(str(cache), download=False)
    return {"hf": str(hf), "tok": sp_model_path, "gguf": str(gguf), "cache": str(cache),
            "tqa": questions, "hhh": hhh, "answers": os.path.join(DATA, "vicuna_tiny.jsonl"),
            "records": str(records)}


@pytest.fixture
def cache_env(fx, monkeypatch):
    """``fetch`` and the configs that read its cache find the tiny files: nothing downloads."""
    from dromedary_jax import fetch

    monkeypatch.setenv(fetch.CACHE_ENV, fx["cache"])


# ----------------------------------------------------------------------------- instantiation
def runnable(tokens: list[str]) -> list[str]:
    """The command without its optional ``[...]`` parts and ``...``, first of each ``a|b``."""
    out, depth = [], 0
    for t in tokens:
        t = re.sub(r"(?<=\S)\[[^\]\s]*\]", "", t)  # configs/x.py[:arg]
        opens = len(t) - len(t.lstrip("["))
        closes = len(t) - len(t.rstrip("]"))
        value_of_flag = bool(out) and out[-1].startswith("--") and "=" not in out[-1]
        if depth + opens == 0 and (t != "..." or value_of_flag):  # --workdir ...: a placeholder
            out.append(t.split("|")[0] if "|" in t and not t.startswith("--config.") else t)
        depth += opens - closes
    return out


PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.\w+)?/?")  # DIR, FILE, RESULT.json, BASE_HF ...


def _scratch_path(scratch: str, value: str, fresh: bool = False) -> str:
    """Where output path ``value`` goes; ``fresh``: a new path for each use (a placeholder such
    as DIR names a different folder in each command)."""
    path = os.path.join(scratch, value.strip("/").replace("..", "_") or "out")
    n = 0
    while fresh and os.path.exists(path):
        n += 1
        path = os.path.join(scratch, f"{n}", value.strip("/"))
    return path


def _stand_in_result(path: str, scratch: str) -> None:
    """A result file for ``compare`` that no earlier command wrote (``other/tqa.json``): the one
    of the same name an earlier command wrote, relabelled, else a made-up one."""
    made = sorted(glob.glob(os.path.join(scratch, "**", os.path.basename(path)), recursive=True))
    res = {"task": "truthfulqa_mc", "metrics": {"mc1": 0.5, "mc2": 0.5}, "n": 2,
           "fingerprint": "f"}
    if made:
        with open(made[0], encoding="utf-8") as f:
            res = json.load(f)
    res["label"] = os.path.basename(os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f)


def instantiate(cli: str, args: list[str], fx: dict, scratch: str) -> list[str]:
    """``args`` (after the module, runnable) with placeholders replaced by the tiny fixtures and
    output paths moved into ``scratch``."""
    fv = flags_of(cli)
    task = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--task"), "")
    task = next((a.split("=", 1)[1] for a in args if a.startswith("--task=")), task)

    def model(value):
        made = _scratch_path(scratch, value)
        if os.path.exists(made) and not PLACEHOLDER.fullmatch(value):
            return made  # written by an earlier command of the same file (--dst ckpt/)
        return fx["gguf"] if value.endswith(".gguf") or value == "$G" else fx["hf"]

    def value_of(flag, value):
        if flag in OUT_FLAGS:
            return _scratch_path(scratch, value, fresh=bool(PLACEHOLDER.fullmatch(value)))
        if flag == "--cache":
            return fx["cache"]
        if flag in ("--model", "--src", "--config.model.checkpoint"):
            return model(value)
        if flag in ("--tokenizer", "--config.model.tokenizer", "--config.tokenizer"):
            return fx["tok"]
        if flag == "--config.data.train_files":
            return fx["records"]
        if flag == "--data":
            if os.path.exists(os.path.join(ROOT, value)):
                return value
            return {"hhh": fx["hhh"], "answers": fx["answers"]}.get(task, fx["tqa"])
        if flag == "--config" and "<" in value:
            return "configs/demo.py:smoke"
        if flag == "--mesh" and value.startswith("$"):
            return "1,16,8"
        return value

    out, i = [], 0
    positional = []
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            flag, value = a.split("=", 1)
            out.append(f"{flag}={value_of(flag, value)}")
        elif a.startswith("--") and a[2:] in fv and not fv[a[2:]].boolean and i + 1 < len(args):
            out += [a, value_of(a, args[i + 1])]
            i += 1
        elif a.startswith("-"):
            out.append(a)
        else:
            positional.append(len(out))
            out.append(a)
        i += 1
    if cli == "eval compare":
        for j in positional[1:]:  # positional[0] is "compare"
            path = _scratch_path(scratch, out[j])
            if not os.path.exists(path):
                _stand_in_result(path, scratch)
            out[j] = path
    if cli == "run" and "--dry_run" not in out:
        out.append("--dry_run")
    if cli == "train":
        out += ["--config.train.num_steps=1", "--config.data.max_len=64"]
    if cli == "eval" and task == "answers":
        out += ["--max_new_tokens", "2"]
    return out


def call(cli: str, args: list[str], capsys) -> tuple[int, str, str]:
    """``cli``'s ``main`` in-process: (exit status, stdout, stderr)."""
    module, with_prog, _ = CLIS[cli]
    argv = [cli, *args] if with_prog else list(args)
    capsys.readouterr()
    code = 0
    try:
        importlib.import_module(module).main(argv)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def check_ran(cli: str, args: list[str], code: int, out: str, err: str) -> None:
    """The command succeeded and did what it says."""
    assert code == 0, err
    assert "deprecated" not in err, err  # the docs use the new spellings
    if "--help" in args:
        assert "flags:" in out
    elif cli == "run":
        assert "== stage plan" in out and "== model:" in out, out
    elif cli == "train":
        assert out.strip().splitlines()[-1].startswith("done: 1 steps"), out
    elif cli == "convert":
        assert "wrote" in out and os.listdir(args[args.index("--dst") + 1])
    elif cli == "fetch":
        paths = out.split()
        assert paths and all(os.path.exists(p) for p in paths), out
    elif cli == "eval compare":
        assert out.startswith("wrote ") and "comparison.md" in out
    elif cli == "eval":
        res = json.loads(out.strip().splitlines()[-1])
        assert res["task"] in ("truthfulqa_mc", "hhh", "answers")
        if "--out" in args:
            assert os.path.isfile(args[args.index("--out") + 1])


# ----------------------------------------------------------------------------- the tests
_PASSED: set[str] = set()  # commands that ran (identical ones elsewhere are not rerun)


def test_the_readme_shows_every_cli():
    shown = {cli_of(shlex.split(c)) for _, c in SHOWN["README.md"]}
    assert shown >= set(CLIS), set(CLIS) - shown


@pytest.mark.parametrize("source", sorted(SHOWN))
def test_shown_commands_run(source, fx, cache_env, tmp_path, capsys):
    """Every command shown in ``source``, in order, on tiny inputs (one scratch folder)."""
    ran = 0
    for line, cmd in SHOWN[source]:
        where = f"{source}:{line}: {cmd}"
        tokens = shlex.split(cmd)
        cli = cli_of(tokens)
        if cli == "lm_eval":
            assert skip_reason(cmd), where
            continue
        assert cli in CLIS, f"{where}: a CLI this test does not know: add it to CLIS"
        check_flag_names(cli, tokens[3:])
        if skip_reason(cmd):
            continue
        if cli in ("run", "train", "fetch") and cmd in _PASSED:
            ran += 1  # the same command already ran (from another file): its inputs are fixed
            continue
        args = instantiate(cli, runnable(tokens)[3:], fx, str(tmp_path))
        if cli in PARSE_ONLY:
            from dromedary_jax.plan import _parse_mesh

            fv, _ = absl_cli_args([cli, *args], define_of(cli), cli=cli)
            assert fv.config is not None and "model" in fv.config, where
            _parse_mesh(fv.mesh)
            continue
        code, out, err = call(cli, args, capsys)
        try:
            check_ran(cli, args, code, out, err)
        except AssertionError as e:
            raise AssertionError(f"{where}\n  ran: {cli} {shlex.join(args)}\n  {e}") from None
        ran += 1
        _PASSED.add(cmd)
    assert ran or all(skip_reason(c) or cli_of(shlex.split(c)) in PARSE_ONLY
                      for _, c in SHOWN[source])


SKIPPED = [(f"{src}:{n}", cmd) for src, cmds in sorted(SHOWN.items()) for n, cmd in cmds
           if skip_reason(cmd)]


@pytest.mark.parametrize("where,cmd", SKIPPED, ids=[w for w, _ in SKIPPED])
def test_commands_not_run_here(where, cmd):
    """Listed so that the test report names every shown command that is not run, and why."""
    pytest.skip(f"{cmd}: {skip_reason(cmd)}")


def test_skips_name_commands_that_are_shown():
    """A SKIP entry that matches nothing any more is stale."""
    cmds = [c for cs in SHOWN.values() for _, c in cs]
    for pattern, _ in SKIP:
        assert any(re.search(pattern, c) for c in cmds), pattern


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_help_lists_every_flag(cli, capsys):
    args = ["compare", "--help"] if cli == "eval compare" else ["--help"]
    code, out, err = call(cli.split()[0], args, capsys)
    assert code == 0, err
    assert f"python -m dromedary_jax.{cli}" in out
    fv = flags_of(cli)
    for name in fv:
        assert f"--{'[no]' if fv[name].boolean else ''}{name}" in out, name


@pytest.mark.parametrize("cli", ["run", "train", "plan", "convert", "fetch", "eval"])
def test_help_of_the_real_command(cli):
    """``python -m dromedary_jax.<cli> --help`` as a process: the entry point is wired."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", f"dromedary_jax.{cli}", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "flags:" in proc.stdout and "--" in proc.stdout.split("flags:", 1)[1]


DEPRECATED = [(cli, old, new) for cli, table in sorted(DEPRECATED_FLAGS.items())
              for old, new in sorted(table.items())]


@pytest.mark.parametrize("cli,old,new", DEPRECATED, ids=[f"{c}{o}" for c, o, _ in DEPRECATED])
def test_old_spelling_sets_the_new_flag_with_one_line(cli, old, new, capsys):
    fv0 = flags_of(cli)
    name = new[2:]
    negated = name not in fv0 and name.startswith("no")
    flag = fv0[name[2:] if negated else name]
    if flag.boolean:
        argv, want = [cli, old], not negated
    else:
        value = {"int": "7", "float": "0.5"}.get(flag.flag_type(), "5GB")
        argv, want = [cli, f"{old}={value}"], flag.parser.parse(value)
    capsys.readouterr()
    fv, _ = absl_cli_args(argv, define_of(cli), cli=cli)
    assert fv[flag.name].value == want
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {old} is deprecated, use {new} ")


def warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]  # not progress bars


def test_old_spellings_still_run_end_to_end(fx, tmp_path, capsys):
    """One real run per CLI with old spellings: same result as the new ones, one line each."""
    tqa = ["--model", fx["hf"], "--task", "truthfulqa_mc", "--data", fx["tqa"]]
    old = ["--batch-tokens", "256", "--row-length", "64", "--no-bos"]
    code, out, err = call("eval", tqa + old + ["--out", str(tmp_path / "old.json")], capsys)
    assert code == 0, err
    assert [ln.split()[1] for ln in warnings(err)] == ["--batch-tokens", "--row-length", "--no-bos"]
    new = ["--batch_tokens=256", "--row_length=64", "--nobos"]
    code, out, err = call("eval", tqa + new + ["--out", str(tmp_path / "new.json")], capsys)
    assert code == 0 and "deprecated" not in err, err
    a, b = (json.load(open(tmp_path / f)) for f in ("old.json", "new.json"))
    assert a["settings"] == b["settings"] and a["settings"]["batch_tokens"] == 256
    assert a["bos"] == b["bos"] == {"add_bos": False, "rule": "forced off (--nobos)"}
    assert a["metrics"] == b["metrics"]

    dst = tmp_path / "hf"
    code, out, err = call("convert", ["--src", fx["hf"], "--dst", str(dst), "--max-shard-size",
                                      "100KB", "--mesh", "fsdp=-1"], capsys)
    assert code == 0, err
    lines = warnings(err)
    assert len(lines) == 2 and lines[0].startswith("warning: --max-shard-size is deprecated")
    assert lines[1].startswith("warning: --mesh fsdp=-1 is deprecated, use --mesh 1,-1,1 ")
    assert len([f for f in os.listdir(dst) if f.endswith(".safetensors")]) > 1  # 100KB shards

    code, out, err = call("run", ["--config", "configs/demo.py:smoke", "--dry-run"], capsys)
    assert code == 0 and "== stage plan" in out, err
    assert warnings(err) == [
        "warning: --dry-run is deprecated, use --dry_run (it still works in this release and "
        "will be removed in the next)"]


@pytest.mark.parametrize("cli,argv,needle", [
    ("eval", ["--batch-sizes", "3"], "Unknown command line flag 'batch-sizes'"),
    ("convert", ["--src", "a", "--dst", "b", "--to", "gguf"], "flag --to=gguf"),
    ("fetch", ["models"], "say what to fetch"),
    ("eval compare", ["compare", "--out", "x"], "compare needs RESULT.json files"),
    ("plan", ["--mode", "everything"], "flag --mode=everything"),
])
def test_a_bad_command_line_is_one_error_line(cli, argv, needle, capsys):
    code, out, err = call(cli.split()[0], argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
