"""The pipeline's default config (the paper's settings for every stage) and its validation.

An experiment config is one ml_collections ConfigDict; a config file starts from
``get_defaults()`` and changes what it needs (so every key can be overridden on the command line):

    from dromedary_jax.pipeline.defaults import get_defaults
    def get_config(arg=None):
        c = get_defaults()
        c.model.checkpoint = "/ckpt/llama-65b"
        return c

Top-level keys: ``seed``, ``overwrite``, ``force``, ``stages``, ``notice``; sections (checked and
merged by ``complete``): ``model``, ``distributed``, ``data``, ``self_instruct``, ``self_align``,
``engrave``, ``verbose_clone``, ``report``, ``evaluate``. Other top-level keys are copied as they
are by ``complete``.
"""
from __future__ import annotations

import ml_collections

from dromedary_jax.errors import UserError
from dromedary_jax.training.config import (_MISSING, BOOL, PROB, UNIT, Choice, Float, Int, Rule,
                                           check_rules, lookup)
from dromedary_jax.training.config import validate as finetune_validate

PIPELINE_SECTIONS = ("model", "data", "self_instruct", "self_align", "engrave", "verbose_clone",
                     "report", "evaluate", "distributed")
FREE_FORM = ("logit_bias", "overrides")  # dict-valued keys whose own keys are not checked
TOP_LEVEL = ("seed", "overwrite", "force", "stages", "notice")


