"""Masked grouped-query attention with a hand-written backward pass.

One masking rule everywhere (training, packing, sampling): every query and key carries a position
and a segment id; a query attends to a key when both are in the same non-zero segment and the
key's position is not after the query's (:func:`attention_mask`). A query that may attend to no key
at all (a padding query) gets a zero output and passes no gradient.

:func:`attend` computes scores in float32 (``preferred_element_type``; the inputs stay in the
compute dtype), adds the mask as a ``0 / NEG_INF`` bias, and runs in a heads-major layout
(``[B, KV, G*T, hd]``: the G query heads sharing a key/value head are stacked along the rows, so
GQA needs no repeated keys). Its ``custom_vjp`` is the usual closed form (the probabilities are
kept from the forward pass)::

    dV = P^T dO     dP = dO V^T     dS = P * (dP - rowsum(dO * O))     dQ = dS K     dK = dS^T Q

which XLA runs about twice as fast as the autodiff of ``softmax(where(mask, ...))`` on CPU (the
fused elementwise work of the softmax backward is the expensive part there).

:func:`attend_cached` is the sampler's variant (no gradient): the rows' own cache in either layout
plus an optional shared prefix, one softmax over both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30
F32 = jnp.float32


def attention_mask(q_pos, q_seg, kv_pos, kv_seg) -> jax.Array:
    """bool [B, T, S]: same non-zero segment and key position <= query position."""
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    causal = kv_pos[:, None, :] <= q_pos[:, :, None]
    return same & causal


def mask_bias(mask: jax.Array) -> jax.Array:
    """bool mask -> float32 additive bias (0 where attended, NEG_INF elsewhere)."""
    return jnp.where(mask, 0.0, NEG_INF).astype(F32)


def softmax_rows(s: jax.Array) -> jax.Array:
    """float32 softmax over the last axis; a row whose entries are all ~NEG_INF gives zeros."""
    m = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), NEG_INF / 10)
    e = jnp.exp(s - m)
    z = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(z > 0, z, 1.0)


def _probs(qh, kh, bias):
    """qh [B,KV,G*T,hd] (already scaled), kh [B,KV,S,hd], bias [B,T,S] -> probs [B,KV,G*T,S]."""
    B, KV, GT, _ = qh.shape
    T = bias.shape[1]
    s = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=F32)
    s = s.reshape(B, KV, GT // T, T, -1) + bias[:, None, None]
    return softmax_rows(s).reshape(B, KV, GT, -1)


def _core_fwd(qh, kh, vh, bias):
    p = _probs(qh, kh, bias).astype(vh.dtype)
    o = jnp.einsum("bkqs,bksd->bkqd", p, vh, preferred_element_type=F32).astype(vh.dtype)
    return o, (qh, kh, vh, p, o)


def _core_bwd(res, do):
    qh, kh, vh, p, o = res
    dv = jnp.einsum("bkqs,bkqd->bksd", p, do, preferred_element_type=F32).astype(vh.dtype)
    dp = jnp.einsum("bkqd,bksd->bkqs", do, vh, preferred_element_type=F32)
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)
    ds = (p.astype(F32) * (dp - delta)).astype(qh.dtype)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, kh, preferred_element_type=F32).astype(qh.dtype)
    dk = jnp.einsum("bkqs,bkqd->bksd", ds, qh, preferred_element_type=F32).astype(kh.dtype)
    return dq, dk, dv, None


@jax.custom_vjp
def _core(qh, kh, vh, bias):
    return _core_fwd(qh, kh, vh, bias)[0]


_core.defvjp(_core_fwd, _core_bwd)


def attend(q, k, v, mask) -> jax.Array:
    """Grouped-query attention. q [B,T,H,hd], k/v [B,S,KV,hd], mask bool [B,T,S] -> [B,T,H,hd]
    (in v's dtype)."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    G = H // KV
    q = q * jnp.asarray(1.0 / np.sqrt(hd), q.dtype)
    qh = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
    kh = k.transpose(0, 2, 1, 3)
    vh = v.transpose(0, 2, 1, 3)
    o = _core(qh, kh, vh, mask_bias(mask))
    return o.reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


CACHE_LAYOUTS = ("bskd", "keys_transposed")


def attend_cached(q, k, v, mask, pk=None, pv=None, pmask=None, *, layout: str = "bskd"
                  ) -> jax.Array:
    """Sampling attention (no custom gradient) over the rows' own keys and, optionally, a shared
    prefix that every row attends (ONE copy for the batch), with one softmax over all keys.

    q [B,T,H,hd]; the rows' k/v with mask [B,T,S], in one of ``CACHE_LAYOUTS``:

    * ``"bskd"`` (the model's cache): k/v [B,S,KV,hd]; the prefix pk/pv [P,KV,hd];
    * ``"keys_transposed"`` (the CPU decode paths' cache): k [B,KV,hd,S], v [B,KV,S,hd]; the
      prefix [KV,P,hd]. Both dots are then plain ``[G*T, hd] x [hd, S]`` / ``[G*T, S] x [S, hd]``
      matmuls per (row, kv head): XLA:CPU runs the score dot about 2x faster than against
      [S, hd] keys (which it reads transposed).

    pmask [B,T,P] masks the prefix. Returns [B,T,H,hd] in v's dtype. ValueError for another
    layout.

    Every dot is a plain batched matmul (batch dims, ONE free dim per side, one contracting
    dim), as in :func:`attend`: the G query heads of a key/value head are stacked along the
    rows (``[B, KV, G*T, hd]``; for the prefix, which has no batch axis, ``[KV, B*G*T, hd]``).
    XLA:CPU has no bf16 x bf16 -> f32 kernel for dots with two free dims on one side, which is
    what grouped-query attention at batch >= 2 gave in the ``btkgd`` form."""
    if layout not in CACHE_LAYOUTS:
        raise ValueError(f"layout must be one of {CACHE_LAYOUTS}, got {layout!r}")
    B, T, H, hd = q.shape
    kv_major = layout == "keys_transposed"
    KV = k.shape[1] if kv_major else k.shape[2]
    G = H // KV
    rows = "bksd" if kv_major else "bskd"
    keys = "bkds" if kv_major else rows
    q = q * jnp.asarray(1.0 / np.sqrt(hd), q.dtype)
    qh = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
    s = jnp.einsum(f"bkqd,{keys}->bkqs", qh, k, preferred_element_type=F32)
    s = jnp.where(mask[:, None, None], s.reshape(B, KV, G, T, -1), NEG_INF)
    P = 0
    if pk is not None:
        pre = "kpd" if kv_major else "pkd"
        qp = qh.transpose(1, 0, 2, 3).reshape(KV, B * G * T, hd)
        s_pre = jnp.einsum(f"kqd,{pre}->kqp", qp, pk, preferred_element_type=F32)
        P = s_pre.shape[-1]
        s_pre = s_pre.reshape(KV, B, G, T, P).transpose(1, 0, 2, 3, 4)
        s = jnp.concatenate([jnp.where(pmask[:, None, None], s_pre, NEG_INF), s], axis=-1)
    probs = softmax_rows(s).astype(v.dtype).reshape(B, KV, G * T, -1)
    out = jnp.einsum(f"bkqs,{rows}->bkqd", probs[..., P:], v, preferred_element_type=F32)
    if pk is not None:
        pp = probs[..., :P].transpose(1, 0, 2, 3).reshape(KV, B * G * T, P)
        out_pre = jnp.einsum(f"kqp,{pre}->kqd", pp, pv, preferred_element_type=F32)
        out = out + out_pre.reshape(KV, B, G * T, hd).transpose(1, 0, 2, 3)
    out = out.astype(v.dtype).reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4)
    return out.reshape(B, T, H, hd)
