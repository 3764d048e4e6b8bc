"""Faults: bad input is one line (every row of docs/bad_input.md), one schema checks every config
value, files survive kills (atomic writes, torn-tail repair, metrics equal after a resume), one
run per workdir, interrupts and full disks are one line, and the data order does not depend on
the process count."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from dromedary_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "bad_input.md")
LOCK_FILES = (".dromedary.lock",)
LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl log lines


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)
            and "Warning" not in ln and "warn(" not in ln]


# ------------------------------------------------------------------ the bad-input table
def table_rows():
    rows = []
    for line in open(TABLE, encoding="utf-8"):
        m = re.match(r"^\| (\d+) \| ([a-z ()]+) \| `(.*)` \| `(.*)` \|$", line.strip())
        if m:
            rows.append((int(m.group(1)), m.group(2).strip(), m.group(3), m.group(4)))
    return rows


ROWS = table_rows()


def _hold_lock(workdir: str):
    """Another process holding the workdir lock (as a running run does)."""
    code = ("import fcntl, os, sys, time; os.makedirs(sys.argv[1], exist_ok=True); "
            "fd = os.open(os.path.join(sys.argv[1], '.dromedary.lock'), os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'pid {os.getpid()} on test'.encode()); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture(scope="module")
def files(tmp_path_factory, sp_model_path):
    d = tmp_path_factory.mktemp("inputs")
    busy = d / "busy"
    out = {"file": d / "file.txt", "empty": d / "empty.jsonl", "bad_jsonl": d / "bad.jsonl",
           "binary": d / "binary.json", "no_prompt": d / "no_prompt.txt",
           "records": d / "records.jsonl", "fake_model": d / "fake_model", "busy": busy}
    out["file"].write_text("not a folder\n")
    out["empty"].write_text("")
    out["bad_jsonl"].write_text('{"prompt": "a", "response": "b"}\n{"prompt" "a"}\n')
    out["binary"].write_bytes(b"\xff\xfe\x00 not text")
    out["no_prompt"].write_text("A meta-prompt without the placeholder.\n")
    out["records"].write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"question {i}",
                                                  "response": f"answer {i}"}) + "\n"
                                      for i in range(4)))
    out["fake_model"].mkdir()
    (out["fake_model"] / "config.json").write_text("{}")
    holder = _hold_lock(str(busy))
    out = {k: str(v) for k, v in out.items()}
    out["tok"] = sp_model_path
    yield out
    holder.kill()
    holder.wait()


def _expand(text: str, values: dict) -> str:
    text = text.replace("SMOKE", "--config configs/demo.py:smoke --workdir {wd}")
    text = text.replace("SFT", "--config configs/sft_tiny.py:train={records},tokenizer={tok} "
                               "--workdir {wd}")
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def _snapshot(values: dict) -> dict:
    out = {}
    for key in ("file", "fake_model", "busy"):
        p = values[key]
        out[key] = sorted(os.listdir(p)) if os.path.isdir(p) else open(p, "rb").read()
    return out


def _main(cli: str):
    if cli == "run":
        from dromedary_jax.run import main
        return lambda args: main(["run", *args])
    if cli == "train":
        from dromedary_jax.train import main
        return lambda args: main(["train", *args])
    if cli == "eval":
        from dromedary_jax.eval.__main__ import main
        return main
    from dromedary_jax.convert import main
    return main


def test_the_table_has_at_least_30_rows_over_every_cli():
    assert len(ROWS) >= 30 and [r[0] for r in ROWS] == list(range(1, len(ROWS) + 1))
    assert {r[1].split()[0] for r in ROWS} == {"run", "train", "eval", "convert"}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}-{r[1].split()[0]}" for r in ROWS])
def test_bad_input_table(row, files, tmp_path, capsys):
    """One ``error:`` line naming the problem, exit status 2, no traceback, and nothing written
    (at most the workdir's lock file)."""
    num, cli, args, needle = row
    values = dict(files, wd=str(tmp_path / "wd"))
    argv = _expand(args, values).split()
    needle = _expand(needle, values)
    before = _snapshot(values)
    name = cli.split()[0]
    if "process" in cli:
        res = subprocess.run([sys.executable, "-m", f"dromedary_jax.{name}", *argv], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=120)
        code, err = res.returncode, res.stderr
    else:
        with pytest.raises(SystemExit) as exit_info:
            _main(name)(argv)
        code, err = exit_info.value.code, capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 2, (num, err[-2000:])
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), (num, lines)
    assert needle in lines[0], (num, lines[0])
    wd = values["wd"]
    assert not os.path.exists(wd) or set(os.listdir(wd)) <= set(LOCK_FILES), os.listdir(wd)
    assert _snapshot(values) == before


