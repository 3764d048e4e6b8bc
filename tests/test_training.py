"""SFT trainer: masking, packing, accumulation, over-fitting, LoRA, meshes, bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_corpus

from dromedary_jax.errors import UserError
from dromedary_jax.model import Llama, ModelConfig
from dromedary_jax.model.llama import forward, param_shapes
from dromedary_jax.sharding import make_mesh
from dromedary_jax.training import dataset as ds_lib
from dromedary_jax.training import examples as ex_lib
from dromedary_jax.training import packing
from dromedary_jax.training import step as step_lib
from dromedary_jax.training.config import default_config
from dromedary_jax.training.loop import run_sft
from dromedary_jax.training.metrics import read_metrics

MC = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=4, max_seq_len=128)


def tiny_model(seed=0, mesh=None):
    """Random tiny Llama built from numpy (no init compile)."""
    rng = np.random.RandomState(seed)
    params = {k: (np.ones(s, np.float32) if k.endswith("norm")
                  else (0.05 * rng.randn(*s)).astype(np.float32))
              for k, s in param_shapes(MC).items()}
    return Llama(MC, params={k: jnp.asarray(v) for k, v in params.items()}, mesh=mesh)


def one_device():
    return make_mesh((1, 1, 1), jax.devices()[:1])


def write_records(path, n, seed=0, start=0):
    lines = tiny_corpus(2 * n + 10, seed=seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{start + i}", "prompt": lines[2 * i],
                                "response": lines[2 * i + 1]}) + "\n")
    return str(path)


def base_cfg(**train):
    cfg = default_config()
    cfg.data.max_len = 64
    cfg.metrics.progress = False
    cfg.metrics.tensorboard = False
    cfg.metrics.log_every = 1
    cfg.checkpoint.every_steps = 0
    cfg.checkpoint.async_save = False
    cfg.train.schedule = "constant"
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def losses(metrics_path):
    out = {}
    for m in read_metrics(metrics_path):
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return [out[k] for k in sorted(out)]


def all_batches(tok, path, tmp_path, *, pack, rows, max_len=64):
    cfg = default_config()
    cfg.data.max_len = max_len
    data = ds_lib.prepare(cfg.data, tok, [path], [], str(tmp_path / "prep"))
    n = ds_lib.num_batches(data.lengths("train"), seq_len=max_len, pack=pack,
                           rows_per_batch=rows, shuffle=False, seed=0, num_epochs=1,
                           process_count=1)
    it = ds_lib.BatchIterator(data.source("train"), seq_len=max_len, pack=pack,
                              rows_per_batch=rows, num_batches=n, shuffle=False, seed=0,
                              num_epochs=1)
    return list(it)


_loss_sums = jax.jit(lambda p, b: step_lib.loss_sums(p, None, b, config=MC))


def batch_loss(params, batches):
    """Mean NLL over the target tokens of host batches, and the target count."""
    tot = cnt = 0.0
    for b in batches:
        s, c = _loss_sums(params, {k: jnp.asarray(b[k]) for k in step_lib.BATCH_KEYS})
        tot, cnt = tot + float(s), cnt + float(c)
    return tot / cnt, cnt


# ----------------------------------------------------------------------------- data
def test_examples_mask_truncation_and_errors(tmp_path, sp_tokenizer):
    tok = sp_tokenizer
    ex = ex_lib.tokenize_example(tok, "Q: hi", " the answer", 64, id="a")
    p = tok.encode("Q: hi", bos=True)
    whole = tok.encode("Q: hi the answer", bos=True) + [tok.eos_id]
    r = whole[len(p):]
    assert whole[:len(p)] == p
    assert ex.tokens.tolist() == whole
    assert ex.loss_mask.tolist() == [0] * len(p) + [1] * len(r)
    short = ex_lib.tokenize_example(tok, "Q: hi", " the answer", len(p) + 1)
    assert short.truncated and short.tokens.tolist() == p + r[:1]
    assert ex_lib.tokenize_example(tok, "Q: hi", " the answer", len(p)) is None  # no target left

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        list(ex_lib.read_sft_records([str(bad)]))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(UserError, match=r"missing\.jsonl:1: .*'response'.*data\.response_field"):
        list(ex_lib.read_sft_records([str(missing)]))
    with pytest.raises(UserError, match="must contain the placeholder"):
        ex_lib.load_template("no placeholder")


def test_examples_are_the_joined_text_whatever_the_tokenizer(llama_sp_tokenizer, sp_tokenizer):
    """The ids of an SFT example are encode(prompt + response): a LLaMA-style SentencePiece
    tokenizer puts a lone "▁" before " answer" encoded on its own, which the model never sees
    at inference; a seam token that merges across goes to the response."""
    for tok in (llama_sp_tokenizer, sp_tokenizer):
        for prompt, response in (("User: why?\n\nAssistant:", " Because it is."),
                                 ("Q: hi", " the answer"), ("Say: ab", "cd efg")):
            ex = ex_lib.tokenize_example(tok, prompt, response, 256)
            assert ex.tokens.tolist() == tok.encode(prompt + response) + [tok.eos_id]
            n_prompt = int((ex.loss_mask == 0).sum())
            assert ex.tokens.tolist()[:n_prompt] == tok.encode(prompt)[:n_prompt]
    lone = llama_sp_tokenizer.encode(" Because", bos=False)
    assert llama_sp_tokenizer.id_to_piece(lone[0]) == "\u2581"  # what separate encoding added


def test_packing_segments_positions_and_row_count():
    exs = [{"inputs": np.arange(1, n + 1), "targets": np.arange(1, n + 1) + 100,
            "loss_mask": np.ones(n, np.int32), "index": i} for i, n in enumerate([3, 4, 2, 5, 1])]
    rows = list(packing.pack_examples(exs, 8))
    assert [ids for _, ids in rows] == [[0, 1], [2, 3, 4]]
    r0 = rows[0][0]
    assert r0["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
    assert r0["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert r0["loss_mask"].tolist() == [1] * 7 + [0]
    assert packing.count_rows([3, 4, 2, 5, 1], 8) == 2
    assert packing.count_rows([3, 4, 2, 5, 1], 8, pack=False) == 5
    assert [ids for _, ids in packing.pack_examples(exs, 8, pack=False)] == [[i] for i in range(5)]


def test_other_hosts_give_up_waiting_for_process_0_with_a_clear_error(tmp_path, sp_tokenizer):
    path = write_records(tmp_path / "d.jsonl", 3)
    cfg = default_config()
    cfg.data.prepare_timeout_s = 0.2
    root = str(tmp_path / "prep")
    with pytest.raises(UserError, match=r"waited .* for process 0 .*prepare_timeout_s=0.2"):
        ds_lib.prepare(cfg.data, sp_tokenizer, [path], [], root, process_index=1, process_count=2)
    # once process 0 has prepared it, another host finds it without waiting
    first = ds_lib.prepare(cfg.data, sp_tokenizer, [path], [], root)
    other = ds_lib.prepare(cfg.data, sp_tokenizer, [path], [], root, process_index=1,
                           process_count=2)
    assert other.path == first.path and other.counts == {"train": 3}


def test_loader_is_deterministic_sharded_and_resumable(tmp_path, sp_tokenizer):
    path = write_records(tmp_path / "d.jsonl", 21)
    cfg = default_config()
    cfg.data.max_len = 96
    data = ds_lib.prepare(cfg.data, sp_tokenizer, [path], [], str(tmp_path / "prep"))
    again = ds_lib.prepare(cfg.data, sp_tokenizer, [path], [], str(tmp_path / "prep"))
    assert again.path == data.path and data.counts == {"train": 21}

    def make(p=0, count=1, n=None, rows=2):
        n = n or ds_lib.num_batches(data.lengths("train"), seq_len=96, pack=True,
                                    rows_per_batch=rows, shuffle=True, seed=3, num_epochs=2,
                                    process_count=count)
        return ds_lib.BatchIterator(data.source("train"), seq_len=96, pack=True,
                                    rows_per_batch=rows, num_batches=n, shuffle=True, seed=3,
                                    num_epochs=2, process_index=p, process_count=count)

    full = [b["example_ids"] for b in make()]
    seen = sorted(i for b in full for row in b for i in row)
    assert seen == sorted(list(range(21)) * 2)  # every example exactly once per epoch
    assert [b["example_ids"] for b in make()] == full  # same seed, same order
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = make()
    rest.set_state(state)
    assert [b["example_ids"] for b in rest] == full[3:]
    # two hosts with 2 rows each: every step, host 0's rows then host 1's are the rows of the
    # same step of one host with 4 rows (the global batch), so the data order does not depend
    # on the process count
    one = [b["example_ids"] for b in make(rows=4)]
    h0, h1 = ([b["example_ids"] for b in make(p, 2)] for p in (0, 1))
    assert len(h0) == len(h1) == len(one)
    assert [a + b for a, b in zip(h0, h1)] == one
    for a, b in zip(h0, h1):  # within a step the hosts' examples are disjoint
        assert not {i for r in a for i in r} & {i for r in b for i in r}


# ----------------------------------------------------------------------------- the loss
def test_loss_is_mean_nll_of_response_tokens(tmp_path, sp_tokenizer):
    tok = sp_tokenizer
    path = write_records(tmp_path / "m.jsonl", 5, seed=4)
    batches = all_batches(tok, path, tmp_path, pack=True, rows=2, max_len=128)
    model = tiny_model(1)
    loss, count = batch_loss(model.params, batches)

    # by hand: every example alone (right-padded; causal attention ignores what follows),
    # NLL of its response tokens (incl. EOS) from the logits
    template = default_config().data.template
    pieces = []
    for rec in ex_lib.read_sft_records([path]):
        p, r = ex_lib.split_at_seam(tok, ex_lib.render_prompt(template, rec.prompt), rec.response)
        pieces.append((p, r + [tok.eos_id]))
    width = max(len(p) + len(r) for p, r in pieces)
    ids = np.zeros((len(pieces), width), np.int32)
    for i, (p, r) in enumerate(pieces):
        ids[i, :len(p) + len(r)] = p + r
    logits = np.asarray(jax.jit(lambda x: forward(model.params, MC, x)[0])(ids), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll, n = [], 0
    for i, (p, r) in enumerate(pieces):
        for j in range(len(p), len(p) + len(r)):
            nll.append(-logp[i, j - 1, ids[i, j]])
        n += len(r)
    assert count == n
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)

    # prompt and padding positions contribute nothing: scramble their targets
    rng = np.random.RandomState(0)
    scrambled = []
    for b in batches:
        b = dict(b)
        off = b["loss_mask"] == 0
        b["targets"] = np.where(off, rng.randint(0, 256, off.shape), b["targets"]).astype(np.int32)
        scrambled.append(b)
    assert batches[0]["segment_ids"].max() >= 2 and (batches[-1]["segment_ids"] == 0).any()
    np.testing.assert_allclose(batch_loss(model.params, scrambled)[0], loss, rtol=1e-6)


def test_packed_and_unpacked_give_same_loss(tmp_path, sp_tokenizer):
    path = write_records(tmp_path / "p.jsonl", 7, seed=5)
    packed = all_batches(sp_tokenizer, path, tmp_path, pack=True, rows=4, max_len=128)
    unpacked = all_batches(sp_tokenizer, path, tmp_path, pack=False, rows=4, max_len=128)
    used = lambda bs: sum(int((b["segment_ids"].max(-1) > 0).sum()) for b in bs)  # noqa: E731
    assert used(unpacked) == 7 and used(packed) < 7  # packing put several examples in a row
    params = tiny_model(2).params
    lp, cp = batch_loss(params, packed)
    lu, cu = batch_loss(params, unpacked)
    assert cp == cu
    np.testing.assert_allclose(lp, lu, rtol=1e-5)


def test_grad_accumulation_normalises_by_total_target_tokens(tmp_path, sp_tokenizer):
    path = write_records(tmp_path / "g.jsonl", 4, seed=6)
    (b,) = all_batches(sp_tokenizer, path, tmp_path, pack=False, rows=4)
    b["loss_mask"][0, :] = 0  # very different target counts per micro-batch
    b["loss_mask"][0, 20] = 1
    # SGD with lr 1: the update IS the accumulated gradient (Adam's first step is scale-free,
    # so it would hide a wrong normaliser, and it amplifies rounding where a gradient is ~0)
    import optax

    tx, sched = optax.sgd(1.0), (lambda step: 1.0)
    params = tiny_model(3).params
    out = {}
    for accum in (1, 2):
        fn = jax.jit(step_lib.make_train_step(MC, tx, sched, is_lora=False))
        state = step_lib.init_state(tx, params, 0, None)
        batch = {k: jnp.asarray(b[k].reshape(accum, 4 // accum, -1)) for k in step_lib.BATCH_KEYS}
        out[accum] = fn(state, batch, {})
    (s1, m1), (s2, m2) = out[1], out[2]
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    moved = 0.0
    for k in s1["params"]:
        np.testing.assert_allclose(s1["params"][k], s2["params"][k], atol=1e-6, rtol=0)
        moved = max(moved, float(np.abs(np.asarray(s1["params"][k]) - np.asarray(params[k])).max()))
    assert moved > 1e-4  # the step really applied a gradient


# ----------------------------------------------------------------------------- training runs
def test_overfits_eight_examples(tmp_path, sp_tokenizer):
    path = write_records(tmp_path / "eight.jsonl", 8, seed=1)
    model = tiny_model(0)
    before = {k: np.asarray(v) for k, v in model.params.items()}
    cfg = base_cfg(batch_size=8, num_steps=60, learning_rate=1e-2)
    cfg.data.pack = False
    cfg.metrics.tensorboard = True
    cfg.metrics.log_every = 20
    cfg.metrics.peak_flops = 1e11
    res = run_sft(cfg, model, sp_tokenizer, [path], str(tmp_path / "w"), mesh=one_device())
    curve = losses(res.metrics_path)
    assert len(curve) == 60 and curve[0] > 4.0
    assert curve[-1] < 0.05, curve[-5:]
    # the caller's model is untouched (its arrays were copied, not donated)
    for k, v in model.params.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])
    rows = read_metrics(res.metrics_path)
    assert [r["step"] for r in rows if "tokens_per_s" in r] == [20, 40, 60]
    assert all(0 < r["mfu"] < 1 for r in rows if "tokens_per_s" in r)
    assert {"grad_norm", "learning_rate", "target_tokens"} <= set(rows[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(res.tensorboard_dir))


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_lora_trains_adapters_only_and_merges(tmp_path, sp_tokenizer):
    import orbax.checkpoint as ocp

    path = write_records(tmp_path / "l.jsonl", 8, seed=2)
    eval_path = write_records(tmp_path / "le.jsonl", 3, seed=9)
    model = tiny_model(4)
    base = {k: np.asarray(v).copy() for k, v in model.params.items()}
    cfg = base_cfg(batch_size=4, num_steps=4, learning_rate=1e-2)
    cfg.lora.enabled = True
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.1
    cfg.lora.targets = ("wq", "wv", "wo", "w_down")
    res = run_sft(cfg, model, sp_tokenizer, [path], str(tmp_path / "w"), eval_files=[eval_path],
                  mesh=one_device())
    scale = 8.0 / 4
    assert res.eval_loss is not None and np.isfinite(res.eval_loss)
    for k, v in model.params.items():  # base weights bit-identical after training
        assert np.array_equal(np.asarray(v), base[k]), k
    assert set(res.lora) == {"wq", "wv", "wo", "w_down"}
    for name, w in base.items():
        got = np.asarray(res.params[name])
        if name not in res.lora:
            assert np.array_equal(got, w), name
            continue
        a = np.asarray(res.lora[name]["a"], np.float64)
        b = np.asarray(res.lora[name]["b"], np.float64)
        assert np.abs(b).max() > 0  # B moved off its zero init
        L, r = a.shape[0], a.shape[-1]
        ba = np.einsum("lir,lro->lio", a.reshape(L, -1, r), b.reshape(L, r, -1))
        np.testing.assert_allclose(got, w + scale * ba.reshape(w.shape), atol=1e-6)
    # merged export computes what base + adapters compute
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 256, (2, 16)), jnp.int32)
    with_adapters = forward(model.params, MC, ids, lora=res.lora, lora_scale=scale)[0]
    merged = forward(res.params, MC, ids)[0]
    np.testing.assert_allclose(merged, with_adapters, atol=2e-5)
    # the checkpointed optimizer state holds adapters only
    state = ocp.PyTreeCheckpointer().restore(f"{res.checkpoint_dir}/4/state")
    assert set(state["params"]) == set(res.lora)
    shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0}
    assert shapes == {tuple(x.shape) for x in jax.tree.leaves(res.lora)}


def test_mesh_2x2x2_matches_one_device_and_resumes_across_meshes(tmp_path, sp_tokenizer):
    path = write_records(tmp_path / "mesh.jsonl", 16, seed=3)

    def run(name, mesh, **ckpt):
        cfg = base_cfg(batch_size=8, num_steps=6, learning_rate=5e-3, grad_accum=2)
        cfg.checkpoint.every_steps = 3
        cfg.checkpoint.keep = 3
        for k, v in ckpt.items():
            cfg.checkpoint[k] = v
        return run_sft(cfg, tiny_model(5), sp_tokenizer, [path], str(tmp_path / name), mesh=mesh)

    eight = run("eight", make_mesh((2, 2, 2)))
    one = run("one", one_device())
    assert eight.params["wq"].sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(losses(eight.metrics_path), losses(one.metrics_path), atol=1e-4)
    # Adam's first steps are ~lr * sign(g): entries with |g| near 0 may differ by ~lr/10
    for k in one.params:
        np.testing.assert_allclose(np.asarray(eight.params[k]), np.asarray(one.params[k]),
                                   atol=1e-3)
    # restore the 8-device run's step-3 checkpoint onto one device and finish there
    moved = run("moved", one_device(), resume_from=f"{eight.checkpoint_dir}/3")
    assert moved.params["wq"].sharding.mesh.size == 1
    np.testing.assert_allclose(losses(moved.metrics_path), losses(one.metrics_path)[3:],
                               atol=1e-4)
    for k in one.params:
        np.testing.assert_allclose(np.asarray(moved.params[k]), np.asarray(one.params[k]),
                                   atol=1e-3)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_user_errors(tmp_path, sp_tokenizer):
    good = write_records(tmp_path / "ok.jsonl", 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(good).read() + "{not json}\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    model = tiny_model()
    cfg = base_cfg(num_steps=1)

    def run(files, cfg=cfg, name="w"):
        run_sft(cfg, model, sp_tokenizer, files, str(tmp_path / name), mesh=one_device())

    with pytest.raises(UserError, match=r"bad\.jsonl:5: malformed JSON"):
        run([str(bad)])
    with pytest.raises(UserError, match=r"no training examples in .*empty\.jsonl"):
        run([str(empty)])
    with pytest.raises(UserError, match=r"no such file"):
        run([str(tmp_path / "nope.jsonl")])
    long_cfg = base_cfg(num_steps=1)
    long_cfg.data.max_len = 4096
    with pytest.raises(UserError, match=r"data\.max_len=4096 is over the model's maximum.*128"):
        run([good], long_cfg)
    resume_cfg = base_cfg(num_steps=1)
    resume_cfg.checkpoint.resume_from = str(tmp_path / "no_such_ckpt")
    with pytest.raises(UserError, match=r"checkpoint\.resume_from=.*no_such_ckpt.*no such"):
        run([good], resume_cfg)