def get_defaults() -> ml_collections.ConfigDict:
    """A fresh, unlocked ConfigDict holding every pipeline key with its default: the top-level keys
    and the sections listed in the module docstring. Stage settings follow the paper (Sun et al.
    2023, "Principle-Driven Self-Alignment of Language Models from Scratch with Minimal Human
    Supervision"); the comment next to each key gives its meaning and units."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # A stage folder written under a different config is refused unless one of these is set:
    c.overwrite = False  # delete that stage's outputs and start it over
    c.force = False      # keep them and append under the new config
    c.stages = ()        # the stages --stages defaults to (() = all, in order)
    c.notice = ""        # printed at the start of a run and put in the report (e.g. relaxed filters)

    c.model = ml_collections.ConfigDict(dict(
        kind="",           # "" (auto), "scripted", "checkpoint", "preset"
        checkpoint="",     # HF / Meta / dromedary_jax folder for dj.load_model
        tokenizer="",      # tokenizer path (default: the checkpoint folder)
        preset="",         # random init from a preset (tiny runs)
        overrides={},      # ModelConfig overrides for the preset
        init_seed=-1,      # random-init seed (-1: config.seed)
        dtype="float32",
        remat="none",      # none | full | dots: activation checkpointing in the fine-tunes
        mesh=(),           # ('data','fsdp','tensor') shape, one -1 allowed; () = one device, no mesh
        batch_size=32,     # sampler batch size / decode slots (results do not depend on it)
        engine="static",   # "static" batches or "continuous" batching (refills finished slots);
                           # identical texts, see README "Design choices"
        top_k=0,
        progress=True,     # process 0: one bar per generation step (prompts, tok/s, ETA)
        delay_s=0.0,       # scripted kind only: seconds of sleep per prompt (kill/resume tests)
    ))

    # Multi-process runs (TPU pods: enabled="auto"); see dromedary_jax/distributed.py.
    c.distributed = ml_collections.ConfigDict(dict(
        enabled="", coordinator="", num_processes=0, process_id=-1))

    c.data = ml_collections.ConfigDict(dict(
        assistant_file="data/assistant.json",
        assistant_name="",      # overrides the file's "name"
        knowledge_cutoff="",    # overrides the file's "knowledge_cutoff"
    ))

    si = ml_collections.ConfigDict()
    si.batch_size = 32  # prompts per generator call (one flushed batch of records)
    si.red_team_seeds = "data/red_team/question_types.jsonl"
    si.seed_tasks = "data/seed_tasks/seed_tasks.jsonl"
    si.topic_template = "data/templates/topic_brainstorm.txt"
    si.question_template = "data/templates/question_generation.txt"
    si.vanilla_template = "data/templates/self_instruct.txt"
    si.topics = ml_collections.ConfigDict(dict(
        enabled=True,
        rounds=6,                 # brainstorm rounds (the paper grew the pool for several epochs)
        topics_per_call=10,
        max_words=3,
        capitalize=True,          # "sports" -> "Sports" (False: reject it as not_capitalized)
        examples_per_prompt=5,    # existing topics shown per prompt once a type has 2x this many
        max_prompts_per_type=0,   # 0: one prompt per existing topic (paper); >0 caps it (tiny runs)
        max_new_tokens=128, temperature=1.0, top_p=0.98,
        logit_bias={"<eos>": -100.0},
    ))
    si.questions = ml_collections.ConfigDict(dict(
        enabled=True,
        hints_per_prompt=5,       # new (type, topic) hints per prompt
        examples_per_prompt=5,    # seed questions shown as worked hints
        max_prompts=0,            # 0: all (type, topic) pairs
        one_per_prompt=False,     # True: each hint its own prompt, ending in its line up to
                                  # "instruction:" (small models do not copy hint lines)
        max_new_tokens=384, temperature=1.0, top_p=0.95,
        logit_bias={"<eos>": -100.0},
    ))
    si.vanilla = ml_collections.ConfigDict(dict(
        enabled=True,
        num_instructions=8192,    # stop once this many are kept (per run, all hosts together)
        requests_per_round=64,    # prompts per round; the pool is updated between rounds
        max_rounds=1000,
        prompt_seed_tasks=5,      # seed tasks shown per prompt
        prompt_machine_tasks=0,   # machine-generated tasks shown per prompt (once available)
        num_tasks_in_template=20,
        max_new_tokens=1024, temperature=1.0, top_p=0.98,
        logit_bias={"<eos>": -100.0},
        min_words=4, max_words=150,
        blacklist=("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                   "map", "maps", "draw", "plot", "go to", "video", "audio", "music",
                   "flowchart", "diagram"),
        rouge_threshold=0.7,
    ))
    c.self_instruct = si

    sa = ml_collections.ConfigDict()
    sa.batch_size = 32
    sa.questions_file = ""         # "": <workdir>/self_instruct/prompts.jsonl
    sa.max_questions = 0           # 0: all
    sa.prompt_file = ""            # an original-format prompt (watson_self_align_prompt.txt) instead of:
    sa.frame_template = "data/templates/self_align.txt"
    sa.principles_file = "data/principles/dromedary16.json"
    sa.exemplars_file = "data/exemplars/dromedary5.json"
    sa.prompt_name = ""            # the codename inside the prompt ("" -> assistant file's prompt_name)
    sa.drop_principles = ()        # principle keys to leave out (ablation)
    sa.shuffle_principles_seed = -1  # >= 0: shuffle the principle order with this seed
    sa.num_exemplars = -1          # -1: all; 0-5 for ablations
    sa.exemplar_names = ()         # pick exemplars by name (optional)
    sa.max_new_tokens = 256
    sa.temperature = 0.5
    sa.top_p = 0.95
    sa.logit_bias = {"Sorry": -100.0}
    sa.stop = ("\n\nUser:",)
    sa.min_answer_chars = 20       # answers shorter than this are dropped as too_short
    sa.require_answer_header = True  # False (demo relaxation): text without "<Name>:" is the answer
    sa.leak_markers = ("User:", "(auto reply)")  # + the exemplars' own markers
    sa.apology_prefixes = ("I'm sorry", "I am sorry", "Sorry")
    sa.rename = True               # replace the prompt codename with data.assistant_name
    c.self_align = sa

    # Stage 3: principle engraving (paper: LoRA r=16, alpha=16 on q/k/v/o, lr 4e-4, 1 epoch, 512).
    en = ml_collections.ConfigDict()
    en.template = "data/templates/engrave.txt"  # the short meta-prompt (no principles/exemplars)
    en.heldout_fraction = 0.02
    en.max_records = 0                      # 0: every kept stage-2 answer
    en.train = finetune_defaults(max_len=512)
    c.engrave = en

    # Stage 4: verbose cloning (paper: T=0.3, top_p=0.7, 3-/4-gram penalties, 512 new tokens;
    # then context distillation of the BASE model at 768 tokens).
    vc = ml_collections.ConfigDict()
    vc.template = "data/templates/verbose.txt"          # the "detailed mode" prompt (generation)
    vc.distill_template = "data/templates/distill.txt"  # the meta-prompt of the fine-tune
    vc.batch_size = 32
    vc.max_questions = 0                    # 0: every kept stage-2 question
    vc.max_new_tokens = 512
    vc.temperature = 0.3
    vc.top_p = 0.7
    vc.ngram_penalties = ((3, 1.0), (4, 2.0))  # (n, logit penalty) for repeating an n-gram
    vc.logit_bias = {}
    vc.stop = ("\nUser:",)
    vc.min_answer_chars = 40
    vc.leak_markers = ("(detailed)", "detailed mode")
    vc.heldout_fraction = 0.02
    vc.export_hf = True                     # also write the final model as an HF folder
    vc.train = finetune_defaults(max_len=768)
    c.verbose_clone = vc

    rp = ml_collections.ConfigDict()
    rp.num_samples = 3                      # questions answered before/after alignment
    rp.max_new_tokens = 96
    c.report = rp

    # Stage 5 (opt-in: runs by default once a benchmark is set): TruthfulQA MC1/MC2 and BIG-bench
    # HHH of the base, engraved and verbose-cloned models (pipeline/stages/evaluate.py).
    ev = ml_collections.ConfigDict()
    ev.models = ("base", "engrave", "verbose_clone")
    ev.truthfulqa = ""          # a TruthfulQA file (BIG-bench questions.json, or the HF dataset's
                                # multiple_choice JSON/JSONL), or "bigbench" (the fetched copy)
    ev.hhh = ""                 # BIG-bench's hhh_alignment folder, or "bigbench"
    ev.max_truthfulqa = 0       # score the first N questions (0: all), the same for every model
    ev.max_hhh = 0              # likewise for HHH examples
    ev.batch_tokens = 0         # scorer tokens per step (0: the scorer's default)
    ev.num_samples = 3          # red-teaming seed questions every model answers (for the report)
    ev.sample_max_new_tokens = 96
    c.evaluate = ev
    return c


def finetune_defaults(max_len: int) -> ml_collections.ConfigDict:
    """A stage's fine-tune section: the trainer's config (data/train/lora/checkpoint/eval/metrics/
    mesh/debug) with the paper's LoRA settings; the model comes from ``config.model``."""
    from dromedary_jax.training.config import default_config

    t = default_config()
    with t.unlocked():
        for key in ("model", "tokenizer", "export"):
            del t[key]
    t.data.max_len = max_len
    t.data.num_epochs = 1
    t.train.learning_rate = 4e-4
    t.train.batch_size = 64
    t.train.warmup_ratio = 0.03
    t.lora.enabled = True
    t.lora.rank = 16
    t.lora.alpha = 16.0
    t.lora.targets = ("wq", "wk", "wv", "wo")
    t.checkpoint.every_steps = 200
    t.eval.every_steps = 200
    return t