# ------------------------------------------------------------------ one table of rules
def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("logit_bias", "overrides"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_numeric_boolean_key_has_a_rule():
    from dromedary_jax.pipeline.defaults import FINETUNE_SECTIONS, PIPELINE_RULES, get_defaults
    from dromedary_jax.training.config import FINETUNE_RULES, default_config

    def covered(key):
        for sec in FINETUNE_SECTIONS:
            if key.startswith(sec + "."):
                return key[len(sec) + 1:] in FINETUNE_RULES
        return key in PIPELINE_RULES

    pipeline = dict(_leaves(get_defaults().to_dict()))
    finetune = dict(_leaves(default_config().to_dict()))
    numeric = lambda v: isinstance(v, (bool, int, float))  # noqa: E731
    assert [k for k, v in pipeline.items() if numeric(v) and not covered(k)] == []
    assert [k for k, v in finetune.items() if numeric(v) and k not in FINETUNE_RULES] == []
    assert [k for k in PIPELINE_RULES if k not in pipeline] == []  # no stale rules
    assert [k for k in FINETUNE_RULES if k not in finetune] == []
    for k, rule in {**PIPELINE_RULES, **FINETUNE_RULES}.items():  # the defaults pass
        default = pipeline.get(k, finetune.get(k))
        assert rule.problem(default) is None, (k, default)


def test_library_errors_name_their_own_keys_and_a_stage_adds_the_config_path(tmp_path):
    from dromedary_jax.training.config import config_path, default_config, validate

    cfg = default_config()
    cfg.train.batch_size = -8
    with pytest.raises(UserError, match=r"^train\.batch_size: must be an integer >= 1 \(got -8\)$"):
        validate(cfg)
    with pytest.raises(UserError, match=r"^config\.engrave\.train\.data\.max_len=4096 is over"):
        with config_path("config.engrave.train."):
            raise UserError("data.max_len=4096 is over the model's maximum sequence length 128")
    with pytest.raises(UserError, match=r"^no training examples"):  # not a key: unchanged
        with config_path("config.engrave.train."):
            raise UserError("no training examples in x.jsonl")
    from dromedary_jax.pipeline.defaults import complete

    bad = ml_collections.ConfigDict({"verbose_clone": {"ngram_penalties": ((3, -1.0),)}})
    with pytest.raises(UserError, match=r"config\.verbose_clone\.ngram_penalties: must be"):
        complete(bad)
    bad = ml_collections.ConfigDict({"self_align": {"logit_bias": {"Sorry": "a lot"}}})
    with pytest.raises(UserError, match=r"config\.self_align\.logit_bias: biases must be numbers"):
        complete(bad)


# ------------------------------------------------------------------ files that survive kills
def test_metrics_log_repairs_a_cut_line_and_drops_steps_a_resume_rewrites(tmp_path):
    from dromedary_jax.pipeline.reports.run_report import _metrics
    from dromedary_jax.training.metrics import MetricsWriter, read_metrics

    wd = tmp_path / "engrave" / "train"
    wd.mkdir(parents=True)
    path = wd / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 2, "eval_loss": 1.7}\n'
                    '{"step": 3, "loss": 1.25}\n{"step": 4, "lo')  # killed mid-line at step 4
    assert [r["step"] for r in _metrics(str(tmp_path), "engrave")] == [1, 2, 2, 3]  # report reads it
    w = MetricsWriter(str(wd), tensorboard=False, resume_step=2)  # restored the step-2 checkpoint
    w.write(3, {"loss": 1.25})
    w.write(4, {"loss": 1.0})
    w.close()
    assert read_metrics(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
                                       {"step": 2, "eval_loss": 1.7}, {"step": 3, "loss": 1.25},
                                       {"step": 4, "loss": 1.0}]
    path.write_text(path.read_text() + '{"step": 5 nope}\n{"step": 6, "loss": 0.5}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl: line 6 is not valid JSON"):
        read_metrics(str(path))


def test_json_reads_name_the_file_and_writes_are_atomic(tmp_path, monkeypatch):
    from dromedary_jax.jsonl import write_json_atomic
    from dromedary_jax.pipeline.records import stage_done
    from dromedary_jax.training import loop

    wd = tmp_path / "train"
    wd.mkdir()
    (wd / "run_info.json").write_text('{"data_fingerprint": "ab')  # cut by an old, non-atomic write
    with pytest.raises(UserError, match=r"run_info\.json:1 \(it describes the checkpoints.*\): malformed"):
        loop._check_run_info(str(wd), {"data_fingerprint": "ab"})
    (tmp_path / "engrave").mkdir()
    (tmp_path / "engrave" / "manifest.json").write_text('{"done": tr')
    with pytest.raises(UserError, match=r"engrave/manifest\.json:1 .*malformed JSON"):
        stage_done(str(tmp_path), "engrave")
    # a write that fails half-way leaves the old file whole and no temporary file behind
    target = tmp_path / "info.json"
    write_json_atomic(str(target), {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(str(target), {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["engrave", "info.json", "train"]


def _sft_cfg(steps, **overrides):
    from dromedary_jax import training

    cfg = training.default_config()
    cfg.data.max_len = 64
    cfg.train.batch_size = 2
    cfg.train.num_steps = steps
    cfg.train.learning_rate = 3e-3
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.async_save = False
    cfg.eval.every_steps = 2
    cfg.metrics.log_every = 3
    cfg.metrics.tensorboard = False
    cfg.metrics.progress = False
    cfg.metrics.log_example_ids = True
    cfg.mesh.shape = (1, 1, 1)
    for k, v in overrides.items():
        sec, key = k.split(".")
        cfg[sec][key] = v
    return cfg


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_interrupted_fine_tune_resumes_with_the_uninterrupted_metrics(tmp_path, sp_tokenizer,
                                                                      monkeypatch):
    """Interrupted while step 6 is computed (after step 5's metrics were logged, checkpoint at 4),
    resumed: metrics.jsonl and examples_seen equal an uninterrupted run's (timing fields aside),
    with no line twice; resuming at the final checkpoint reports the real final losses."""
    from flax import nnx

    from dromedary_jax import training
    from dromedary_jax.jsonl import read_log
    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama
    from dromedary_jax.training import loop
    from dromedary_jax.training.metrics import without_timing

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"question number {i}",
                                        "response": f"the answer is {i}"}) + "\n" for i in range(10)))
    heldout = tmp_path / "h.jsonl"
    heldout.write_text(json.dumps({"id": "h", "prompt": "question", "response": "answer"}) + "\n")
    import jax

    from dromedary_jax.sharding import make_mesh

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model = Llama(preset("tiny"), rngs=nnx.Rngs(0))
    cfg = _sft_cfg(7)  # metrics every 3 steps, checkpoints and eval every 2

    def run(name):
        return training.run_sft(cfg, model, sp_tokenizer, [str(data)], str(tmp_path / name),
                                eval_files=[str(heldout)], mesh=mesh)

    full = run("full")
    real = loop._to_global
    calls = {"n": 0}

    def interrupt_at_step_6(*a, **kw):
        calls["n"] += bool(kw.get("stacked"))  # a training batch (eval batches are not stacked)
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "_to_global", interrupt_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run("cut")
    monkeypatch.setattr(loop, "_to_global", real)
    cut = tmp_path / "cut"
    assert max(r["step"] for r in read_log(str(cut / "metrics.jsonl"))) == 5
    resumed = run("cut")
    for name in ("metrics.jsonl", "examples_seen-0.jsonl"):
        got = without_timing(read_log(str(cut / name)))
        want = without_timing(read_log(str(tmp_path / "full" / name)))
        assert got == want, name
    assert (resumed.final_loss, resumed.eval_loss) == (full.final_loss, full.eval_loss)
    again = run("cut")  # restored at the final checkpoint: nothing to train, same numbers
    assert (again.final_loss, again.eval_loss) == (full.final_loss, full.eval_loss)
    assert again.final_loss is not None


# ------------------------------------------------------------------ one run per workdir
def test_a_busy_workdir_refuses_and_a_killed_holder_leaves_no_lock(tmp_path):
    from dromedary_jax.workdir_lock import acquire, release, workdir_lock

    wd = str(tmp_path / "wd")
    holder = _hold_lock(wd)
    try:
        with pytest.raises(UserError, match=rf"--workdir {re.escape(wd)} is in use by another run "
                                            rf"\(pid {holder.pid} on "):
            acquire(wd)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lock(wd) as path:  # the kernel dropped the dead holder's lock
        with workdir_lock(wd):  # re-entrant in one process (a runner calling the fine-tune)
            pass
        assert os.path.exists(path)
    other = _hold_lock(wd)  # released: another process gets it
    other.kill()
    other.wait()
    p = acquire(wd, process_index=1)  # multi-host: each process its own file
    assert p.endswith(".dromedary.lock.1")
    release(p)


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from dromedary_jax import workdir_lock as wl

    real = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(wl.LOCK_NAME):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *a)

    monkeypatch.setattr(wl.os, "open", read_only)
    with pytest.raises(UserError, match=r"--workdir .*: not writable \(Read-only file system\)"):
        wl.acquire(str(tmp_path / "ro"))


