"""Issue 18: progress bars (tokens/s, ETA) on by default, refused config changes name the keys,
metrics.jsonl in step order, MFU peak looked up from the device kind, pluggable metrics writers."""
import json
import logging
import os

import pytest
from test_training import base_cfg, one_device, tiny_model, write_records

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline.records import (
    Hosts,
    StageDir,
    config_changes,
    describe_changes,
)
from dromedary_jax.progress import TokenProgress, progress_bar
from dromedary_jax.training import metrics as metrics_lib
from dromedary_jax.training.config import default_config, validate
from dromedary_jax.training.loop import run_sft
from dromedary_jax.training.metrics import (
    MetricsWriter,
    peak_flops_for,
    read_metrics,
    resolve_peak_flops,
)


@pytest.fixture(autouse=True)
def _bars_allowed(monkeypatch):
    monkeypatch.delenv("DROMEDARY_PROGRESS", raising=False)
    monkeypatch.delenv("DROMEDARY_PROGRESS_INTERVAL_S", raising=False)


# ----------------------------------------------------------------------------- progress
def test_progress_bar_is_plain_lines_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("DROMEDARY_PROGRESS_INTERVAL_S", "0")
    bar = progress_bar(3, desc="demo", unit="step")
    for _ in range(3):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "demo" in err and "3/3" in err
    assert all(line.startswith("demo") for line in err.splitlines())
    monkeypatch.setenv("DROMEDARY_PROGRESS", "0")
    assert progress_bar(3, desc="demo", unit="step") is None
    assert TokenProgress.create(3, desc="demo") is None


def test_sampling_updates_a_callers_bar_with_prompts_and_tokens(capsys):
    import dromedary_jax as dj

    model = tiny_model(0)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11]]
    bar = TokenProgress.create(2 * len(prompts), desc="stage")
    out1 = dj.generate(model, prompts, max_new_tokens=5, batch_size=2, eos_id=-1, progress=bar)
    out2 = dj.generate(model, prompts, max_new_tokens=3, batch_size=4, eos_id=-1, progress=bar)
    # one bar over both calls (not closed by them): every prompt and every generated token
    assert bar.bar.n == 2 * len(prompts)
    assert bar.tokens == sum(map(len, out1 + out2)) == 4 * 5 + 4 * 3
    bar.close()
    assert "tok/s" in capsys.readouterr().err
    # its own bar by default when there is more than one batch, none with progress=False
    dj.generate(model, prompts, max_new_tokens=2, batch_size=2, eos_id=-1)
    assert "sampling" in capsys.readouterr().err
    dj.generate(model, prompts, max_new_tokens=2, batch_size=2, eos_id=-1, progress=False)
    assert capsys.readouterr().err == ""


def test_stage_generation_shows_one_bar_over_its_items(tmp_path):
    from dromedary_jax.pipeline.generation import generate_into
    from dromedary_jax.sampling.settings import SamplingSettings

    ONE_TOKEN = SamplingSettings(max_new_tokens=1)

    class Fake:
        progress = True

        def __init__(self):
            self.bars = []

        def generate(self, prompts, *, ids, progress=None, **kw):
            self.bars.append(progress)
            if progress:
                progress.update(len(prompts), 2 * len(prompts))
            return ["x" * len(p) for p in prompts]

    stage = StageDir(str(tmp_path), "st", {"a": 1}, Hosts()).open()
    items = [{"id": f"i{k}", "prompt": "p" * k} for k in range(5)]
    gen = Fake()
    n = generate_into(stage, "r", items, gen, batch_size=2, seed=0, settings=ONE_TOKEN,
                      make_record=lambda it, text: {"id": it["id"], "text": text})
    assert n == 5 and len(gen.bars) == 3
    bar = gen.bars[0]
    assert isinstance(bar, TokenProgress) and all(b is bar for b in gen.bars)
    assert bar.bar.n == 5 and bar.tokens == 10
    gen.progress = False  # progress off: the generator is called without a bar
    stage2 = StageDir(str(tmp_path), "st2", {"a": 1}, Hosts()).open()
    gen.bars = []
    generate_into(stage2, "r", items, gen, batch_size=5, seed=0, settings=ONE_TOKEN,
                  make_record=lambda it, text: {"id": it["id"], "text": text})
    assert gen.bars == [None]


def test_pipeline_progress_is_on_by_default():
    from dromedary_jax.pipeline.defaults import get_defaults

    assert get_defaults().model.progress is True
    assert default_config().metrics.progress is True


