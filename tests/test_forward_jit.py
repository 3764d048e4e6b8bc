"""forward_jit: forward-only programs compile with oneDNN dots on x86 CPUs, give the same numbers
as XLA's default kernels, and the DROMEDARY_JAX_ONEDNN switch turns it off."""
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dromedary_jax import forward_jit as fj
from dromedary_jax.model import llama
from dromedary_jax.model.config import preset
from dromedary_jax.sharding import make_mesh

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _onednn_fusions(compiled_text: str) -> int:
    return compiled_text.count('"kind":"__onednn_fusion"')


def test_switch(monkeypatch):
    monkeypatch.delenv(fj.ENV_SWITCH, raising=False)
    assert not fj.onednn_enabled("tpu") and not fj.onednn_enabled("gpu")
    assert fj.onednn_enabled("cpu") == X86
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv(fj.ENV_SWITCH, off)
        assert not fj.onednn_enabled("cpu")
    monkeypatch.setenv(fj.ENV_SWITCH, "1")
    assert fj.onednn_enabled("cpu") == X86


@pytest.mark.skipif(not X86, reason="oneDNN dots are only turned on for x86 CPUs")
def test_options_reach_the_compiled_program(monkeypatch):
    cfg = preset("tiny")
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    big = jnp.zeros((2, llama.ONEDNN_MIN_TOKENS // 2), jnp.int32)
    small = jnp.zeros((2, 16), jnp.int32)
    fusions = lambda t: _onednn_fusions(llama._logits_jit.lower(params, t, cfg, None)
                                        .compile().as_text())
    monkeypatch.setenv(fj.ENV_SWITCH, "1")
    assert fusions(big) > 0
    assert fusions(small) == 0  # below ONEDNN_MIN_TOKENS: oneDNN's per-call cost would not pay
    monkeypatch.setenv(fj.ENV_SWITCH, "0")
    assert fusions(big) == 0


@pytest.mark.skipif(not X86, reason="oneDNN dots are only turned on for x86 CPUs")
@pytest.mark.parametrize("name,dtype,mesh_shape", [
    ("tiny", "float32", None), ("tiny-gqa", "float32", (2, 2, 2)), ("tiny-gqa", "bfloat16", None)])
def test_same_logits_as_default_kernels(name, dtype, mesh_shape):
    cfg = preset(name, dtype=dtype)
    mesh = None if mesh_shape is None else make_mesh(mesh_shape, jax.devices()[:8])
    params = llama.init_params(cfg, jax.random.PRNGKey(1), mesh=mesh)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 24)), jnp.int32)
    plain = np.asarray(llama._logits_jit._plain(params, tokens, cfg, mesh))
    onednn = np.asarray(llama._logits_jit._onednn(params, tokens, cfg, mesh))
    assert np.isfinite(onednn).all()
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(onednn, plain, atol=tol, rtol=0)


def test_nested_in_another_trace(monkeypatch):
    """Inside jit / eval_shape the oneDNN options cannot apply: the plain jit is inlined."""
    monkeypatch.setenv(fj.ENV_SWITCH, "1")
    cfg = preset("tiny")
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.ones((2, 8), jnp.int32)
    shape = jax.eval_shape(lambda p, t: llama._logits_jit(p, t, cfg, None), params, tokens)
    assert shape.shape == (2, 8, cfg.vocab_size)
    outer = jax.jit(lambda p, t: llama._logits_jit(p, t, cfg, None).sum())(params, tokens)
    direct = llama._logits_jit(params, tokens, cfg, None).sum()
    np.testing.assert_allclose(float(outer), float(direct), rtol=1e-5)
