"""Multi-process correctness: 2 processes x 4 fake CPU devices (jax.distributed on 127.0.0.1,
gloo collectives) against the same work done by this single test process (8 fake devices).

(a) the trainer: a LoRA fine-tune of 2 steps with Orbax checkpoints, then a second run that
    restores from them (``checkpoint.resume_from``) and trains to step 4 (two shuffled epochs);
    each host reads its own rows of every step of the global data order. The final adapters must
    equal the single-process ones within 1e-6.
(b) the runner's stage 2 (self_align, tiny model, shared-prefix sampling): each host generates
    its share into its own record shard, the manifest is written once, and the records must be
    identical to the single-process run. The share is uneven (5 questions, batch 2), so hosts
    make different numbers of batches: the stage must not hang. The same stage with the
    continuous engine (2 slots per host: host 0 refills a slot while host 1 has nothing left)
    gives the same records.
(d) ``dj.generate_text`` with the continuous engine: each host passes its own share of 9
    prompts (5 and 4) to its 4 slots; host 0 refills while host 1 has nothing left, both gather
    their tails into fewer slots, stop strings end rows between chunks; the texts equal the
    single-process ones.
(c) eval scoring (``dj.eval.loglikelihoods``, shared preamble): every host runs the same call
    and gets every score, equal to the single-process scores within 1e-5; and the eval CLI
    (TruthfulQA MC, and sampled answers that each host generates a share of) gives the
    single-process results, written and printed by process 0 only.
Logs and progress bars appear only on process 0.

The worker is this file run as a script: ``python tests/test_multihost.py worker OUT TOKENIZER``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
MESH = (1, 4, 2)  # fsdp spans both processes, tensor inside each
NUM_EXAMPLES = 8


# ----------------------------------------------------------------------------- shared work
def write_sft_data(path: str) -> None:
    words = "the assistant answers every question with care and honesty".split()
    with open(path, "w") as f:
        for i in range(NUM_EXAMPLES):
            prompt = " ".join(words[(i + j) % len(words)] for j in range(4 + i % 3))
            f.write(json.dumps({"id": f"ex{i}", "prompt": prompt,
                                "response": " ".join(reversed(prompt.split()))}) + "\n")


def sft_config(num_steps: int, resume_from: str = ""):
    from dromedary_jax import training

    cfg = training.default_config()
    cfg.data.max_len = 64
    cfg.data.pack = False     # one example per row
    cfg.data.shuffle = True   # ONE global order (not one per host): 1 and 2 processes train on
    cfg.train.batch_size = 4  # the same 4 rows a step, 2 from each host, a new order each epoch
    cfg.train.num_steps = num_steps
    cfg.train.learning_rate = 1e-3
    cfg.train.schedule = "constant"
    cfg.lora.enabled = True
    cfg.lora.rank = 4
    cfg.checkpoint.every_steps = 1
    cfg.checkpoint.resume_from = resume_from
    cfg.metrics.log_every = 1
    cfg.metrics.tensorboard = False
    cfg.metrics.progress = True
    cfg.mesh.shape = MESH
    return cfg


def train_and_resume(workdir: str, data_file: str, tokenizer_path: str) -> dict:
    """2 steps, then a new run restored from those checkpoints that trains to step 4; returns the
    final LoRA adapters as numpy (gathered from every host)."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    from dromedary_jax import training
    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama
    from dromedary_jax.sharding import make_mesh
    from dromedary_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    mesh = make_mesh(MESH)
    model = Llama(preset("tiny"), rngs=nnx.Rngs(0), mesh=mesh)
    first = os.path.join(workdir, "first")
    training.run_sft(sft_config(2), model, tok, [data_file], first)
    result = training.run_sft(sft_config(4, os.path.join(first, "checkpoints")), model, tok,
                              [data_file], os.path.join(workdir, "resumed"))
    assert result.step == 4
    lora = result.lora
    if jax.process_count() > 1:
        lora = multihost_utils.process_allgather(lora, tiled=True)
    return {f"{k}.{ab}": np.asarray(v) for k, d in lora.items() for ab, v in d.items()}


