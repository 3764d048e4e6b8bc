"""Training throughput: our jit'ed SFT train step vs a transformers (torch) AdamW step.

    python benchmarks/train.py [--steps 5] [--batch 8] [--seq 256] [--preset bench-50m]
                               [--remat dots] [--dtype float32]

One run measures, on this machine and in this order:
  1. matmul peak: the best FLOP/s of a large matmul (in ``--dtype``) in JAX and in torch (the
     higher one is the machine's measured peak);
  2. ours: ``training.step.make_train_step`` (full fine-tune, AdamW, global-norm clipping, loss
     on every target token), one device, batch x seq tokens per step, with the model's
     ``remat`` policy set to ``--remat`` (default ``dots``: save the projection outputs and
     recompute the rest; on XLA:CPU that is faster than saving everything, because stacking the
     saved activations of the layer scan costs more than recomputing the cheap ones);
  3. peer: ``transformers.LlamaForCausalLM`` with the same config and weights, ``torch.optim.AdamW``,
     ``clip_grad_norm_``, the same batch. With ``--dtype bfloat16`` both sides keep float32
     parameters and compute in bfloat16 (ours: ``ModelConfig.dtype``; torch: ``torch.autocast``).
It prints tokens/s for both, the ratio (target >= 1.0x) and our MFU against the measured peak
(target >= 50%), using ``ModelConfig.flops_per_token(seq, training=True)``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import matmul_peak_flops, timeit  # noqa: E402  (benchmarks/common.py)


def matmul_peak(dtype: str, n: int = 2048) -> tuple[float, float]:
    """Measured matmul FLOP/s (inputs in ``dtype``) through XLA and through torch."""
    import torch

    ta = torch.randn(n, n).to(getattr(torch, dtype))
    with torch.no_grad():
        t_torch = timeit(lambda: ta @ ta)
    return matmul_peak_flops(n, dtype=dtype), 2.0 * n ** 3 / t_torch


def bench_ours(config, params_np, tokens: np.ndarray, steps: int) -> tuple[float, float]:
    import jax

    from dromedary_jax.sharding import make_mesh
    from dromedary_jax.model.llama import param_shardings
    from dromedary_jax.training import step as step_lib
    from dromedary_jax.training.config import default_config
    from dromedary_jax.training.optimizer import make_optimizer

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    cfg = default_config().train
    cfg.learning_rate, cfg.schedule, cfg.clip_norm = 1e-4, "constant", 1.0
    tx, schedule = make_optimizer(cfg, 1000)
    p_sh = param_shardings(config, mesh)
    params = {k: jax.device_put(v, p_sh[k]) for k, v in params_np.items()}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state_sh = step_lib.state_shardings(tx, p_sh, abstract, mesh)
    state = step_lib.init_state(tx, params, 0, state_sh)
    B, T = tokens.shape[0], tokens.shape[1] - 1
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((B, T), np.int32), "segment_ids": np.ones((B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
    b_sh = step_lib.batch_sharding(mesh, (1, B, T))
    batch = {k: jax.device_put(v.reshape(1, B, T), b_sh) for k, v in host.items()}
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(config, tx, schedule, is_lora=False, mesh=mesh,
                                 param_shardings=p_sh),
        state_sh, {k: b_sh for k in host}, {}, mesh)
    box = {"state": state, "losses": []}

    def one():
        box["state"], m = fn(box["state"], batch, {})
        box["losses"].append(float(m["loss"]))  # waits for the step

    dt = timeit(one, steps)
    return B * T / dt, box["losses"][0]


def bench_torch(config, params_np, tokens: np.ndarray, steps: int) -> tuple[float, float]:
    import contextlib

    import torch
    import transformers

    from dromedary_jax.checkpoint.hf_mapping import hf_tensors_from_params

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config.to_hf_config().items()
                                         if k not in ("architectures", "torch_dtype")})
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in hf_tensors_from_params(params_np, config).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    losses = []

    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.dtype == "bfloat16"
                else contextlib.nullcontext())

    def one():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))

    B, T = ids.shape
    return B * T / timeit(one, steps), losses[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-50m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="dots", choices=("none", "dots", "full"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)

    import jax
    import torch

    from dromedary_jax.model.config import preset
    from dromedary_jax.model.llama import param_shapes

    torch.set_num_threads(os.cpu_count() or 1)
    config = preset(args.preset, dtype=args.dtype, remat=args.remat)
    rng = np.random.RandomState(0)
    params_np = {k: (np.ones(s, np.float32) if k.endswith("norm")
                     else (0.02 * rng.randn(*s)).astype(np.float32))
                 for k, s in param_shapes(config).items()}
    tokens = rng.randint(3, config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)

    peak_jax, peak_torch = matmul_peak(args.dtype)
    peak = max(peak_jax, peak_torch)
    ours, loss_ours = bench_ours(config, params_np, tokens, args.steps)
    theirs, loss_theirs = bench_torch(config, params_np, tokens, args.steps)
    flops = config.flops_per_token(args.seq, training=True)
    print(f"device: {jax.devices()[0].device_kind} x1, {os.cpu_count()} cpu threads; "
          f"model {args.preset} ({config.num_params / 1e6:.1f}M params), "
          f"batch {args.batch} x {args.seq}, {args.dtype} compute (float32 params), "
          f"remat {args.remat}")
    print(f"matmul peak: jax {peak_jax / 1e9:.1f} GFLOP/s, torch {peak_torch / 1e9:.1f} GFLOP/s "
          f"-> peak {peak / 1e9:.1f} GFLOP/s")
    print(f"same model, same batch: first-step loss ours {loss_ours:.5f}, peer {loss_theirs:.5f}")
    print(f"ours (jax train_step):         {ours:10.1f} tokens/s")
    print(f"peer (transformers + AdamW):   {theirs:10.1f} tokens/s")
    print(f"ratio ours/peer: {ours / theirs:.2f}x (target >= 1.0x)")
    print(f"MFU ours: {100 * ours * flops / peak:.1f}% of measured peak (target >= 50%); "
          f"peer: {100 * theirs * flops / peak:.1f}%")


if __name__ == "__main__":
    main()
