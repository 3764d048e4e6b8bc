"""Shared bits for the side-by-side benchmarks: the same random weights in torch and in JAX,
a timing helper, and a measured matmul peak for MFU."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def bench_hf_config(**overrides):
    """transformers LlamaConfig of the ~50M "bench-50m" preset."""
    import transformers

    from dromedary_jax.model import preset

    c = preset("bench-50m")
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
              intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
              num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              max_position_embeddings=c.max_seq_len)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def bench_models(seed: int = 0, **overrides):
    """(transformers model, our Llama) with identical random weights, both float32."""
    import torch
    import transformers
    from helpers import ours_from_hf

    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(bench_hf_config(**overrides)).eval()
    return hf, ours_from_hf(hf)


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() over repeats (fn must block until done)."""
    return timeit_interleaved([fn], repeats, warmup)[0]


def timeit_interleaved(fns, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Median wall seconds of each fn() (each must block until done), timed in turns (A B A B
    ...) so that a slow patch of a shared machine hits every side alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of this machine through XLA (the MFU denominator), inputs in
    ``dtype``, accumulated in float32 (as the model's matmuls are)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    sec = timeit(lambda: f(a).block_until_ready(), repeats=repeats)
    return 2 * n**3 / sec


def torch_threads():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()
