"""The record formats of docs/records.md stay readable: tests/data/records_v0_1 holds the stage
1-2 folders (shards, config.json, manifest.json, derived files; funnel.png, run_stats.json and
the lock left out) that main at 9ab2cd2 wrote with

    python -m dromedary_jax.run --config configs/stages12_tiny.py --workdir /tmp/fx \\
        --config.self_align.max_questions=6 --config.self_instruct.topics.rounds=1 \\
        --config.self_instruct.questions.max_prompts=4 \\
        --config.self_instruct.vanilla.num_instructions=8 --config.self_instruct.vanilla.max_rounds=2

The current code must read every shard and manifest, see both stages as done under the same
config (the fingerprints did not change), and skip them without rewriting a byte."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "records_v0_1")
OVERRIDES = {"self_align.max_questions": 6, "self_instruct.topics.rounds": 1,
             "self_instruct.questions.max_prompts": 4,
             "self_instruct.vanilla.num_instructions": 8, "self_instruct.vanilla.max_rounds": 2}


def _config():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "stages12_tiny", os.path.join(os.path.dirname(__file__), "..", "configs", "stages12_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for dotted, value in OVERRIDES.items():
        *parents, last = dotted.split(".")
        node = c
        for k in parents:
            node = node[k]
        node[last] = value
    return c


def _digests(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def old_workdir(tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(FIXTURE, wd)
    return wd


def test_old_shards_and_manifests_read(old_workdir):
    from dromedary_jax.pipeline.records import read_shards, shard_paths, stage_done

    expected = {"self_instruct": {"topics": 20, "questions": None, "vanilla": None},
                "self_align": {"responses": 6}}
    for stage, names in expected.items():
        manifest = stage_done(old_workdir, stage)
        assert manifest is not None and manifest["stage"] == stage
        for name, n in names.items():
            paths = shard_paths(os.path.join(old_workdir, stage), name)
            assert [os.path.basename(p) for p in paths] == [f"{name}-00000-of-00001.jsonl"]
            recs = read_shards(os.path.join(old_workdir, stage), name)
            lines = sum(1 for line in open(paths[0]) if line.strip())
            assert len(recs) == lines > 0 and all("id" in r for r in recs)
            if n is not None:
                assert len(recs) == n
    responses = read_shards(os.path.join(old_workdir, "self_align"), "responses")
    assert {"id", "prompt_id", "prefix_id", "question", "raw", "thoughts", "answer", "filter",
            "cleaning", "cited_principles"} <= set(responses[0])
    counts = stage_done(old_workdir, "self_align")["counts"]
    assert counts["generated"] == 6 and counts["kept"] == 4


def test_old_stages_are_done_and_skipped_unchanged(old_workdir, capsys):
    from dromedary_jax.run import run_stages

    before = _digests(old_workdir)
    old_counts = {s: json.load(open(os.path.join(old_workdir, s, "manifest.json")))["counts"]
                  for s in ("self_instruct", "self_align")}
    out = run_stages(_config(), old_workdir, ["self_instruct", "self_align"], report=False)
    assert "already done, skipped" in capsys.readouterr().out
    assert out == old_counts
    after = _digests(old_workdir)
    assert {k: v for k, v in after.items() if k in before} == before
