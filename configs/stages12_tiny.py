"""Stages 1-2 (self-instruct + self-align) at toy scale, to try the pipeline end to end.

    python -m dromedary_jax.run --config configs/stages12_tiny.py --workdir /tmp/s12
    python -m dromedary_jax.run --config configs/stages12_tiny.py:tiny --workdir /tmp/s12t \
        --config.model.tokenizer=/path/to/tokenizer.model

arg "scripted" (default): the scripted fake model (realistic text; every parser and filter runs).
arg "tiny": a randomly initialised "tiny" Llama; its output is gibberish, so the filters are
relaxed and the prompts shortened (1 exemplar) to keep CPU runs short.
"""
from dromedary_jax.pipeline.defaults import get_defaults, relax_for_random_tiny_model


def get_config(arg=None):
    kind = arg or "scripted"
    c = get_defaults()
    c.seed = 0
    c.stages = ("self_instruct", "self_align")

    si = c.self_instruct
    si.batch_size = 8
    si.topics.rounds = 2
    si.topics.max_prompts_per_type = 2
    si.questions.max_prompts = 12
    si.vanilla.num_instructions = 30
    si.vanilla.requests_per_round = 8
    si.vanilla.max_rounds = 6
    si.vanilla.prompt_seed_tasks = 3
    si.vanilla.prompt_machine_tasks = 1

    sa = c.self_align
    sa.batch_size = 8
    sa.max_questions = 48

    if kind == "scripted":
        c.model.kind = "scripted"
    elif kind == "tiny":
        relax_for_random_tiny_model(c)
        sa.max_questions = 4
        sa.max_new_tokens = 16
    else:
        raise ValueError(f"configs/stages12_tiny.py: unknown arg {arg!r}; use 'scripted' or 'tiny'")
    return c
