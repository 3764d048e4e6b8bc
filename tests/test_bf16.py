"""bfloat16 on CPU, every path, for multi-head and grouped-query attention: XLA:CPU has no
bf16 x bf16 -> f32 kernel for some dot shapes (grouped-query attention at batch >= 2 crashed the
sampler with ``UNIMPLEMENTED: ... DotThunk::Execute: BF16 x BF16 = F32``). Each path must run and
stay close to the float32 result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dromedary_jax as dj
from dromedary_jax.eval.scorer import loglikelihoods
from dromedary_jax.model.llama import Llama, param_shapes
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.training import step as step_lib

PROMPT = [1, 5, 6, 7, 8, 9]


def _model(kv_heads: int, dtype: str) -> Llama:
    c = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=kv_heads, max_seq_len=128, dtype=dtype)
    rng = np.random.RandomState(kv_heads)
    params = {k: jnp.asarray(np.ones(s, np.float32) if k.endswith("norm")
                             else (0.05 * rng.randn(*s)).astype(np.float32))
              for k, s in param_shapes(c).items()}
    return Llama(c, params=params)


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def models(request):
    return _model(request.param, "float32"), _model(request.param, "bfloat16")


def test_forward(models):
    f32, bf16 = models
    ids = [PROMPT, PROMPT[::-1]]
    np.testing.assert_allclose(dj.logits(bf16, ids), dj.logits(f32, ids), atol=0.05)


@pytest.mark.parametrize("batch", [1, 2, 32])
def test_sampler(models, batch):
    f32, bf16 = models
    prompts = [PROMPT[: 2 + i % 5] for i in range(batch)]
    for prefix in (None, [1, 11, 12, 13]):
        out = dj.generate(bf16, prompts, max_new_tokens=5, eos_id=-1, shared_prefix=prefix)
        assert [len(o) for o in out] == [5] * batch
        if batch == 2:  # greedy first tokens mostly agree with float32's
            ref = dj.generate(f32, prompts, max_new_tokens=5, eos_id=-1, shared_prefix=prefix)
            assert np.mean([a[0] == b[0] for a, b in zip(out, ref)]) >= 0.5


def test_scorer(models):
    f32, bf16 = models
    reqs = [(PROMPT, [10, 11]), (PROMPT, [12]), (PROMPT[:3], [13, 14, 15])]
    got = [ll for ll, _ in loglikelihoods(bf16, reqs, batch_size=4)]
    want = [ll for ll, _ in loglikelihoods(f32, reqs, batch_size=4)]
    np.testing.assert_allclose(got, want, atol=0.1)


def test_training_step(models):
    import optax

    _, bf16 = models
    c = bf16.config
    tx = optax.adamw(1e-3)
    fn = jax.jit(step_lib.make_train_step(c, tx, lambda s: 1e-3, is_lora=False))
    state = step_lib.init_state(tx, bf16.params, 0, None)
    B, T = 2, 16
    rng = np.random.RandomState(0)
    batch = {"tokens": rng.randint(0, c.vocab_size, (1, B, T)),
             "targets": rng.randint(0, c.vocab_size, (1, B, T)),
             "loss_mask": np.ones((1, B, T)), "segment_ids": np.ones((1, B, T)),
             "positions": np.broadcast_to(np.arange(T), (1, B, T))}
    batch = {k: jnp.asarray(batch[k], jnp.int32) for k in step_lib.BATCH_KEYS}
    state, metrics = fn(state, batch, {})
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


# ------------------------------------------------------------------ weights' dtype per use
# (checkpoint/dtypes.py: sampling holds bf16 in a bf16 run or for a bf16 checkpoint, full
# fine-tunes float32 masters, LoRA a frozen base as sampling holds it + float32 adapters)

TINY = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_seq_len=128)


def _numpy_model(dtype="float32", param_dtype="float32", seed=0):
    c = TINY.replace(dtype=dtype, param_dtype=param_dtype)
    rng = np.random.RandomState(seed)
    params = {k: jnp.asarray(np.ones(s, np.float32) if k.endswith("norm")
                             else (0.05 * rng.randn(*s)).astype(np.float32), param_dtype)
              for k, s in param_shapes(c).items()}
    return Llama(c, params=params)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The same tiny model saved as Hugging Face folders in float32 and in bfloat16."""
    model = _numpy_model()
    out = {}
    for dt in ("float32", "bfloat16"):
        out[dt] = str(tmp_path_factory.mktemp(f"hf_{dt}") / "m")
        dj.save_hf(model, out[dt], dtype=dt)
    return out


def _run_config(checkpoint, tokenizer, dtype, lora=True):
    from dromedary_jax.pipeline.defaults import complete, get_defaults

    c = complete(get_defaults())
    c.model.kind, c.model.checkpoint, c.model.tokenizer = "checkpoint", checkpoint, tokenizer
    c.model.dtype = dtype
    for stage in ("engrave", "verbose_clone"):
        c[stage].train.lora.enabled = lora
    return c


def _dtypes(model):
    return {str(v.dtype) for v in model.params.values()}