def test_scoring_progress_counts_tokens(capsys):
    from dromedary_jax.eval import loglikelihoods

    model = tiny_model(0)
    reqs = [([1, 5, 6], [7, 8]), ([1, 9], [10]), ([1, 11, 12, 13], [14, 15, 16])]
    quiet = loglikelihoods(model, reqs, batch_size=2, row_length=8)
    assert capsys.readouterr().err == ""
    shown = loglikelihoods(model, reqs, batch_size=2, row_length=8, progress=True)
    assert shown == quiet
    err = capsys.readouterr().err
    assert "scoring" in err and "tok/s" in err


# ----------------------------------------------------------------------------- refusals
def test_refused_config_change_names_the_changed_keys(tmp_path):
    wd = str(tmp_path)
    old = {"model": {"preset": "tiny", "dtype": "float32"}, "self_align": {"temperature": 0.5},
           "drop": ["a"]}
    s = StageDir(wd, "st", old, Hosts()).open()
    with s.writer("r") as w:
        w.append([{"id": "x"}])
    new = {"model": {"preset": "small", "dtype": "float32"}, "self_align": {"temperature": 0.7},
           "drop": ("a", "b"), "extra": 1}
    with pytest.raises(UserError) as e:
        StageDir(wd, "st", new, Hosts()).open()
    msg = str(e.value)
    assert "\n" not in msg and "--config.overwrite=True" in msg
    assert 'model.preset: "tiny" -> "small"' in msg
    assert "self_align.temperature: 0.5 -> 0.7" in msg
    assert 'drop: ["a"] -> ["a", "b"]' in msg and "extra: (absent) -> 1" in msg
    assert "dtype" not in msg  # unchanged keys are not listed
    # the manifest records the fingerprint too, and a finished folder is refused the same way
    s.write_manifest({"n": 1}, {})
    assert s.manifest()["fingerprint"] == old
    assert StageDir(wd, "st", new, Hosts()).changes_from_stored()[0].startswith("drop:")


def test_refusal_of_an_old_folder_says_the_keys_are_unknown(tmp_path):
    wd = str(tmp_path)
    s = StageDir(wd, "st", {"a": 1}, Hosts()).open()
    with s.writer("r") as w:
        w.append([{"id": "x"}])
    s.write_manifest({"n": 1}, {})
    for name in ("config.json", "manifest.json"):  # as versions without "fingerprint" wrote them
        p = os.path.join(wd, "st", name)
        with open(p) as f:
            d = json.load(f)
        d.pop("fingerprint")
        with open(p, "w") as f:
            json.dump(d, f)
    with pytest.raises(UserError, match="changed keys unknown: this folder was written by an "
                                        "older version"):
        StageDir(wd, "st", {"a": 2}, Hosts()).open()


def test_config_changes_lists_and_truncates():
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1}}) == []
    assert config_changes({"a": (1, 2)}, {"a": [1, 2]}) == []  # a tuple stored as a list
    assert config_changes({"a": {"b": 1}}, {"a": 2}) == ['a: (absent) -> 2', 'a.b: 1 -> (absent)']
    long = config_changes({"t": "x" * 200}, {"t": "y"})[0]
    assert long.endswith('-> "y"') and "..." in long and len(long) < 90
    many = describe_changes({f"k{i}": 0 for i in range(12)}, {f"k{i}": 1 for i in range(12)})
    assert many.count("->") == 8 and many.endswith("and 4 more")


def test_finetune_refusal_names_old_and_new_values(tmp_path):
    from dromedary_jax.training.loop import RUN_INFO, _check_run_info

    with open(tmp_path / RUN_INFO, "w") as f:
        json.dump({"batch_size": 8, "max_len": 64, "lora": True}, f)
    with pytest.raises(UserError, match=r"batch_size: 8 -> 4; grad_accum: \(not recorded\) -> 1"):
        _check_run_info(str(tmp_path), {"batch_size": 4, "max_len": 64, "lora": True,
                                        "grad_accum": 1})


