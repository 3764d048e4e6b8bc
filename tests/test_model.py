"""The Flax LLaMA against transformers, on one device and on an 8-device mesh."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dromedary_jax.errors import UserError
from dromedary_jax.model import Llama, ModelConfig, forward, logits, preset
from dromedary_jax.model.llama import place_params
from dromedary_jax.sharding import check_model_fits_mesh, logical_to_spec, make_mesh, resolve_mesh_shape
from helpers import ours_from_hf, random_ids, tiny_hf_model

VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "theta500k": dict(rope_theta=500000.0),
    "llama3_scaling": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
}


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    hf = tiny_hf_model(**VARIANTS[variant])
    model = ours_from_hf(hf)
    ids = random_ids(2, 96)
    ours = logits(model, ids)
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_unscanned_and_remat_match_scanned():
    hf = tiny_hf_model(num_key_value_heads=2)
    ids = random_ids(2, 40)
    ref = logits(ours_from_hf(hf), ids)
    for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots")):
        np.testing.assert_allclose(logits(ours_from_hf(hf, **kw), ids), ref, atol=1e-5, rtol=0)


def test_bfloat16_compute_is_close():
    hf = tiny_hf_model()
    ids = random_ids(2, 32)
    ref = logits(ours_from_hf(hf), ids)
    bf = logits(ours_from_hf(hf, dtype="bfloat16"), ids)
    assert bf.dtype == np.float32
    assert np.abs(bf - ref).max() < 0.1  # bf16 matmuls: close, not exact


def test_sharded_mesh_matches_single_device():
    assert len(jax.devices()) == 8
    hf = tiny_hf_model(num_key_value_heads=2)
    ids = random_ids(4, 48)
    single = logits(ours_from_hf(hf), ids)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = ours_from_hf(hf, mesh=mesh)
    p = model.params
    # parameters are really spread over the mesh
    assert p["wq"].sharding.spec == logical_to_spec(("layers", "embed", "heads", "head_dim"), mesh)
    assert tuple(p["wq"].sharding.spec) == (None, "fsdp", "tensor", None)
    assert tuple(p["w_down"].sharding.spec) == (None, "tensor", "fsdp")
    assert tuple(p["embed"].sharding.spec) == ("tensor", "fsdp")
    assert len(p["wq"].sharding.device_set) == 8
    assert p["wq"].addressable_shards[0].data.shape == (2, 32, 2, 16)
    sharded = logits(model, ids)
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)


def test_packed_segments_equal_separate_forwards():
    """Two examples packed in one row (segment ids + restarted positions) == run apart."""
    hf = tiny_hf_model(num_key_value_heads=2)
    model = ours_from_hf(hf)
    a, b = random_ids(1, 20, seed=1)[0], random_ids(1, 12, seed=2)[0]
    tokens = np.concatenate([a, b, np.zeros(8, np.int32)])[None]
    seg = np.concatenate([np.full(20, 1), np.full(12, 2), np.zeros(8)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(20), np.arange(12), np.zeros(8)])[None].astype(np.int32)
    packed, _ = forward(model.params, model.config, jnp.asarray(tokens),
                        positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    packed = np.asarray(packed)
    np.testing.assert_allclose(packed[0, :20], logits(model, a[None])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[0, 20:32], logits(model, b[None])[0], atol=1e-5, rtol=0)


def test_lora_delta_equals_merged_weights():
    cfg = preset("tiny")
    model = Llama(cfg, rngs=None)
    p = model.params
    L, D, H, hd, r = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, 4
    rng = np.random.RandomState(0)
    lora = {"wq": {"a": rng.randn(L, D, r).astype(np.float32) * 0.1,
                   "b": rng.randn(L, r, H, hd).astype(np.float32) * 0.1},
            "wo": {"a": rng.randn(L, H, hd, r).astype(np.float32) * 0.1,
                   "b": rng.randn(L, r, D).astype(np.float32) * 0.1}}
    scale = 2.0
    ids = jnp.asarray(random_ids(2, 16, vocab=cfg.vocab_size))
    with_lora, _ = forward(p, cfg, ids, lora=lora, lora_scale=scale)
    merged = dict(p)
    merged["wq"] = p["wq"] + scale * np.einsum("ldr,lrhk->ldhk", lora["wq"]["a"], lora["wq"]["b"])
    merged["wo"] = p["wo"] + scale * np.einsum("lhkr,lrd->lhkd", lora["wo"]["a"], lora["wo"]["b"])
    ref, _ = forward(merged, cfg, ids)
    np.testing.assert_allclose(np.asarray(with_lora), np.asarray(ref), atol=1e-4, rtol=0)
    plain, _ = forward(p, cfg, ids)
    assert np.abs(np.asarray(plain) - np.asarray(ref)).max() > 1e-3  # the adapters do something


def test_presets_have_published_sizes():
    assert abs(preset("llama-7b").num_params / 1e9 - 6.74) < 0.05
    assert abs(preset("llama-65b").num_params / 1e9 - 65.3) < 0.3
    assert abs(preset("llama2-70b").num_params / 1e9 - 69.0) < 0.3
    assert abs(preset("llama3-8b").num_params / 1e9 - 8.03) < 0.05
    assert preset("llama3-8b").rope_theta == 500000.0
    assert 40e6 < preset("bench-50m").num_params < 60e6


def test_hf_config_roundtrip():
    hf = tiny_hf_model(**VARIANTS["llama3_scaling"])
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 32
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_meta_params_config():
    cfg = ModelConfig.from_meta_params({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3,
                                        "n_heads": 64, "n_kv_heads": 8, "n_layers": 80,
                                        "norm_eps": 1e-5, "vocab_size": 32000})
    assert cfg.intermediate_size == 28672  # Llama-2-70B


@pytest.mark.parametrize("bad, match", [
    (lambda: preset("llama-8b"), "unknown model preset 'llama-8b'"),
    (lambda: resolve_mesh_shape({"data": 3, "fsdp": -1}, 8), "does not divide the 8"),
    (lambda: resolve_mesh_shape((2, 2, 4), 8), "needs 16 devices"),
    (lambda: resolve_mesh_shape({"data": -1, "fsdp": -1}, 8), "more than one -1"),
    (lambda: resolve_mesh_shape({"model": 8}, 8), "mesh axes must be among"),
    (lambda: check_model_fits_mesh(preset("tiny", num_heads=4, num_kv_heads=4),
                                   make_mesh({"fsdp": 1, "tensor": 8})), "does not divide num_heads=4"),
    (lambda: ModelConfig.from_hf_config({"hidden_size": 8}), "missing the key 'vocab_size'"),
    (lambda: preset("tiny", num_kv_heads=3), "not a multiple of num_kv_heads=3"),
    (lambda: preset("tiny", dtype="float16"), "dtype='float16'"),
])
def test_bad_config_errors(bad, match):
    with pytest.raises(UserError, match=match):
        bad()


@pytest.mark.parametrize("ids, match", [
    ([1, 5, 6], r"shape \(3,\)"),                     # one prompt, not wrapped in a batch
    ([[1, 5], [6]], "different lengths"),
    ([[]], r"shape \(1, 0\)"),
    ([], r"shape \(0,\)"),
    ([[1.7, 5.9]], "float64 values"),
    ([[1, 256]], r"outside \[0, 256\): min 1, max 256"),
    ([[1, -1]], r"outside \[0, 256\): min -1"),
])
def test_logits_bad_input_ids(ids, match):
    model = Llama(preset("tiny", vocab_size=256))
    with pytest.raises(UserError, match=match):
        logits(model, ids)


def test_logits_warns_beyond_max_seq_len():
    model = Llama(preset("tiny", vocab_size=256, max_seq_len=8))
    with pytest.warns(UserWarning, match="more than the model's max_seq_len"):
        out = logits(model, np.ones((1, 9), np.int64))
    assert out.shape == (1, 9, 256)


def test_place_params_on_mesh_roundtrip():
    cfg = preset("tiny-gqa")
    model = Llama(cfg)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    placed = place_params(jax.device_get(model.params), cfg, mesh)
    for k, v in placed.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(model.params[k]))
    assert tuple(placed["wk"].sharding.spec) == (None, "fsdp", "tensor", None)


def test_lora_dropout_only_touches_the_adapter_path():
    cfg = preset("tiny")
    p = Llama(cfg).params
    L, D, r = cfg.num_layers, cfg.hidden_size, 4
    rng = np.random.RandomState(1)
    lora = {k: {"a": rng.randn(L, D, r).astype(np.float32) * 0.1,
                "b": rng.randn(L, r, cfg.intermediate_size).astype(np.float32) * 0.1}
            for k in ("w_gate", "w_up")}
    ids = jnp.asarray(random_ids(2, 12, vocab=cfg.vocab_size))
    run = lambda lo, key, rate: np.asarray(forward(p, cfg, ids, lora=lo, lora_dropout=rate,
                                                   dropout_rng=key)[0])
    k0, k1 = jax.random.key(0), jax.random.key(1)
    np.testing.assert_array_equal(run(lora, k0, 0.5), run(lora, k0, 0.5))  # same key, same mask
    assert np.abs(run(lora, k0, 0.5) - run(lora, k1, 0.5)).max() > 1e-4
    assert np.abs(run(lora, k0, 0.5) - run(lora, None, 0.5)).max() > 1e-4  # no rng: no dropout
    zero_b = {k: {"a": v["a"], "b": np.zeros_like(v["b"])} for k, v in lora.items()}
    np.testing.assert_allclose(run(zero_b, k0, 0.5), run(None, None, 0.0), atol=1e-6, rtol=0)


def test_mesh_programs_need_no_full_rematerialization(tmp_path):
    """On a (2, 2, 2) mesh the forward and the sampler compile without SPMD's "Involuntary full
    rematerialization" (an activation replicated on every device to re-split it). XLA only
    logs it, from C++, so the programs compile in a subprocess whose stderr is read."""
    script = tmp_path / "compile_on_mesh.py"
    script.write_text(
        "import jax, numpy as np\nfrom flax import nnx\n"
        "from dromedary_jax.model import Llama, logits, preset\n"
        "from dromedary_jax.sampling import generate\n"
        "from dromedary_jax.sharding import make_mesh\n"
        "mesh = make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})\n"
        "model = Llama(preset('tiny-gqa'), rngs=nnx.Rngs(0), mesh=mesh)\n"
        "ids = np.random.RandomState(0).randint(0, 512, (8, 16))\n"
        "logits(model, ids)\n"
        "generate(model, ids.tolist(), max_new_tokens=3)\n"
        "print('compiled')\n")
    # compiled here, not read from the test session's compilation cache: the log is what we read
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_ENABLE_COMPILATION_CACHE="false")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
    assert "Involuntary full rematerialization" not in out.stderr, out.stderr[-3000:]