def test_stored_param_dtype_reads_the_safetensors_header(hf_dirs, tmp_path):
    from dromedary_jax.checkpoint.dtypes import stored_param_dtype

    assert stored_param_dtype(hf_dirs["float32"]) == "float32"
    assert stored_param_dtype(hf_dirs["bfloat16"]) == "bfloat16"
    ck = str(tmp_path / "ck")
    dj.save_checkpoint(_numpy_model(param_dtype="bfloat16"), ck)
    assert stored_param_dtype(ck) == "bfloat16"
    for unknown in (str(tmp_path / "missing"), str(tmp_path), ""):  # never raises
        assert stored_param_dtype(unknown) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampling_stages_hold_weights_in_the_run_dtype(hf_dirs, sp_model_path, dtype):
    from dromedary_jax.pipeline import resources
    from dromedary_jax.distributed import Hosts

    c = _run_config(hf_dirs["float32"], sp_model_path, dtype)
    res = resources.Resources(c, hosts=Hosts())
    model, _ = res.model_and_tokenizer  # stages 1, 2 and 5 and the report sample with this
    assert _dtypes(model) == {dtype} and model.config.param_dtype == dtype
    assert res.generator.model is model
    # a stage's saved model (stage 4 samples the engraved one, stage 5 scores each) likewise
    assert _dtypes(resources.load_run_model(c.model, hf_dirs["float32"])) == {dtype}


def test_a_bf16_checkpoint_is_not_upcast_to_sample_in_float32(hf_dirs, sp_model_path):
    from dromedary_jax.pipeline import resources
    from dromedary_jax.distributed import Hosts

    c = _run_config(hf_dirs["bfloat16"], sp_model_path, "float32")
    model, _ = resources.Resources(c, hosts=Hosts()).model_and_tokenizer
    assert _dtypes(model) == {"bfloat16"} and model.config.dtype == "float32"
    upcast = dj.load_model(hf_dirs["bfloat16"], param_dtype="float32")  # what it was before
    assert _dtypes(upcast) == {"float32"}
    ids = [PROMPT, PROMPT[::-1]]
    np.testing.assert_array_equal(dj.logits(model, ids), dj.logits(upcast, ids))


def test_full_fine_tune_reloads_float32_masters_and_sampling_rounds_them(hf_dirs, sp_model_path):
    from dromedary_jax.pipeline import resources
    from dromedary_jax.distributed import Hosts

    c = _run_config(hf_dirs["float32"], sp_model_path, "bfloat16", lora=False)
    res = resources.Resources(c, hosts=Hosts())
    sampled, tok = res.model_and_tokenizer
    gen = res.generator
    assert _dtypes(sampled) == {"bfloat16"}
    full, tok2 = res.finetune_model_and_tokenizer(c.engrave.train)
    assert tok2 is tok and _dtypes(full) == {"float32"}
    want = dj.load_model(hf_dirs["float32"])  # the checkpoint's own float32 values, not bf16 upcast
    for k, v in want.params.items():
        np.testing.assert_array_equal(np.asarray(full.params[k]), np.asarray(v), err_msg=k)
    assert res.generator is not gen  # the old generator (and its bf16 weights) was dropped
    again, _ = res.model_and_tokenizer  # back to sampling: rounded, as a bfloat16 load gives
    bf16 = dj.load_model(hf_dirs["float32"], dtype="bfloat16", param_dtype="bfloat16")
    for k, v in bf16.params.items():
        assert again.params[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(again.params[k], np.float32),
                                      np.asarray(v, np.float32), err_msg=k)
    # a LoRA fine-tune of a bf16 run shares the sampling copy
    lora_cfg = _run_config(hf_dirs["float32"], sp_model_path, "bfloat16").engrave.train
    assert res.finetune_model_and_tokenizer(lora_cfg)[0] is again


@pytest.mark.parametrize("stored, dtype, held", [
    ("float32", "float32", "float32"), ("float32", "bfloat16", "bfloat16"),
    ("bfloat16", "float32", "bfloat16")])
def test_eval_cli_holds_weights_as_sampling_does(hf_dirs, sp_model_path, tmp_path, monkeypatch,
                                                 stored, dtype, held):
    import os

    import dromedary_jax.checkpoint as ckpt
    from dromedary_jax.eval.__main__ import main

    loaded, real = [], ckpt.load_model
    monkeypatch.setattr(ckpt, "load_model", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    hhh = os.path.join(os.path.dirname(__file__), "data", "eval", "hhh")
    main(["--model", hf_dirs[stored], "--tokenizer", sp_model_path, "--task", "hhh", "--data", hhh,
          "--dtype", dtype, "--out", str(tmp_path / "hhh.json")])
    (model,) = loaded
    assert _dtypes(model) == {held} and model.config.dtype == dtype


def _sft_cfg(lora: bool, num_steps: int = 2):
    from dromedary_jax.training.config import default_config

    cfg = default_config()
    cfg.data.max_len = 32
    cfg.metrics.progress = cfg.metrics.tensorboard = False
    cfg.checkpoint.every_steps = 0
    cfg.checkpoint.async_save = False
    cfg.train.batch_size, cfg.train.num_steps, cfg.train.learning_rate = 4, num_steps, 1e-2
    cfg.train.schedule = "constant"
    cfg.lora.enabled = lora
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 4, 8.0, ("wq", "wv", "w_down")
    return cfg


def _records(path, n=8):
    import json

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"what is {i} plus {i}?",
                                "response": f" it is {2 * i}, the sum."}) + "\n")
    return str(path)