def relax_for_random_tiny_model(c) -> ml_collections.ConfigDict:
    """Stages 1-2 settings for a randomly initialised "tiny" Llama on CPU (the demo, and
    ``configs/stages12_tiny.py:tiny``): short generations and few prompts; topic lines of up to
    50 words; since gibberish yields no parseable questions, stage 2 answers the red-teaming seed
    questions with a 1-exemplar prompt and keeps answers of any length, without an answer header. Returns ``c``, changed in place."""
    m = c.model
    m.preset = "tiny"
    m.overrides = {"max_seq_len": 8192}
    m.batch_size = 8
    si = c.self_instruct
    si.batch_size = 8
    si.topics.rounds = 1
    si.topics.max_prompts_per_type = 1
    si.topics.max_new_tokens = 24
    si.topics.max_words = 50
    si.questions.max_prompts = 2
    si.questions.hints_per_prompt = 2
    si.questions.examples_per_prompt = 1
    si.questions.max_new_tokens = 24
    si.vanilla.num_instructions = 1
    si.vanilla.requests_per_round = 4
    si.vanilla.max_rounds = 1
    si.vanilla.prompt_seed_tasks = 1
    si.vanilla.prompt_machine_tasks = 0
    si.vanilla.max_new_tokens = 24
    sa = c.self_align
    sa.questions_file = "data/red_team/question_types.jsonl"
    sa.num_exemplars = 1
    sa.min_answer_chars = 0
    sa.require_answer_header = False  # gibberish has no "<Name>:" answer header
    return c


