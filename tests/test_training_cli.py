"""The fine-tune CLI: a run killed with SIGKILL resumes exactly; bad input is one error line."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import tiny_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12  # 24 examples x 2 epochs, one example per row, 4 rows per step
KILL_AFTER = 4


def write_records(path, n):
    lines = tiny_corpus(2 * n + 10, seed=7)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "prompt": lines[2 * i],
                                "response": lines[2 * i + 1]}) + "\n")
    return str(path)


def cli(workdir, train, tokenizer, cache_dir, *extra):
    args = [sys.executable, "-m", "dromedary_jax.train",
            f"--config={ROOT}/configs/sft_tiny.py:train={train},tokenizer={tokenizer}",
            f"--workdir={workdir}",
            "--config.data.max_len=64", "--config.data.pack=False",
            "--config.data.num_epochs=2", "--config.train.batch_size=4",
            "--config.train.learning_rate=3e-3", "--config.train.warmup_steps=2",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3",
            "--config.eval.every_steps=0", "--config.metrics.progress=False",
            "--config.metrics.log_every=3", "--config.metrics.log_example_ids=True",
            "--config.metrics.tensorboard=False",
            "--config.mesh.shape=(1,1,1)", "--config.export.format=none", *extra]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return args, env


def final_params(workdir):
    import orbax.checkpoint as ocp

    state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(STEPS),
                                                          "state"))
    return {k: np.asarray(v) for k, v in state["params"].items()}


def ids_per_step(workdir):
    """step -> example ids of that step; a later line (after a resume) replaces an earlier."""
    out, order = {}, []
    with open(os.path.join(workdir, "examples_seen-0.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["ids"]
            order.append(rec["step"])
    return out, order


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, sp_model_path):
    train = write_records(tmp_path / "train.jsonl", 24)
    cache = tmp_path / "jax_cache"

    # uninterrupted
    args, env = cli(tmp_path / "full", train, sp_model_path, cache)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done: {STEPS} steps" in done.stdout

    # killed for real once the step-KILL_AFTER checkpoint is committed
    work = tmp_path / "killed"
    args, env = cli(work, train, sp_model_path, cache, "--config.debug.step_sleep_s=0.4")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = work / "checkpoints" / str(KILL_AFTER)
    deadline = time.time() + 240
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "checkpoints" / str(STEPS)).exists()
    steps_before, _ = ids_per_step(work)
    assert KILL_AFTER <= max(steps_before) < STEPS

    # resume in the same workdir
    args, env = cli(work, train, sp_model_path, cache)
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]

    full, resumed = final_params(tmp_path / "full"), final_params(work)
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], atol=1e-6, rtol=0)
    want, _ = ids_per_step(tmp_path / "full")
    got, order = ids_per_step(work)
    assert got == want  # each step saw the same examples as in the uninterrupted run
    assert order == list(range(1, STEPS + 1))  # the lines after the checkpoint were rewritten once
    seen = sorted(i for s in range(1, STEPS + 1) for row in got[s] for i in row)
    assert seen == sorted(list(range(24)) * 2)  # none twice per epoch, none skipped
    # metrics (every 3 steps, checkpoints every 2: the steps up to a checkpoint are flushed before
    # it is saved) equal the uninterrupted run's line for line, timing fields aside
    from dromedary_jax.training.metrics import read_metrics, without_timing

    got_m, want_m = (without_timing(read_metrics(os.path.join(d, "metrics.jsonl")))
                     for d in (work, tmp_path / "full"))
    assert got_m == want_m and [m["step"] for m in got_m] == list(range(1, STEPS + 1))


def test_cli_bad_input_is_one_error_line(tmp_path, sp_model_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    args, env = cli(tmp_path / "w", str(bad), sp_model_path, tmp_path / "cache")
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and f"{bad}:2: malformed JSON" in lines[-1]
    assert not any("Traceback" in ln for ln in lines)


@pytest.mark.parametrize("arg,message", [
    ("--config.train.learnign_rate=1", 'error: config.train.learnign_rate: unknown key (Did you '
                                       'mean "learning_rate"'),
    ("--config.train.learning_rate=fast", "error: flag --config.train.learning_rate=fast: could "
                                          "not convert string to float"),
    ("--config=configs/no_such_file.py", "error: --config: "),
    ("--workdir=gs://bucket/run1", "error: --workdir gs://bucket/run1: URLs are not supported"),
])
def test_cli_bad_flags_are_one_error_line(tmp_path, arg, message):
    args, env = cli(tmp_path / "w", "unused.jsonl", "unused.model", tmp_path / "cache", arg)
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert lines[-1].startswith(message), lines[-1]
    assert not any("Traceback" in ln for ln in lines)