def test_two_runs_started_together_one_refuses_no_record_twice(tmp_path):
    wd = str(tmp_path / "wd")
    cmd = [sys.executable, "-m", "dromedary_jax.run", "--config", "configs/stages12_tiny.py",
           "--workdir", wd, "--stages", "self_instruct", "--config.self_instruct.topics.rounds=1",
           "--config.self_instruct.vanilla.max_rounds=1", "--config.model.delay_s=0.05"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-1500:] for o in outs]
    (err,) = [_error_lines(o[1]) for p, o in zip(procs, outs) if p.returncode == 2]
    assert len(err) == 1 and "is in use by another run" in err[0]
    from dromedary_jax.pipeline.records import shard_paths

    for path in shard_paths(os.path.join(wd, "self_instruct"), "topics") + \
            shard_paths(os.path.join(wd, "self_instruct"), "vanilla"):
        ids = [json.loads(x)["id"] for x in open(path)]
        assert ids and len(ids) == len(set(ids)), path


# ------------------------------------------------------------------ inputs checked first
def test_a_bad_seed_task_is_found_before_generation_and_fixing_it_reruns(tmp_path, capsys):
    """Stage 1 reads topics and questions before the seed tasks: the runner checks every input
    first, so nothing is generated; fixing the file IN PLACE then runs (nothing locks)."""
    from dromedary_jax.run import main

    seeds = tmp_path / "seed_tasks.jsonl"
    good = open(os.path.join(ROOT, "data", "seed_tasks", "seed_tasks.jsonl")).read().splitlines()
    seeds.write_text("\n".join(good[:3] + ['{"instruction": "x", "instances": [}'] + good[3:6]) + "\n")
    wd = str(tmp_path / "wd")
    argv = ["run", "--config", "configs/stages12_tiny.py", "--workdir", wd, "--stages",
            "self_instruct", "--config.self_instruct.topics.rounds=1",
            "--config.self_instruct.vanilla.max_rounds=1",
            f"--config.self_instruct.seed_tasks={seeds}"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"{seeds}:4 (config.self_instruct.seed_tasks): malformed JSON line" in capsys.readouterr().err
    assert not os.path.exists(wd)  # nothing generated, no stage folder
    seeds.write_text("\n".join(good[:6]) + "\n")  # fixed in place
    main(argv)
    assert json.load(open(os.path.join(wd, "self_instruct", "manifest.json")))["done"]


# ------------------------------------------------------------------ interrupts and full disks
def _sft_cli(workdir, records, tok, *extra):
    return [sys.executable, "-m", "dromedary_jax.train",
            f"--config={ROOT}/configs/sft_tiny.py:train={records},tokenizer={tok}",
            f"--workdir={workdir}", "--config.data.max_len=64", "--config.train.batch_size=2",
            "--config.train.num_steps=8", "--config.checkpoint.every_steps=2",
            "--config.metrics.progress=False", "--config.metrics.tensorboard=False",
            "--config.metrics.log_every=1", "--config.mesh.shape=(1,1,1)",
            "--config.export.format=none", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_fine_tune_cli_interrupt_is_one_line_and_the_same_command_resumes(tmp_path, files, sig,
                                                                          code):
    wd = tmp_path / "wd"
    cmd = _sft_cli(wd, files["records"], files["tok"])
    # a shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it: give
    # the run the default disposition a command typed at a terminal has (Ctrl-C)
    # (a wrapper resets it and execs the run: no preexec_fn fork from this threaded process)
    default_sigint = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, "
                      "signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]
    proc = subprocess.Popen(default_sigint + cmd + ["--config.debug.step_sleep_s=0.5"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (wd / "checkpoints" / "2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    name = signal.Signals(sig).name
    assert _error_lines(err) == [f"interrupted ({name}): what was finished is saved; run the same "
                                 f"command again to resume"], err[-3000:]
    assert "done:" not in out
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "done: 8 steps" in res.stdout, res.stderr[-3000:]
    from dromedary_jax.jsonl import read_log

    steps = [r["step"] for r in read_log(str(wd / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 9))  # every step once


@pytest.mark.filterwarnings("ignore")
def test_full_disk_in_any_writer_is_one_line(tmp_path, files, monkeypatch, capsys):
    """A full disk in a checkpoint save (here: raised the way Orbax's async writer chains it)
    or the HF export is the one-line error with the path, exit 2."""
    import dromedary_jax.checkpoint as ckpt
    from dromedary_jax.errors import cli_main, find_disk_full
    from dromedary_jax.train import main

    def full_save(model, out, overwrite=False, **kw):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out, "params"))
        except OSError as e:
            raise RuntimeError("async save failed") from e

    monkeypatch.setattr(ckpt, "save_checkpoint", full_save)
    wd = tmp_path / "wd"
    argv = ["train", f"--config={ROOT}/configs/sft_tiny.py:train={files['records']},"
            f"tokenizer={files['tok']}", f"--workdir={wd}", "--config.data.max_len=64",
            "--config.train.batch_size=2", "--config.train.num_steps=1",
            "--config.metrics.progress=False", "--config.metrics.tensorboard=False",
            "--config.mesh.shape=(1,-1,1)"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    lines = _error_lines(capsys.readouterr().err)
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {wd}/final/params: no space left on device while writing; "
                               "free some space (or raise the quota), then rerun the same command")
    # a C++ writer's error that only carries the OS text, e.g. TensorStore's
    ts = ValueError("INTERNAL: Error writing \"/ckpt/0/d/x\": [errno=122] Disk quota exceeded")
    assert find_disk_full(ts) is ts

    @cli_main
    def export():
        raise ValueError("wrapped") from ts

    with pytest.raises(SystemExit):
        export()
    assert "error: /ckpt/0/d/x: disk quota exceeded while writing" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_checkpoint_write_that_hits_the_file_size_limit_is_one_line(tmp_path, files):
    """Orbax's async writer (TensorStore, C++) fails for real here: the process may not write a
    file larger than 150 kB (``ulimit -f``; Python ignores SIGXFSZ, so the write gets EFBIG).
    The error arrives as a ValueError carrying only the OS text; the CLI still prints one line."""
    wd = tmp_path / "wd"
    cmd = _sft_cli(wd, files["records"], files["tok"]) + ["--config.train.num_steps=2",
                                                          "--config.checkpoint.every_steps=1"]
    limited = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit("
               "resource.RLIMIT_FSIZE, (150_000, 150_000)); os.execv(sys.argv[1], sys.argv[1:])"]
    res = subprocess.run(limited + cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    lines = _error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert re.match(rf"error: {re.escape(str(wd))}/checkpoints/\S+: file too large while writing; "
                    r"raise the file-size limit \(ulimit -f\)", lines[0]), lines[0]
    assert "Traceback" not in res.stderr  # Orbax's own logs of it are dropped too
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "done: 2 steps" in res.stdout, res.stderr[-3000:]  # the fix


# ------------------------------------------------------------------ data order
@pytest.mark.parametrize("pack, shuffle, epochs", [(True, True, 2), (False, True, 3),
                                                    (True, False, 1)])
def test_data_order_depends_on_the_global_batch_not_the_process_count(pack, shuffle, epochs):
    """Per step, one process's rows == process 0's rows followed by process 1's (2 processes),
    and == the concatenation of 4 processes' rows: a pure function of seed and global batch."""
    from dromedary_jax.training import dataset as ds

    lengths = np.random.RandomState(0).randint(3, 40, size=37)
    plan = ds.row_plan(lengths, seq_len=64, pack=pack, shuffle=shuffle, seed=11,
                       num_epochs=epochs)
    global_rows = 4
    steps = ds.num_batches(lengths, seq_len=64, pack=pack, rows_per_batch=global_rows,
                           shuffle=shuffle, seed=11, num_epochs=epochs, process_count=1)
    for count in (2, 4):
        per = global_rows // count
        assert ds.num_batches(lengths, seq_len=64, pack=pack, rows_per_batch=per, shuffle=shuffle,
                              seed=11, num_epochs=epochs, process_count=count) == steps
        for s in range(steps):
            one = ds.host_rows(plan, s, global_rows)
            shares = [ds.host_rows(plan, s, per, p, count) for p in range(count)]
            assert sum(shares, []) == one
    seen = sorted(i for r in plan for i in r)
    assert seen == sorted(list(range(37)) * epochs)  # every example once per epoch
    assert ds.row_plan(lengths, seq_len=64, pack=pack, shuffle=shuffle, seed=11,
                       num_epochs=epochs) == plan  # deterministic