def _check_keys(user, default, path: str) -> None:
    for key in user.keys():
        if key not in default:
            known = ", ".join(sorted(default.keys()))
            raise UserError(f"config.{path}{key}: unknown key (known here: {known})")
        uv, dv = user[key], default[key]
        if key in FREE_FORM:
            continue
        if isinstance(dv, ml_collections.ConfigDict):
            if not isinstance(uv, (ml_collections.ConfigDict, dict)):
                raise UserError(f"config.{path}{key} must be a section (dict), got {type(uv).__name__}")
            _check_keys(uv, dv, f"{path}{key}.")


def complete(config) -> ml_collections.ConfigDict:
    """A copy of ``config`` with missing keys of the pipeline sections (``PIPELINE_SECTIONS``)
    filled from :func:`get_defaults`, then checked by :func:`validate`; an unknown key in those
    sections (a typo), a value of the wrong type or a bad value raises a one-line UserError naming
    ``config.<key>``."""
    defaults = get_defaults()
    user = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    for sec in PIPELINE_SECTIONS:
        if sec in user:
            _check_keys(user[sec], defaults[sec], f"{sec}.")
    merged = get_defaults()
    with merged.unlocked():
        for key in user.keys():
            if key in PIPELINE_SECTIONS:
                _merge(merged[key], user[key], f"{key}.")
            else:
                merged[key] = user[key]
    validate(merged)
    return merged


def _merge(dst, src, path: str) -> None:
    for key in src.keys():
        v = src[key]
        if isinstance(dst[key], ml_collections.ConfigDict) and key not in FREE_FORM:
            _merge(dst[key], v, f"{path}{key}.")
        else:
            if isinstance(dst[key], tuple) and isinstance(v, list):
                v = tuple(v)
            with dst.unlocked():
                try:
                    if key in FREE_FORM:
                        dst[key] = ml_collections.ConfigDict(v.to_dict() if isinstance(v, ml_collections.ConfigDict) else dict(v))
                    else:
                        dst[key] = v
                except TypeError:
                    want = type(dst[key]).__name__
                    raise UserError(f"config.{path}{key}: must be a {want} like the default "
                                    f"{dst[key]!r} (got {v!r})") from None


def _sampling(prefix: str) -> dict:
    return {f"{prefix}.max_new_tokens": Int(1), f"{prefix}.temperature": Float(0),
            f"{prefix}.top_p": PROB}


