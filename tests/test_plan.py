"""``python -m dromedary_jax.plan``: AOT-compiled memory / FLOP plans on a small case."""
import os
import subprocess
import sys

import pytest

from dromedary_jax import plan as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_config():
    import importlib.util

    from dromedary_jax.pipeline.defaults import complete

    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.model.dtype = "bfloat16"
    return complete(c)


@pytest.fixture(scope="module")
def plans(demo_config):
    return {p.name: p for p in P.run_plan(demo_config, devices=8, mesh_shape=(1, 4, 2))}


def test_parameter_and_optimizer_bytes_are_total_over_shards(plans):
    from dromedary_jax.model.config import preset

    c = preset("tiny", max_seq_len=8192)
    full = plans["train/full"]
    assert full.mesh == {"data": 1, "fsdp": 4, "tensor": 2}
    # every tiny parameter divides the 8 shards except the norms, which are replicated
    norms = (2 * c.num_layers + 1) * c.hidden_size
    sharded = c.num_params - norms
    assert full.components["parameters (trainable, fp32)"] == 4 * (sharded // 8 + norms)
    # AdamW: two fp32 moments per parameter, sharded like the parameters (+ scalar counts)
    opt = full.components["optimizer state"]
    assert 2 * 4 * (sharded // 8 + norms) <= opt <= 2 * 4 * (sharded // 8 + norms) + 64
    # the donated state comes back aliased; arguments hold state + batch (+ frozen = {})
    assert full.alias >= full.components["parameters (trainable, fp32)"] + opt - 64
    assert full.argument >= full.alias
    assert full.temp > 0 and full.peak == full.argument + full.output - full.alias + full.temp

    lora = plans["train/lora"]
    # the frozen base is held as sampling holds it (checkpoint/dtypes.py): bf16 in this bf16 run
    assert lora.components["frozen base parameters"] == 2 * (sharded // 8 + norms)
    assert lora.components["LoRA adapters"] < full.components["parameters (trainable, fp32)"] / 10
    assert lora.peak < full.peak


def test_kv_cache_bytes(plans):
    from dromedary_jax.model.config import preset

    c = preset("tiny")
    d = plans["decode"]
    slots = 64 + 16  # prompt bucket + generated-token slots (smoke: 12 new tokens -> 16)
    rows = 8  # config.model.batch_size
    # k and v in bf16, batch over fsdp (4), kv heads over tensor (2); pos/seg int32 over fsdp
    kv = 2 * c.num_layers * rows * slots * c.num_kv_heads * c.head_dim * 2 // 8
    assert d.components[f"KV cache (batch {rows} x {slots} slots)"] == kv + 2 * rows * slots * 4 // 4


def test_flops_count_every_layer(plans):
    # XLA counts a scan body once; the plan adds the other layers back, so the compiled FLOPs
    # (all devices) are close to the analytical 6 N T (+ attention) of the whole step.
    full, lora = plans["train/full"], plans["train/lora"]
    ratio = full.flops_per_device * full.num_devices / full.model_flops
    assert 0.8 < ratio < 1.6, ratio
    assert lora.flops_per_device < full.flops_per_device
    d = plans["decode"]
    assert d.flops_per_device * d.num_devices >= 0.8 * d.model_flops


def test_format_and_fit_verdict(plans):
    lines = P.format_plan(plans["train/full"], "v5e", 0.4)
    text = "\n".join(lines)
    assert "FITS" in text and "v5e (16 GiB per device)" in text
    assert "FLOPs per step" in text and "ms" in text
    big = P.StepPlan(**{**plans["train/full"].__dict__, "temp": 200 * P.GiB})
    assert "DOES NOT FIT" in "\n".join(P.format_plan(big, "v4", 0.4))


def test_cli_sets_device_count_before_jax(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-m", "dromedary_jax.plan", "--config", "configs/demo.py:smoke",
         "--devices", "4", "--mesh", "1,-1,2", "--mode", "lora", "--accelerator", "h100",
         "--noexact_flops", "--config.model.remat=full"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "planning on 4 simulated devices (4 visible" in out.stdout
    assert "train/lora on mesh {'data': 1, 'fsdp': 2, 'tensor': 2} (4 devices)" in out.stdout
    assert "remat full" in out.stdout  # the config's model.remat (no --remat flag given)
    assert "h100 (80 GiB per device): FITS" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "dromedary_jax.plan", "--config", "configs/demo.py:smoke",
         "--devices", "4", "--mesh", "1,3,1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: mesh shape"), bad.stderr