def _opt_leaves(res):
    import orbax.checkpoint as ocp

    state = ocp.PyTreeCheckpointer().restore(f"{res.checkpoint_dir}/{res.step}/state")
    return [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]


def test_lora_fine_tune_keeps_a_bf16_base_and_float32_adapters(tmp_path, sp_tokenizer):
    from dromedary_jax.sharding import make_mesh
    from dromedary_jax.training.loop import run_sft

    model = _numpy_model("bfloat16", "bfloat16", seed=3)
    base = {k: np.asarray(v, np.float32) for k, v in model.params.items()}
    res = run_sft(_sft_cfg(lora=True), model, sp_tokenizer, [_records(tmp_path / "r.jsonl")],
                  str(tmp_path / "w"), mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    assert res.final_loss is not None and np.isfinite(res.final_loss)
    assert _dtypes(model) == {"bfloat16"}  # the frozen base: untouched, still bf16
    for k, v in model.params.items():
        np.testing.assert_array_equal(np.asarray(v, np.float32), base[k])
    assert {str(x.dtype) for x in jax.tree.leaves(res.lora)} == {"float32"}
    # the optimizer state covers the adapters only, in float32
    leaves = _opt_leaves(res)
    assert {tuple(x.shape) for x in leaves} == {tuple(x.shape) for x in jax.tree.leaves(res.lora)}
    assert {str(np.asarray(x).dtype) for x in leaves} == {"float32"}
    # merged into the base's bf16 for a bf16 run; the config says so (a saved checkpoint too)
    assert _dtypes(res.model) == {"bfloat16"} and res.model.config.param_dtype == "bfloat16"
    assert np.abs(np.asarray(res.params["wq"], np.float32) - base["wq"]).max() > 0


def test_lora_merge_of_a_float32_run_is_float32_even_over_a_bf16_base():
    from dromedary_jax.training import lora as lora_lib
    from dromedary_jax.training.loop import final_params

    model = _numpy_model("float32", "bfloat16", seed=4)  # a bf16 checkpoint, float32 compute
    adapters = lora_lib.init_lora(model.config, 4, ("wq", "w_down"), seed=0)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # b off its zero init
    config, merged = final_params(model.config, model.params, adapters, 2.0)
    assert _dtypes(Llama(config, params=merged)) == {"float32"}
    assert config.param_dtype == "float32"
    up = {k: v.astype(jnp.float32) for k, v in model.params.items()}
    want = lora_lib.merge_lora(up, adapters, 2.0)  # what a float32-held base merges to
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(merged[k]), np.asarray(v), err_msg=k)
    # a bf16 run merges into its bf16 base; a full fine-tune's float32 masters stay float32
    bf16 = _numpy_model("bfloat16", "bfloat16", seed=4)
    config, merged = final_params(bf16.config, bf16.params, adapters, 2.0)
    assert config.param_dtype == "bfloat16" and merged["wq"].dtype == jnp.bfloat16
    config, params = final_params(bf16.config.replace(param_dtype="bfloat16"), up)
    assert config.param_dtype == "float32" and params is up


def test_full_fine_tune_trains_float32_masters(tmp_path, sp_tokenizer):
    from dromedary_jax.sharding import make_mesh
    from dromedary_jax.training.loop import run_sft

    model = _numpy_model("bfloat16", "bfloat16", seed=5)  # even when handed bf16 weights
    res = run_sft(_sft_cfg(lora=False, num_steps=1), model, sp_tokenizer,
                  [_records(tmp_path / "r.jsonl")], str(tmp_path / "w"),
                  mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    assert res.lora is None and np.isfinite(res.final_loss)
    assert _dtypes(res.model) == {"float32"} and res.model.config.param_dtype == "float32"
    assert {str(np.asarray(x).dtype) for x in _opt_leaves(res)} == {"float32"}
    assert _dtypes(model) == {"bfloat16"}  # the caller's model is not modified


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_hf_default_dtype_follows_the_run(tmp_path, dtype):
    from safetensors import safe_open

    from dromedary_jax.checkpoint.dtypes import stored_param_dtype
    from dromedary_jax.jsonl import read_json

    model = _numpy_model(dtype=dtype)  # float32-held weights either way
    out = str(tmp_path / "hf")
    dj.save_hf(model, out)
    assert stored_param_dtype(out) == dtype
    with safe_open(f"{out}/model.safetensors", framework="numpy") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {dtype}
    assert read_json(f"{out}/config.json")["torch_dtype"] == dtype
    dj.save_hf(model, out, dtype="float16", overwrite=True)  # an explicit dtype wins
    assert stored_param_dtype(out) == "float16"