# Every numeric / boolean / choice key of the stage sections (the fine-tune sections
# engrave.train / verbose_clone.train use training.config.FINETUNE_RULES). A test checks that
# every such key of get_defaults() has a rule.
PIPELINE_RULES: dict[str, Rule] = {
    "seed": Int(0), "overwrite": BOOL, "force": BOOL,
    "model.kind": Choice("", "scripted", "checkpoint", "preset"),
    "model.init_seed": Int(-1), "model.dtype": Choice("float32", "bfloat16"),
    "model.remat": Choice("none", "full", "dots"), "model.mesh": Rule("mesh", empty_ok=True),
    "model.batch_size": Int(1), "model.engine": Choice("static", "continuous"), "model.top_k": Int(0), "model.progress": BOOL,
    "model.delay_s": Float(0),
    "distributed.num_processes": Int(0), "distributed.process_id": Int(-1),
    "self_instruct.batch_size": Int(1),
    "self_instruct.topics.enabled": BOOL, "self_instruct.topics.capitalize": BOOL,
    "self_instruct.questions.one_per_prompt": BOOL, "self_instruct.topics.rounds": Int(0),
    "self_instruct.topics.topics_per_call": Int(1), "self_instruct.topics.max_words": Int(1),
    "self_instruct.topics.examples_per_prompt": Int(1),
    "self_instruct.topics.max_prompts_per_type": Int(0), **_sampling("self_instruct.topics"),
    "self_instruct.questions.enabled": BOOL, "self_instruct.questions.hints_per_prompt": Int(1),
    "self_instruct.questions.examples_per_prompt": Int(0),
    "self_instruct.questions.max_prompts": Int(0), **_sampling("self_instruct.questions"),
    "self_instruct.vanilla.enabled": BOOL, "self_instruct.vanilla.num_instructions": Int(0),
    "self_instruct.vanilla.requests_per_round": Int(1), "self_instruct.vanilla.max_rounds": Int(0),
    "self_instruct.vanilla.prompt_seed_tasks": Int(1),
    "self_instruct.vanilla.prompt_machine_tasks": Int(0),
    "self_instruct.vanilla.num_tasks_in_template": Int(1), **_sampling("self_instruct.vanilla"),
    "self_instruct.vanilla.min_words": Int(1), "self_instruct.vanilla.max_words": Int(1),
    "self_instruct.vanilla.rouge_threshold": UNIT,
    "self_align.batch_size": Int(1), "self_align.max_questions": Int(0),
    "self_align.shuffle_principles_seed": Int(-1), "self_align.num_exemplars": Int(-1),
    **_sampling("self_align"), "self_align.min_answer_chars": Int(0),
    "self_align.require_answer_header": BOOL, "self_align.rename": BOOL,
    "engrave.heldout_fraction": Float(0, 1, hi_open=True), "engrave.max_records": Int(0),
    "verbose_clone.batch_size": Int(1), "verbose_clone.max_questions": Int(0),
    **_sampling("verbose_clone"), "verbose_clone.min_answer_chars": Int(0),
    "verbose_clone.heldout_fraction": Float(0, 1, hi_open=True), "verbose_clone.export_hf": BOOL,
    "report.num_samples": Int(0), "report.max_new_tokens": Int(1),
    "evaluate.max_truthfulqa": Int(0), "evaluate.max_hhh": Int(0), "evaluate.batch_tokens": Int(0),
    "evaluate.num_samples": Int(0), "evaluate.sample_max_new_tokens": Int(1),
}
# keys that hold a tuple of strings (a lone string would be read letter by letter)
STRING_TUPLES = ("stages", "evaluate.models", "self_instruct.vanilla.blacklist", "self_align.drop_principles",
                 "self_align.exemplar_names", "self_align.stop", "self_align.leak_markers",
                 "self_align.apology_prefixes", "verbose_clone.stop", "verbose_clone.leak_markers")
LOGIT_BIASES = ("self_instruct.topics.logit_bias", "self_instruct.questions.logit_bias",
                "self_instruct.vanilla.logit_bias", "self_align.logit_bias",
                "verbose_clone.logit_bias")
FINETUNE_SECTIONS = ("engrave.train", "verbose_clone.train")


def validate(c) -> None:
    """Check every value of a merged config before any stage runs (one UserError line naming
    ``config.<key>``): the PIPELINE_RULES table, the fine-tune sections with the trainer's own
    table, tuple-of-string keys, logit biases, n-gram penalties and the keys tied together."""
    def need(cond, key, msg):
        if not cond:
            raise UserError(f"config.{key}: {msg}")

    check_rules(c, PIPELINE_RULES, "config.")
    for key in STRING_TUPLES:
        v = lookup(c, key)
        need(v is _MISSING or (isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v)),
             key, f"must be a tuple of strings, e.g. \"('a', 'b')\" (got {v!r})")
    for key in LOGIT_BIASES:
        v = lookup(c, key)
        if v is _MISSING or not v:
            continue
        bad = {k: b for k, b in dict(v).items() if Float().problem(b)}
        need(not bad, key, f"biases must be numbers (got {bad})")
    pen = c.verbose_clone.ngram_penalties
    need(isinstance(pen, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and not Int(1).problem(p[0])
        and not Float(0).problem(p[1]) for p in pen), "verbose_clone.ngram_penalties",
        f"must be a tuple of (n >= 1, penalty >= 0) pairs, e.g. ((3, 1.0), (4, 2.0)) (got {pen!r})")
    v = c.self_instruct.vanilla
    need(v.min_words <= v.max_words, "self_instruct.vanilla.min_words",
         f"must be <= self_instruct.vanilla.max_words={v.max_words} (got {v.min_words})")
    for sec in FINETUNE_SECTIONS:
        finetune_validate(lookup(c, sec), f"config.{sec}.")
