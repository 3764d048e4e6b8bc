"""The paper's run: SELF-ALIGN on LLaMA-65B on a TPU pod slice (e.g. v4-256), paper settings.

    experiments/tpu/launch.sh --name dromedary --zone ZONE --accelerator v4-256 -- \\
        python -m dromedary_jax.run --config configs/dromedary_65b.py --workdir /mnt/runs/d65b \\
        --config.model.checkpoint=/mnt/llama-65b --config.model.tokenizer=/mnt/llama-65b/tokenizer.model
    python -m dromedary_jax.run --config configs/dromedary_65b.py --dry_run --devices 128  # plan a
        # v4-256 (128 chips) here, no TPU needed; `python -m dromedary_jax.plan` compiles the steps

Paper settings (arXiv 2305.03047): topics T=1.0 top_p=0.98 128 tokens; questions T=1.0 top_p=0.95;
vanilla self-instruct T=1.0 top_p=0.98; self-align T=0.5 top_p=0.95 256 tokens, -100 on the
first token of "Sorry", 16 principles + 5 exemplars; engraving LoRA r=16 alpha=16 q/k/v/o, lr 4e-4,
1 epoch, 512 tokens; verbose cloning T=0.3 top_p=0.7, 3-/4-gram penalties, 512 new tokens, then
768-token context distillation. These are the defaults of dromedary_jax.pipeline.defaults; this
file sets the model, the mesh and the pod-sized batches.
"""
from dromedary_jax.pipeline.defaults import get_defaults


def get_config(arg=None):
    c = get_defaults()
    m = c.model
    m.checkpoint = "/mnt/llama-65b"   # HF or Meta folder; override on the command line
    m.preset = "llama-65b"            # used for --dry_run estimates when the checkpoint is remote
    m.dtype = "bfloat16"
    m.mesh = (1, -1, 4)               # ('data','fsdp','tensor'): see docs/scaling.md
    m.remat = "full"                  # the fine-tunes do not fit 32 GiB v4 chips without it
    m.batch_size = 64                 # sampler rows per batch (all hosts)
    c.distributed.enabled = "auto"    # jax.distributed.initialize() on TPU

    c.self_instruct.batch_size = 256
    c.self_instruct.vanilla.num_instructions = 250_000
    c.self_instruct.vanilla.requests_per_round = 512
    c.self_align.batch_size = 256
    c.verbose_clone.batch_size = 256

    for section in (c.engrave, c.verbose_clone):
        t = section.train
        t.train.batch_size = 128
        t.train.grad_accum = 1
        t.mesh.shape = (1, -1, 4)
        t.checkpoint.every_steps = 200
        t.eval.every_steps = 200
        t.metrics.peak_flops = 275e12   # TPU v4 bf16 per chip, for MFU
    return c
