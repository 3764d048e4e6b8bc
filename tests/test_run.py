"""The whole pipeline through the runner CLI: outputs, resume/skip, kill-and-resume in stages 3 and
4, one-line config errors, --dry_run, ablation configs."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/demo.py:smoke"
STAGES = ("self_instruct", "self_align", "engrave", "verbose_clone")
# keep each training step long enough that a kill lands between two checkpoints
SLOW_TRAIN = ["--config.engrave.train.debug.step_sleep_s=0.7",
              "--config.verbose_clone.train.debug.step_sleep_s=0.7"]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    # no progress bars: these tests read stderr line by line (tests/test_progress_metrics.py
    # checks the bars)
    env["DROMEDARY_PROGRESS"] = "0"
    return env


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dromedary_jax.run", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _params(path):
    import dromedary_jax as dj

    return {k: np.asarray(v) for k, v in dj.load_model(path).params.items()}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted run of the smoke config (the reference for the other tests)."""
    wd = str(tmp_path_factory.mktemp("run") / "ref")
    res = run_cli("--config", SMOKE, "--workdir", wd)
    assert res.returncode == 0, res.stderr[-3000:]
    return wd, res


def test_every_stage_writes_records_and_report(smoke_run):
    wd, res = smoke_run
    for stage in STAGES:
        with open(os.path.join(wd, stage, "manifest.json")) as f:
            assert json.load(f)["done"] is True
        assert f"== stage {stage}: running" in res.stdout
    assert "NOTE: demo config: toy settings for a tiny RANDOMLY initialised model" in res.stdout
    def lines(*p):
        with open(os.path.join(wd, *p)) as f:
            return [json.loads(x) for x in f if x.strip()]
    assert len(lines("self_instruct", "topics.jsonl")) > 0
    assert len(lines("self_align", "kept.jsonl")) == 4
    assert len(lines("verbose_clone", "kept.jsonl")) > 0
    assert len(lines("engrave", "train", "metrics.jsonl")) > 0
    for p in ("report.md", "training_curves.png", "engrave/model/dromedary_checkpoint.json",
              "verbose_clone/model/dromedary_checkpoint.json", "verbose_clone/hf/config.json",
              "engrave/adapter/adapter_config.json", "verbose_clone/adapter/adapter_config.json"):
        assert os.path.exists(os.path.join(wd, p)), p
    report = open(os.path.join(wd, "report.md")).read()
    assert "| verbose_clone | done |" in report and "Before / after alignment" in report
    assert "filters are relaxed" in report


def test_final_hf_export_loads_in_transformers(smoke_run):
    import torch
    import transformers

    import dromedary_jax as dj

    wd, _ = smoke_run
    hf = transformers.LlamaForCausalLM.from_pretrained(os.path.join(wd, "verbose_clone", "hf")).eval()
    ours = dj.load_model(os.path.join(wd, "verbose_clone", "model"))
    ids = np.arange(3, 40, dtype=np.int32)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(dj.logits(ours, ids), ref, atol=1e-4, rtol=0)


