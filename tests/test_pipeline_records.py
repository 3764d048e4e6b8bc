"""Append-only shards, resume, partial-line repair, config lock, manifest, funnel report."""
import errno
import json
import os

import pytest

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline.records import (Hosts, ShardWriter, StageDir, config_hash, finetune_fingerprint,
                                            model_fingerprint, read_shards, shard_path, stable_int,
                                            stage_done, strip_non_semantic, write_jsonl_atomic)
from dromedary_jax.pipeline.reports.funnel import funnel_steps, write_funnel


def test_shards_resume_and_repair(tmp_path):
    d = str(tmp_path)
    with ShardWriter(d, "recs", Hosts(0, 1)) as w:
        w.append([{"id": "b", "x": 1}, {"id": "a", "x": 2}])
        w.append([{"id": "a", "x": 3}])  # already done: skipped, never duplicated
    path = shard_path(d, "recs", 0, 1)
    assert os.path.basename(path) == "recs-00000-of-00001.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "c", "x"')  # a kill mid-line
    assert [r["id"] for r in read_shards(d, "recs")] == ["a", "b"]  # partial line ignored
    with ShardWriter(d, "recs", Hosts(0, 1)) as w:
        assert w.done == {"a", "b"}
        w.append([{"id": "c", "x": 4}])
    lines = open(path).read().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["b", "a", "c"]
    # another host layout (2 hosts) resumes from the same ids
    with ShardWriter(d, "recs", Hosts(1, 2)) as w:
        assert w.done == {"a", "b", "c"}
        w.append([{"id": "d"}])
    assert [r["id"] for r in read_shards(d, "recs")] == ["a", "b", "c", "d"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    p = shard_path(str(tmp_path), "recs", 0, 1)
    with open(p, "w") as f:
        f.write('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(UserError, match="line 2"):
        read_shards(str(tmp_path), "recs")


def test_hosts_share_is_a_partition():
    items = list(range(11))
    shares = [Hosts(i, 3).share(items) for i in range(3)]
    assert sorted(sum(shares, [])) == items and all(shares)


def test_config_lock_refuses_overwrites_forces(tmp_path):
    wd = str(tmp_path)
    s = StageDir(wd, "st", {"a": 1}, Hosts()).open()
    with s.writer("r") as w:
        w.append([{"id": "x"}])
    StageDir(wd, "st", {"a": 1}, Hosts()).open()  # same config: fine
    with pytest.raises(UserError, match="different config.*overwrite"):
        StageDir(wd, "st", {"a": 2}, Hosts()).open()
    forced = StageDir(wd, "st", {"a": 2}, Hosts(), force=True).open()
    assert [r["id"] for r in forced.records("r")] == ["x"]  # kept, now under the new hash
    fresh = StageDir(wd, "st", {"a": 3}, Hosts(), overwrite=True).open()
    assert fresh.records("r") == [] and fresh.stored_hash() == fresh.hash


def test_manifest_and_hash_helpers(tmp_path):
    s = StageDir(str(tmp_path), "st", {"a": 1}, Hosts()).open()
    assert not s.is_done()
    s.write_manifest({"n": 3}, {})
    assert s.is_done() and s.manifest()["counts"] == {"n": 3}
    assert not StageDir(str(tmp_path), "st", {"a": 2}, Hosts()).is_done()
    assert strip_non_semantic({"batch_size": 4, "x": {"delay_s": 1, "y": 2}}) == {"x": {"y": 2}}
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 2, "b": 2})
    assert stable_int("abc") == stable_int("abc") != stable_int("abd")


