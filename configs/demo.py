"""The demo: all four SELF-ALIGN stages with a tiny randomly initialised LLaMA on CPU (minutes).

    make demo
    python -m dromedary_jax.run --config configs/demo.py --workdir demo_workdir
    # the same toy-sized run on a real checkpoint (a quick check that it loads and samples):
    python -m dromedary_jax.run --config configs/demo.py --workdir run1 \\
        --config.model.checkpoint=/path/to/llama --config.model.tokenizer=/path/to/tokenizer.model

For a real run use configs/llama2_7b.py, configs/llama3_8b.py or configs/dromedary_65b.py: this
config keeps its toy settings with any model (8 questions, 1 exemplar, 24 new tokens, 6 training
steps, relaxed filters). A random model writes gibberish, so the filters are RELAXED (topic lines
of up to 50 words, no answer header, no minimum answer length) and stage 2 answers 8 of the
red-teaming seed questions (4 with "smoke") instead of the (unparseable) generated ones. The
tokenizer is a tiny SentencePiece model trained on data/ ("builtin:demo"), since no pretrained
tokenizer can be downloaded. Everything else (prompts, records, shared-prefix sampling, LoRA
fine-tunes, checkpoints, HF export, report) is the real code.

arg "smoke" shrinks it further (4 questions, 4 training steps) for tests and the notebook test.
"""
from dromedary_jax.pipeline.defaults import get_defaults, relax_for_random_tiny_model


def get_config(arg=None):
    c = get_defaults()
    c.seed = 0
    c.notice = ("demo config: toy settings for a tiny RANDOMLY initialised model (it writes "
                "gibberish): filters are relaxed (no answer header or minimum length required) "
                "and stage 2 answers 8 red-teaming seed questions; for a real run use "
                "configs/llama2_7b.py, llama3_8b.py or dromedary_65b.py")
    relax_for_random_tiny_model(c)      # relaxed stage 1-2 settings, seed questions in stage 2
    c.model.tokenizer = "builtin:demo"
    si = c.self_instruct
    sa = c.self_align
    sa.max_questions = 8
    sa.max_new_tokens = 24

    for section, max_len in ((c.engrave, 384), (c.verbose_clone, 384)):
        t = section.train
        section.heldout_fraction = 0.25
        t.data.max_len = max_len
        t.train.batch_size = 4
        t.train.num_steps = 6
        t.train.learning_rate = 1e-3
        t.lora.rank = 4
        t.checkpoint.every_steps = 3
        t.eval.every_steps = 3
        t.metrics.progress = False

    vc = c.verbose_clone
    vc.batch_size = 8
    vc.max_new_tokens = 24
    vc.min_answer_chars = 0             # relaxed
    c.report.num_samples = 2
    c.report.max_new_tokens = 16
    if arg == "smoke":
        sa.max_questions = 4
        si.topics.max_new_tokens = si.questions.max_new_tokens = si.vanilla.max_new_tokens = 12
        sa.max_new_tokens = vc.max_new_tokens = 12
        for section in (c.engrave, c.verbose_clone):
            section.train.train.num_steps = 4
            section.train.checkpoint.every_steps = 2
            section.train.eval.every_steps = 2
            section.train.data.max_len = 256
        c.report.num_samples = 1
        c.report.max_new_tokens = 8
    elif arg:
        raise ValueError(f"configs/demo.py: unknown arg {arg!r} (use nothing or 'smoke')")
    return c