def pipeline_config(tokenizer_path: str, engine: str = "static"):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.model.tokenizer = tokenizer_path
    c.model.mesh = MESH
    c.self_align.max_questions = 5
    c.self_align.batch_size = 2  # host 0: 3 questions = 2 calls; host 1: 2 questions = 1 call
    c.model.batch_size = 4
    if engine == "continuous":
        c.model.engine = engine
        c.model.batch_size = 2  # slots per host: host 0 (3 questions) refills one
    return c


def self_align(workdir: str, tokenizer_path: str, engine: str = "static") -> dict:
    from dromedary_jax.run import run_stages

    return run_stages(pipeline_config(tokenizer_path, engine), workdir, ["self_align"],
                      report=False)


def score_pairs() -> np.ndarray:
    """dj.eval.loglikelihoods of a few (context, continuation) pairs on the mesh, with a shared
    preamble (prefilled once) and contexts shared by several continuations: every host runs the
    same call and gets every score."""
    import jax
    from flax import nnx

    from dromedary_jax.eval import loglikelihoods
    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama
    from dromedary_jax.sharding import make_mesh

    model = Llama(preset("tiny"), rngs=nnx.Rngs(1), mesh=make_mesh(MESH))
    rng = np.random.RandomState(0)
    preamble = list(rng.randint(3, 500, 40))
    pairs = []
    for q in range(3):
        ctx = preamble + list(rng.randint(3, 500, 5 + q))
        pairs += [(ctx, list(rng.randint(3, 500, 1 + c))) for c in range(3)]
    out = loglikelihoods(model, pairs, batch_size=4)
    assert jax.process_count() == 1 or len(out) == len(pairs)
    return np.asarray([ll for ll, _ in out] + [float(g) for _, g in out])


CONTINUOUS_PROMPTS = ["why", "sorry the fox", "how is it", "the answer", "fox", "how how the",
                      "a", "the red fox jumps", "ok then"]


def continuous_texts(tokenizer_path: str, mine=None) -> tuple[list[str], int]:
    """(texts of this host's share of CONTINUOUS_PROMPTS (every ``process_count``-th one; all of
    them when ``mine`` is "all"), tail compactions run): the continuous engine, 4 slots a host,
    sampled, shared prefix, a stop string."""
    import jax
    from flax import nnx

    import dromedary_jax as dj
    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama
    from dromedary_jax.sampling import engine
    from dromedary_jax.sharding import make_mesh
    from dromedary_jax.tokenizer import load_tokenizer

    model = Llama(preset("tiny"), rngs=nnx.Rngs(3), mesh=make_mesh(MESH))
    n = len(CONTINUOUS_PROMPTS)
    idx = range(n) if mine == "all" else range(jax.process_index(), n, jax.process_count())
    calls = []
    inner = engine.compact
    engine.compact = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        texts = dj.generate_text(
            model, load_tokenizer(tokenizer_path), [CONTINUOUS_PROMPTS[i] for i in idx],
            ids=[f"q{i}" for i in idx], max_new_tokens=16, temperature=1.0, seed=5, stop=[" ", "e"],
            shared_prefix="### User: ", batch_size=4, stop_check_every=3,
            engine="static" if mine == "all" else "continuous")
    finally:
        engine.compact = inner
    return texts, len(calls)


EVAL_DIR = os.path.join(ROOT, "tests", "data", "eval")


def save_eval_model(out_dir: str) -> str:
    """A tiny random model as an HF folder, for the eval CLI."""
    from flax import nnx

    from dromedary_jax.checkpoint import save_hf
    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import Llama

    path = os.path.join(out_dir, "eval_model")
    save_hf(Llama(preset("tiny"), rngs=nnx.Rngs(2)), path)
    return path