def test_lora_stages_write_their_trained_adapters_as_peft_folders(smoke_run):
    """<stage>/adapter (PEFT adapter folder) holds the trained adapters: the base model plus
    (lora_alpha / r) * lora_B @ lora_A is the merged model the stage saved in <stage>/model.
    (tests/test_peft_export.py checks that PEFT loads such a folder.)"""
    import importlib.util

    from safetensors.numpy import load_file

    from dromedary_jax.checkpoint.hf_mapping import hf_tensors_from_params
    from dromedary_jax.pipeline.defaults import complete
    from dromedary_jax.pipeline.resources import load_model_and_tokenizer

    wd, _ = smoke_run
    spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(ROOT, "configs", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = complete(mod.get_config("smoke"))
    base, _ = load_model_and_tokenizer(config.model, seed=config.seed, workdir=wd)
    c = base.config
    base_hf = hf_tensors_from_params({k: np.asarray(v, np.float32) for k, v in base.params.items()}, c)
    for stage in ("engrave", "verbose_clone"):
        lora = config[stage].train.lora
        with open(os.path.join(wd, stage, "adapter", "adapter_config.json")) as f:
            acfg = json.load(f)
        assert (acfg["r"], acfg["lora_alpha"], acfg["base_model_name_or_path"]) == (lora.rank, lora.alpha, None)
        ad = load_file(os.path.join(wd, stage, "adapter", "adapter_model.safetensors"))
        assert any(np.abs(v).max() > 0 for k, v in ad.items() if "lora_B" in k)  # trained, not the init
        merged = hf_tensors_from_params(_params(os.path.join(wd, stage, "model")), c)
        used = 0
        for key, w in merged.items():
            pre = "base_model.model." + key[: -len(".weight")]
            want = base_hf[key]
            if pre + ".lora_A.weight" in ad:
                want = want + acfg["lora_alpha"] / acfg["r"] * (ad[pre + ".lora_B.weight"] @ ad[pre + ".lora_A.weight"])
                used += 2
            np.testing.assert_allclose(w, want, atol=1e-5, rtol=0, err_msg=f"{stage}: {key}")
        assert used == len(ad) == 2 * len(lora.targets) * c.num_layers


def test_second_run_skips_every_stage(smoke_run):
    wd, _ = smoke_run
    res = run_cli("--config", SMOKE, "--workdir", wd)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in STAGES:
        assert f"== stage {stage}: already done, skipped" in res.stdout


def test_bookkeeping_changes_keep_stages_done_and_dry_run_flags_real_changes(smoke_run):
    wd, _ = smoke_run
    res = run_cli("--config", SMOKE, "--workdir", wd, "--config.model.remat=full",
                  "--config.model.batch_size=3", "--config.engrave.train.checkpoint.every_steps=3",
                  "--config.verbose_clone.train.eval.every_steps=5", "--config.verbose_clone.batch_size=2")
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in STAGES:
        assert f"== stage {stage}: already done, skipped" in res.stdout
    res = run_cli("--config", SMOKE, "--workdir", wd, "--dry_run",
                  "--config.engrave.train.train.learning_rate=0.0123", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    plan = {ln.split()[1]: ln for ln in res.stdout.splitlines() if ln.strip()[:2] in ("1.", "2.", "3.", "4.")}
    assert "[done (skip)]" in plan["self_align"] and "[done (skip)]" in plan["verbose_clone"], plan
    assert "[done, but the config changed: refused unless --config.overwrite/force]" in plan["engrave"], plan


def _run_until(args, ready, timeout=300, sig=signal.SIGKILL):
    """Start the runner, send ``sig`` as soon as ready() is true; returns (killed?, exit code,
    stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "dromedary_jax.run", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    killed = False
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(sig)
                killed = True
                break
            time.sleep(0.1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return killed, proc.returncode, err


def _has_checkpoint(path):
    return lambda: os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def _has_lines(path, n):
    def ready():
        try:
            with open(path, "rb") as f:
                return f.read().count(b"\n") >= n
        except FileNotFoundError:
            return False
    return ready


SKIP_DIRS = {"checkpoints", "tensorboard", "data", "tokenizer", "model", "hf", "adapter"}  # compared apart


def outputs(wd):
    """Every output file of a run, normalised for comparison: record shards as their records
    sorted by id, other JSONL/JSON files parsed (metrics without timing fields), text files as
    text; the workdir's own path replaced by "WD". Checkpoints, TensorBoard events, the prepared
    dataset, images and measured wall times / memory (run_stats.json, the report's table of
    them) are left out; models are compared by their parameters."""
    from dromedary_jax.training.metrics import without_timing

    out = {}
    for root, dirs, files in os.walk(wd):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, wd)
            if name.endswith(".png") or name.startswith(".dromedary.lock") \
                    or name == "run_stats.json":
                continue
            text = open(path, encoding="utf-8").read().replace(wd, "WD")
            if name.endswith(".jsonl"):
                rows = [json.loads(x) for x in text.splitlines() if x.strip()]
                if "-of-" in name:
                    rows = sorted(rows, key=lambda r: r["id"])
                out[rel] = without_timing(rows) if name == "metrics.jsonl" else rows
            elif name.endswith(".json"):
                out[rel] = json.loads(text)
                if name == "run_info.json":  # hashes the demo tokenizer, trained into each
                    out[rel].pop("data_fingerprint")  # workdir (its file records its own path)
            else:  # the report's time and memory table holds measurements
                out[rel] = re.sub(r"## Time and memory\n.*?(?=\n## |\Z)", "", text, flags=re.S)
    return out


@pytest.mark.slow
def test_kills_in_every_stage_then_resume_equal_uninterrupted(smoke_run, tmp_path):
    """SIGKILL in stage 1 (between two flushed batches), SIGTERM in stage 3 (one line, exit 143),
    SIGKILL in stage 4, each after a checkpoint; the resumed run's every output file (records,
    derived files, metrics minus timing, manifests, report) and final models equal the
    uninterrupted run's."""
    ref, _ = smoke_run
    wd = str(tmp_path / "killed")
    args = ["--config", SMOKE, "--workdir", wd, *SLOW_TRAIN]
    killed, code, _ = _run_until(args, _has_lines(os.path.join(wd, "self_instruct",
                                                              "topics-00000-of-00001.jsonl"), 8))
    assert killed and code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(wd, "self_instruct", "manifest.json"))
    killed, code, err = _run_until(args, _has_checkpoint(os.path.join(wd, "engrave", "train", "checkpoints")),
                                   sig=signal.SIGTERM)
    assert killed and code == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"[IWE]\d{4} ", ln)
             and "Warning" not in ln and "warn(" not in ln]
    assert lines == ["interrupted (SIGTERM): what was finished is saved; run the same command "
                     "again to resume"], err[-3000:]
    assert not os.path.exists(os.path.join(wd, "engrave", "manifest.json"))
    killed, code, _ = _run_until(args, _has_checkpoint(os.path.join(wd, "verbose_clone", "train", "checkpoints")))
    assert killed and code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(wd, "verbose_clone", "manifest.json"))
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "== stage engrave: already done, skipped" in res.stdout
    got, want = outputs(wd), outputs(ref)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert got[rel] == want[rel], rel
    for stage in ("engrave", "verbose_clone"):
        got, want = _params(os.path.join(wd, stage, "model")), _params(os.path.join(ref, stage, "model"))
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=f"{stage}/{k}")
    from safetensors.numpy import load_file

    got, want = (load_file(os.path.join(d, "verbose_clone", "hf", "model.safetensors")) for d in (wd, ref))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=f"hf/{k}")


