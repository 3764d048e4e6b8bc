"""Rotary position embeddings (half-split / "rotate_half" layout), with Llama-3 and linear scaling.

The model keeps q/k projection weights in the Hugging Face layout, whose head dimension is
ordered [all even rotary components, all odd ones]; in that layout RoPE rotates the first half
of the head dimension against the second half. Meta checkpoints (interleaved pairs) are permuted
into this layout when they are imported (see ``checkpoint/meta.py``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(config) -> np.ndarray:
    """RoPE inverse frequencies [head_dim // 2] float32, radians per position:
    ``1 / rope_theta ** (2i / head_dim)`` (RoFormer, arXiv 2104.09864), divided by ``factor``
    for linear scaling, or rescaled per wavelength for ``"llama3"`` scaling (low frequencies
    divided by ``factor``, high ones kept, a smooth blend between), as HF transformers'
    ``_compute_llama3_parameters`` and Meta's ``apply_scaling`` do. ``config``: anything with
    ``head_dim``, ``rope_theta`` and ``rope_scaling``. ValueError for another ``rope_type``."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    inv = inv.astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
    if rs.rope_type != "llama3":
        raise ValueError(f"unknown rope scaling {rs.rope_type!r}")
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jnp.ndarray, inv_freq: np.ndarray):
    """cos/sin [B, T, head_dim] (float32) for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """The rotate-half partner of x along its head dim ``axis``: [-second half, first half]."""
    half = x.shape[axis] // 2
    first = jax.lax.slice_in_dim(x, 0, half, axis=axis)
    second = jax.lax.slice_in_dim(x, half, x.shape[axis], axis=axis)
    return jnp.concatenate([-second, first], axis=axis)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, H, hd]; cos/sin [B, T, hd]. Computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    out = xf * cos[:, :, None, :] + rotate_half(xf) * sin[:, :, None, :]
    return out.astype(x.dtype)