def eval_cli(model_dir: str, tokenizer_path: str, out_dir: str) -> None:
    """``python -m dromedary_jax.eval`` on the mesh: TruthfulQA MC into ``tqa.json``, and
    sampled open-ended answers (one two-turn question among them) into ``answers.jsonl``."""
    from dromedary_jax.eval.__main__ import main

    common = ["--model", model_dir, "--tokenizer", tokenizer_path,
              "--mesh", ",".join(map(str, MESH)), "--batch_size", "4"]
    main(common + ["--task", "truthfulqa_mc", "--data", os.path.join(EVAL_DIR, "truthfulqa_tiny.json"),
                   "--out", os.path.join(out_dir, "tqa.json")])
    main(common + ["--task", "answers", "--data", os.path.join(EVAL_DIR, "vicuna_tiny.jsonl"),
                   "--meta_prompt", os.path.join(EVAL_DIR, "meta_prompt.txt"),
                   "--max_new_tokens", "6", "--temperature", "1.0", "--seed", "3",
                   "--out", os.path.join(out_dir, "answers.jsonl")])


# ----------------------------------------------------------------------------- the worker
def worker(out_dir: str, tokenizer_path: str) -> None:
    import logging

    from dromedary_jax.distributed import maybe_initialize

    logging.basicConfig(level=logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax chatter, as the runner does
    assert maybe_initialize(), "expected a multi-process run"
    import jax

    if jax.process_index() != 0:
        logging.getLogger("dromedary_jax").setLevel(logging.WARNING)  # as the runner does
    assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
    data_file = os.path.join(out_dir, "sft.jsonl")  # written by the test before the start
    lora = train_and_resume(os.path.join(out_dir, "train"), data_file, tokenizer_path)
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "lora.npz"), **lora)
    scores = score_pairs()
    np.save(os.path.join(out_dir, f"scores{jax.process_index()}.npy"), scores)
    eval_cli(os.path.join(out_dir, "eval_model"), tokenizer_path, out_dir)
    texts, compactions = continuous_texts(tokenizer_path)
    with open(os.path.join(out_dir, f"continuous{jax.process_index()}.json"), "w") as f:
        json.dump({"texts": texts, "compactions": compactions}, f)
    counts = self_align(os.path.join(out_dir, "pipe"), tokenizer_path)
    self_align(os.path.join(out_dir, "pipe_continuous"), tokenizer_path, engine="continuous")
    print(f"process {jax.process_index()} done: {counts['self_align']['generated']} generated",
          flush=True)