# ----------------------------------------------------------------------------- MFU peak
@pytest.mark.parametrize("kind,flops", [
    ("TPU v2", 22.5e12), ("TPU v3", 61.5e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10", 125e12),
    ("cpu", None), ("TPU v4 lite", None), ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_flops_lookup(kind, flops):
    assert peak_flops_for(kind) == flops


def test_resolve_peak_flops_configured_and_unknown():
    assert resolve_peak_flops(1e11, "cpu")[0] == 1e11  # set by hand: wins
    assert resolve_peak_flops(0.0, "TPU v4")[0] == 275e12
    peak, note = resolve_peak_flops(0.0, "cpu")
    assert peak is None
    assert "MFU is not reported" in note and "metrics.peak_flops" in note and "'cpu'" in note


# ----------------------------------------------------------------------------- metrics writers
class FakeWriter:
    made: list = []

    def __init__(self, workdir, run_config):
        self.workdir, self.run_config = workdir, run_config
        self.rows, self.closed = [], False
        FakeWriter.made.append(self)

    def write_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_writer():
    FakeWriter.made = []
    metrics_lib.register_writer("fake", FakeWriter)
    yield FakeWriter
    metrics_lib.unregister_writer("fake")


def _with_writers(writers):
    import ml_collections

    d = default_config().to_dict()
    d["metrics"]["writers"] = writers
    return ml_collections.ConfigDict(d)


def test_writers_are_checked_before_the_run(fake_writer):
    validate(_with_writers(("fake",)))  # registered: fine
    validate(_with_writers(()))  # the default: none
    with pytest.raises(UserError, match=r"^metrics\.writers: unknown writer 'nope'"):
        validate(_with_writers(("nope",)))
    with pytest.raises(UserError, match="must be a tuple of writer names"):
        validate(_with_writers("fake"))
    with pytest.raises(UserError, match=r"^config\.engrave\.train\.metrics\.writers: unknown"):
        validate(_with_writers(("nope",)), "config.engrave.train.")
    import importlib.util

    for name, pkg in (("wandb", "wandb"), ("clu", "clu")):
        if importlib.util.find_spec(pkg) is None:  # not installed here: a clear error, no import
            with pytest.raises(UserError, match=f"needs the {pkg} package.*pip install {pkg}"):
                validate(_with_writers((name,)))


def test_writer_lines_are_sorted_by_step_then_train_before_eval(tmp_path, fake_writer, caplog):
    w = MetricsWriter(str(tmp_path), tensorboard=False, writers=("fake",))
    w.write_many([(2, {"loss": 1.0}), (1, {"eval_loss": 3.0}), (1, {"loss": 2.0})])
    w.write(2, {"eval_loss": 2.5})
    with caplog.at_level(logging.WARNING, "dromedary_jax.training"):
        w.write(1, {"loss": 9.0})  # out of order: still written, and said once
    w.close()
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], sorted(k for k in r if k != "step")) for r in rows] == [
        (1, ["loss"]), (1, ["eval_loss"]), (2, ["loss"]), (2, ["eval_loss"]), (1, ["loss"])]
    assert "a line of step 1 is written after step 2" in caplog.text
    fake = fake_writer.made[0]
    assert [s for s, _ in fake.rows] == [1, 1, 2, 2, 1] and fake.closed


def test_tiny_run_metrics_order_writers_and_mfu_note(tmp_path, sp_tokenizer, fake_writer, caplog,
                                                     capsys):
    train = write_records(tmp_path / "t.jsonl", 12, seed=3)
    held = write_records(tmp_path / "h.jsonl", 3, seed=4, start=100)
    cfg = base_cfg(batch_size=4, num_steps=7, learning_rate=1e-3)
    cfg.data.pack = False
    cfg.metrics.log_every = 3
    cfg.metrics.progress = True
    cfg.metrics.writers = ("fake",)
    cfg.eval.every_steps = 2
    cfg.eval.batch_size = 4
    cfg.checkpoint.every_steps = 3
    with caplog.at_level(logging.INFO, "dromedary_jax.training"):
        res = run_sft(cfg, tiny_model(0), sp_tokenizer, [train], str(tmp_path / "w"),
                      eval_files=[held], mesh=one_device())
    rows = read_metrics(res.metrics_path)
    keys = [(r["step"], 1 if "eval_loss" in r else 0) for r in rows]
    assert keys == sorted(keys)  # step order; within a step the train line first
    assert [s for s, e in keys if e] == [2, 4, 6, 7]  # eval every 2 steps and at the end
    assert [s for s, e in keys if not e] == list(range(1, 8))  # one train line per step
    assert [r["step"] for r in rows if "tokens_per_s" in r] == [3, 6, 7]  # log_every + the end
    # CPU: no peak known, so no MFU, and one log line says how to get it
    assert not any("mfu" in r for r in rows)
    notes = [r.getMessage() for r in caplog.records if "MFU" in r.getMessage()]
    assert len(notes) == 1 and "metrics.peak_flops" in notes[0]
    # the registered writer got every scalar line, in the same order, and was closed
    fake = fake_writer.made[0]
    assert [s for s, _ in fake.rows] == [r["step"] for r in rows] and fake.closed
    assert fake.run_config["metrics"]["writers"] in (("fake",), ["fake"])
    assert fake.rows[-1][1].keys() == {"eval_loss"}
    # the progress bar ended at 7/7 steps with the loss and tokens/s
    err = capsys.readouterr().err
    assert "7/7" in err and "tok/s" in err and "loss" in err
