"""The attention kernel (custom backward) and the float32-accumulating matmul."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dromedary_jax.model.attention import NEG_INF, attend, attention_mask
from dromedary_jax.model.llama import matmul


def reference_attend(q, k, v, mask):
    """Plain autodiff attention: softmax(where(mask, q k^T / sqrt(d), -inf)) v, repeated kv heads."""
    H, KV, hd = q.shape[2], k.shape[2], q.shape[3]
    k = jnp.repeat(k, H // KV, axis=2)
    v = jnp.repeat(v, H // KV, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    s = jnp.where(mask[:, None], s, NEG_INF)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def packed_inputs(kv_heads):
    """Two rows: row 0 packs two examples, row 1 has 5 left-padding tokens."""
    B, T, H, hd = 2, 24, 4, 8
    r = np.random.RandomState(0)
    q, k, v = (jnp.asarray(r.randn(B, T, n, hd), jnp.float32) for n in (H, kv_heads, kv_heads))
    seg = np.ones((B, T), np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    seg[0, 10:] = 2
    pos[0, 10:] = np.arange(T - 10)
    seg[1, :5] = 0
    pos[1, 5:] = np.arange(T - 5)
    return q, k, v, jnp.asarray(seg), attention_mask(pos, seg, pos, seg)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attend_and_its_gradients_match_autodiff_reference(kv_heads):
    q, k, v, seg, mask = packed_inputs(kv_heads)
    valid = (seg != 0)[:, :, None, None].astype(jnp.float32)
    probe = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)

    def loss(fn):  # weighted sum over real (non-padding) query rows only
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * probe * valid)

    out, ref = attend(q, k, v, mask), reference_attend(q, k, v, mask)
    np.testing.assert_allclose(out * valid, ref * valid, atol=1e-6)
    grads = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(reference_attend), argnums=(0, 1, 2))(q, k, v)
    for g, rg in zip(grads, ref_grads):
        assert float(jnp.abs(rg).max()) > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(g, rg, atol=1e-5)


def test_padding_queries_get_zero_output_and_pass_no_gradient():
    q, k, v, seg, mask = packed_inputs(2)
    out = attend(q, k, v, mask)
    assert np.all(np.asarray(out[1, :5]) == 0)
    # a loss on padding rows only must not reach any key or value
    pad = (seg == 0)[:, :, None, None].astype(jnp.float32)
    gk, gv = jax.grad(lambda k, v: jnp.sum(attend(q, k, v, mask) * pad), argnums=(0, 1))(k, v)
    assert float(jnp.abs(gk).max()) == 0 and float(jnp.abs(gv).max()) == 0


def test_bfloat16_matmul_accumulates_and_returns_float32():
    # 4097 is not a bfloat16 number (spacing 32 there): only a float32 accumulator AND a float32
    # result keep it
    x = jnp.ones((1, 4097), jnp.bfloat16)
    w = jnp.ones((4097, 1), jnp.bfloat16)
    assert float(matmul(x, w, jnp.float32)[0, 0]) == 4097.0
    assert matmul(x, w).dtype == jnp.bfloat16