# ----------------------------------------------------------------------------- the test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(out_dir: str, tokenizer_path: str):
    port = _free_port()
    procs = []
    for pid in range(NUM_PROCESSES):
        env = dict(os.environ)
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
                   JAX_PLATFORMS="cpu", DROMEDARY_COORDINATOR=f"127.0.0.1:{port}",
                   DROMEDARY_NUM_PROCESSES=str(NUM_PROCESSES), DROMEDARY_PROCESS_ID=str(pid),
                   TOKENIZERS_PARALLELISM="false")
        log = open(os.path.join(out_dir, f"process{pid}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker",
                                        out_dir, tokenizer_path], cwd=ROOT, env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, out_dir: str, timeout: float = 300) -> list[str]:
    deadline = time.time() + timeout
    try:
        for p, _ in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = []
    for pid in range(NUM_PROCESSES):
        with open(os.path.join(out_dir, f"process{pid}.log")) as f:
            logs.append(f.read())
    for pid, (p, _) in enumerate(procs):
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{logs[pid][-4000:]}"
    return logs


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    import jax

    from dromedary_jax.testing.demo_tokenizer import ensure_demo_tokenizer
    from dromedary_jax.pipeline.records import read_shards, shard_paths

    tok_path = ensure_demo_tokenizer(str(tmp_path / "tokenizer"))
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    write_sft_data(str(multi / "sft.jsonl"))
    write_sft_data(str(single / "sft.jsonl"))
    model_dir = save_eval_model(str(multi))
    procs = _start_workers(str(multi), tok_path)
    try:  # the single-process reference runs here meanwhile (8 devices, same mesh)
        assert jax.process_count() == 1 and jax.device_count() >= 8
        ref_lora = train_and_resume(str(single / "train"), str(single / "sft.jsonl"), tok_path)
        ref_scores = score_pairs()
        eval_cli(model_dir, tok_path, str(single))
        ref_texts, _ = continuous_texts(tok_path, mine="all")
        ref_counts = self_align(str(single / "pipe"), tok_path)
    finally:
        logs = _wait(procs, str(multi))

    # (a) training + checkpoint restore: the same adapters
    with np.load(multi / "lora.npz") as got:
        assert sorted(got.files) == sorted(ref_lora)
        for k in ref_lora:
            np.testing.assert_allclose(got[k], ref_lora[k], rtol=0, atol=1e-6, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in ref_lora.items() if k.endswith(".b"))  # it trained
    ckpts = sorted(os.listdir(multi / "train" / "resumed" / "checkpoints"))
    assert "4" in ckpts and "1" not in ckpts  # restored at 2: saved 3 and 4 only
    assert "resumed from step 2" in logs[0]

    # (b) stage 2: one shard per host, records identical to the single-process run
    stage, ref_stage = multi / "pipe" / "self_align", single / "pipe" / "self_align"
    assert [os.path.basename(p) for p in shard_paths(str(stage), "responses")] == [
        "responses-00000-of-00002.jsonl", "responses-00001-of-00002.jsonl"]
    ids = [[json.loads(line)["id"] for line in open(p)] for p in shard_paths(str(stage), "responses")]
    assert [len(x) for x in ids] == [3, 2]
    assert read_shards(str(stage), "responses") == read_shards(str(ref_stage), "responses")
    assert (stage / "kept.jsonl").read_text() == (ref_stage / "kept.jsonl").read_text()
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["done"] and manifest["num_processes"] == 2
    assert manifest["counts"] == ref_counts["self_align"]
    assert not [f for f in os.listdir(stage) if ".tmp" in f]
    # ... the continuous engine on 2 processes: each host's own slots, the same records
    cont = multi / "pipe_continuous" / "self_align"
    assert [len(x) for x in ([json.loads(line)["id"] for line in open(p)]
                             for p in shard_paths(str(cont), "responses"))] == [3, 2]
    assert read_shards(str(cont), "responses") == read_shards(str(ref_stage), "responses")
    assert (cont / "kept.jsonl").read_text() == (ref_stage / "kept.jsonl").read_text()

    # (c) eval scoring: every host gets every score, equal to the single-process ones
    for pid in range(NUM_PROCESSES):
        np.testing.assert_allclose(np.load(multi / f"scores{pid}.npy"), ref_scores, rtol=0,
                                   atol=1e-5, err_msg=f"process {pid}")
    # ... and the eval CLI: process 0 writes the result file and prints the metrics line
    got, ref = (json.loads((d / "tqa.json").read_text()) for d in (multi, single))
    assert len(got["per_example"]) == len(ref["per_example"]) == 3
    for g, r in zip(got["per_example"], ref["per_example"]):
        assert g["mc1"] == r["mc1"] and abs(g["mc2"] - r["mc2"]) < 1e-5
    assert '"mc1"' in logs[0] and '"mc1"' not in logs[1]
    # ... answers: each host sampled its share; the gathered records equal one process's
    answers = [[{k: v for k, v in json.loads(line).items() if k != "tstamp"}
                for line in open(d / "answers.jsonl")] for d in (multi, single)]
    assert answers[0] == answers[1] and len(answers[0]) == 3
    assert any(len(a["choices"][0]["turns"]) == 2 for a in answers[0])
    assert '"answers": 3' in logs[0] and '"answers"' not in logs[1]

    # (d) the continuous engine on 2 processes: each host's share equals the single-process texts
    got = [json.loads((multi / f"continuous{pid}.json").read_text()) for pid in range(2)]
    assert got[0]["texts"] == ref_texts[0::2] and got[1]["texts"] == ref_texts[1::2]
    assert len({len(t) for t in ref_texts}) >= 3  # the stop string ended rows at different steps
    assert got[0]["compactions"] >= 1 and got[0]["compactions"] == got[1]["compactions"]

    # logs and progress bars only on process 0
    assert "== stage self_align" in logs[0] and "== stage self_align" not in logs[1]
    assert "sft:" in logs[0] and "sft:" not in logs[1]  # the trainer's tqdm bar
    assert "resumed from step" not in logs[1] and "to generate" not in logs[1]
    assert "process 1 done: 5 generated" in logs[1]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: test_multihost.py worker OUT_DIR TOKENIZER_PATH")