@pytest.mark.parametrize("extra, needle", [
    (["--config.self_align.temprature=0.3"], "temprature"),
    (["--config.self_align.max_new_tokens=many"], "max_new_tokens"),
    (["--config.model.checkpoint=/no/such/llama", "--config.model.preset="], "/no/such/llama"),
    (["--stages", "engrave"], "needs stage self_align"),
    (["--config.model.preset=llama-8b"], "unknown model preset 'llama-8b'"),
    (["--config.model.mesh=(3,-1,1)"], "does not divide the 1 available devices"),
])
def test_bad_config_gets_one_line_error(tmp_path, extra, needle):
    res = run_cli("--config", SMOKE, "--workdir", str(tmp_path / "wd"), *extra, timeout=120)
    assert res.returncode == 2, (res.stdout[-500:], res.stderr[-2000:])
    err = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln
           and "libtpu" not in ln]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], res.stderr[-2000:]


def test_dry_run_prints_mesh_memory_and_plan():
    res = run_cli("--config", "configs/dromedary_65b.py", "--dry_run", "--devices", "256", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "== mesh: {'data': 1, 'fsdp': 64, 'tensor': 4}" in out
    assert "parameters: 65.286 B" in out and "per device" in out and "KV cache" in out
    assert "4. verbose_clone" in out and "LoRA r=16" in out


def test_ablation_configs_change_only_the_principle_set():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import ablation

    base = ablation.get_config("")
    drop = ablation.get_config("drop=candor")
    none = ablation.get_config("base=demo,no_exemplars")
    assert tuple(drop.self_align.drop_principles) == ("candor",)
    assert none.self_align.num_exemplars == 0
    base.self_align.drop_principles = ("candor",)
    assert base.to_dict() == drop.to_dict()
    assert len(ablation.ablations()) == 18
    with pytest.raises(ValueError, match="not a principle"):
        ablation.get_config("drop=kindness")


def test_ablation_sweep_dry_run_lists_every_run(tmp_path):
    res = subprocess.run([sys.executable, "experiments/ablation_sweep.py", "--root", str(tmp_path),
                          "--dry_run"], cwd=ROOT, capture_output=True, text=True, check=True)
    cmds = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    assert len(cmds) == 18 and "drop=candor" in res.stdout and "no_exemplars" in res.stdout
    assert all(sys.executable in ln for ln in cmds)  # local runs: this interpreter
    res = subprocess.run([sys.executable, "experiments/ablation_sweep.py", "--root", "/mnt/sweep",
                          "--only", "control", "--launcher", "experiments/tpu/launch.sh --name x "
                          "--zone z --accelerator v4-8 --", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    (cmd,) = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    assert "--accelerator v4-8 -- python3 -m dromedary_jax.run" in cmd and sys.executable not in cmd


def test_evaluate_stage_scores_every_model_and_reports(smoke_run, tmp_path, capsys):
    """Stage 5 on the finished smoke run (BIG-bench-format fixtures): one result file per model
    with the eval CLI's question-set fingerprint, the report's table and chart, the printed
    table; a rerun skips it."""
    import shutil

    from dromedary_jax.eval.hhh import load_hhh, question_set as hhh_set
    from dromedary_jax.eval.truthfulqa import load_truthfulqa, question_set as tqa_set
    from dromedary_jax.run import main

    wd = str(tmp_path / "wd")
    shutil.copytree(smoke_run[0], wd)
    tqa = os.path.join(ROOT, "tests", "data", "eval", "bigbench_truthful_qa", "questions.json")
    hhh_dir = os.path.join(ROOT, "tests", "data", "eval", "hhh")
    args = ["run", "--config", os.path.join(ROOT, "configs", "demo.py") + ":smoke",
            "--workdir", wd, "--stages", "evaluate", f"--config.evaluate.truthfulqa={tqa}",
            f"--config.evaluate.hhh={hhh_dir}", "--config.evaluate.max_hhh=3",
            "--config.evaluate.num_samples=1", "--config.evaluate.sample_max_new_tokens=4"]
    main(args)
    out = capsys.readouterr().out
    assert "base vs aligned:" in out and "| verbose-cloned (stage 4) |" in out
    want_tqa = tqa_set(load_truthfulqa(tqa))
    want_hhh = hhh_set(load_hhh(hhh_dir)[:3])
    for name in ("base", "engrave", "verbose_clone"):
        with open(os.path.join(wd, "evaluate", f"{name}.json")) as f:
            res = json.load(f)
        assert {k: res["truthfulqa"][k] for k in ("n", "fingerprint")} == want_tqa
        assert {k: res["hhh"][k] for k in ("n", "fingerprint")} == want_hhh
        assert 0.0 <= res["truthfulqa"]["mc1"] <= 1.0 and len(res["samples"]) == 1
    report = open(os.path.join(wd, "report.md")).read()
    assert "## Evaluation: base vs aligned" in report and "WARNING" not in report
    assert os.path.exists(os.path.join(wd, "evaluation.png"))
    assert os.path.exists(os.path.join(wd, "evaluate", "run_stats.json"))
    main(args)
    assert "== stage evaluate: already done, skipped" in capsys.readouterr().out