def test_funnel_report(tmp_path):
    steps = funnel_steps("generated", 10, [None, "b", "a", None, "a", "zzz"], order=("a", "b"))
    assert steps == [("generated", 10), ("- a", 8), ("- b", 7), ("- zzz", 6)]
    out = write_funnel(str(tmp_path), "stage", [("S", steps)], citations={"candor": 3, "helpful": 5})
    md = open(out["funnel_md"]).read()
    assert "| - a | 8 | 80.0% |" in md and "| helpful | 5 |" in md
    assert open(out["funnel_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_folder_without_outputs_does_not_lock_the_config(tmp_path):
    """A first run that failed before writing a record (e.g. a bad model.checkpoint) must not
    refuse the corrected rerun."""
    wd = str(tmp_path)
    StageDir(wd, "st", {"checkpoint": "/nope"}, Hosts()).open()
    ShardWriter(os.path.join(wd, "st"), "r", Hosts()).close()  # opened, never written
    fixed = StageDir(wd, "st", {"checkpoint": "/ok"}, Hosts()).open()
    assert fixed.stored_hash() == fixed.hash
    with fixed.writer("r") as w:
        w.append([{"id": "x"}])
    with pytest.raises(UserError, match="different config"):
        StageDir(wd, "st", {"checkpoint": "/other"}, Hosts()).open()
    # fine-tune stages: checkpoints lock the folder too, derived files do not
    StageDir(wd, "ft", {"lr": 1}, Hosts()).open()
    write_jsonl_atomic(os.path.join(wd, "ft", "sft_train.jsonl"), [{"id": "a"}])
    StageDir(wd, "ft", {"lr": 2}, Hosts()).open()
    os.makedirs(os.path.join(wd, "ft", "train", "checkpoints", "4"))
    with pytest.raises(UserError, match="different config"):
        StageDir(wd, "ft", {"lr": 3}, Hosts()).open()


def test_stage_done_compares_the_config_hash(tmp_path):
    s = StageDir(str(tmp_path), "st", {"a": 1}, Hosts()).open()
    s.write_manifest({"n": 1}, {})
    assert stage_done(str(tmp_path), "st")["counts"] == {"n": 1}
    assert stage_done(str(tmp_path), "st", s.hash) is not None
    assert stage_done(str(tmp_path), "st", config_hash({"a": 2})) is None


def test_fingerprints_leave_out_bookkeeping_keys():
    from dromedary_jax.pipeline.defaults import get_defaults
    from dromedary_jax.pipeline.finetune import section_fingerprint as fingerprint_of

    c = get_defaults()
    base_model, base_en, base_vc = (model_fingerprint(c.model), fingerprint_of(c.engrave),
                                    fingerprint_of(c.verbose_clone))
    c.model.remat, c.model.mesh, c.model.progress, c.model.batch_size = "full", (1, -1, 1), True, 3
    c.model.delay_s = 0.5
    for sec in (c.engrave, c.verbose_clone):
        t = sec.train
        t.checkpoint.every_steps, t.checkpoint.keep, t.eval.every_steps = 7, 9, 3
        t.metrics.log_every, t.metrics.progress, t.mesh.shape = 1, False, (2, -1, 1)
        t.data.prepared_dir, t.debug.step_sleep_s = "/tmp/x", 1.0
    c.verbose_clone.batch_size = 5
    assert model_fingerprint(c.model) == base_model
    assert fingerprint_of(c.engrave) == base_en and fingerprint_of(c.verbose_clone) == base_vc
    c.model.top_k, c.engrave.train.train.learning_rate = 5, 1e-3
    c.engrave.train.checkpoint.resume_from = "/ckpt"
    assert model_fingerprint(c.model) != base_model
    assert fingerprint_of(c.engrave)["train"]["checkpoint"] == {"resume_from": "/ckpt"}
    assert fingerprint_of(c.engrave) != base_en
    assert "checkpoint" in finetune_fingerprint(c.engrave.train)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_is_a_user_error_and_resumes(tmp_path, monkeypatch, code):
    d = str(tmp_path)
    w = ShardWriter(d, "recs", Hosts())
    w.append([{"id": "a"}])
    real = w._f

    class Full:
        def write(self, text):
            real.write(text[:5])  # part of the batch reaches the file, then the disk is full
            raise OSError(code, os.strerror(code))

        def __getattr__(self, name):
            return getattr(real, name)

    w._f = Full()
    with pytest.raises(UserError, match=r"recs-00000-of-00001.jsonl: .*(no space left|quota).*rerun"):
        w.append([{"id": "b"}, {"id": "c"}])
    w.close()
    with ShardWriter(d, "recs", Hosts()) as w2:  # after freeing space: resumes
        assert w2.done == {"a"}
        w2.append([{"id": "b"}])
    assert [r["id"] for r in read_shards(d, "recs")] == ["a", "b"]
    # derived files too
    import dromedary_jax.pipeline.records as R

    def full_replace(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(R.os, "replace", full_replace)
    with pytest.raises(UserError, match="kept.jsonl: .*rerun"):
        write_jsonl_atomic(os.path.join(d, "kept.jsonl"), [{"id": "a"}])
    monkeypatch.undo()
    assert not [f for f in os.listdir(d) if ".tmp" in f]
