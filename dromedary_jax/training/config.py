"""The default ConfigDict of a supervised fine-tune (every key the trainer reads, with defaults).

An experiment file (``configs/sft_*.py``) starts from :func:`default_config` and changes what it
needs; ``run_sft`` fills any key a caller's config leaves out from here (:func:`with_defaults`).

Sections:
  model       preset / checkpoint / compute dtype (only the CLI reads it; ``run_sft`` gets a model)
  tokenizer   path of a SentencePiece .model or tokenizer.json (CLI only)
  data        JSONL inputs, field names, meta-prompt template, truncation, packing, epochs, shuffle
  train       batch, accumulation, steps, AdamW + schedule + clipping, seed
  lora        rank / alpha / dropout / target modules (enabled=False: full fine-tune)
  checkpoint  Orbax save interval, keep-last-K, async, resume_from
  eval        held-out loss every N steps
  metrics     JSONL + TensorBoard (+ wandb / clu writers), progress bar (tokens/s, ETA), MFU peak
              FLOP/s (looked up from the device kind), example-id log
  mesh        ('data', 'fsdp', 'tensor') shape, one -1 allowed
  export      CLI only: format of the final weights
  debug       test-only knobs
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re

import ml_collections

from dromedary_jax.errors import UserError

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

# A neutral default meta-prompt of our own. ``{prompt}`` is replaced by the record's prompt;
# the response follows the rendered text directly. Stage configs set their own template.
DEFAULT_TEMPLATE = "### User:\n{prompt}\n\n### Assistant:"


def default_config() -> ml_collections.ConfigDict:
    """A new ConfigDict holding every key the trainer reads, with its default (sections as in
    the module docstring; the comment beside each key gives its meaning and unit)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # used when model.checkpoint is empty: random init (demo / tests)
    c.model.checkpoint = ""  # HF folder, Meta folder or our checkpoint (dj.load_model)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = "none"  # none | full | dots
    c.model.seed = 0  # random init seed when there is no checkpoint

    c.tokenizer = ""  # path to tokenizer.model / tokenizer.json / folder (CLI)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # JSONL path(s): comma-separated, globs allowed (CLI)
    c.data.eval_files = ""  # held-out JSONL path(s) (CLI); empty: no eval
    c.data.prompt_field = "prompt"
    c.data.response_field = "response"
    c.data.id_field = "id"  # optional in records; default "<file>:<line>"
    c.data.template = DEFAULT_TEMPLATE  # must contain "{prompt}"
    c.data.template_file = ""  # a file holding the template (overrides data.template)
    c.data.add_bos = ml_collections.config_dict.placeholder(bool)  # None: the tokenizer's rule
    c.data.add_eos = True  # append EOS to the response (a target token)
    c.data.max_len = 512  # tokens per example after truncation = row length (paper: 512 / 768)
    c.data.pack = True  # pack several examples per row (segment ids + positions)
    c.data.num_epochs = 1
    c.data.shuffle = True
    c.data.seed = 0  # shuffle seed (order is a pure function of seed, epoch and host)
    c.data.prepared_dir = ""  # where the ArrayRecord dataset goes; default <workdir>/data
    c.data.prepare_timeout_s = 3600.0  # other hosts wait this long for process 0 to prepare it
    c.data.read_threads = 2

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # rows per optimizer step, over all hosts and micro-batches
    c.train.grad_accum = 1  # micro-batches per step (lax.scan); batch_size % grad_accum == 0
    c.train.num_steps = 0  # >0: exactly this many steps (data repeats); 0: from data.num_epochs
    c.train.learning_rate = 4e-4
    c.train.schedule = "cosine"  # cosine | linear | constant (after warmup)
    c.train.warmup_steps = 0
    c.train.warmup_ratio = 0.0  # used when warmup_steps == 0
    c.train.end_lr_ratio = 0.0  # final lr = learning_rate * end_lr_ratio
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.clip_norm = 1.0  # global-norm clipping; 0 disables
    c.train.seed = 0  # LoRA init + dropout rng

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False
    c.lora.rank = 16
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = ("wq", "wk", "wv", "wo")

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # also saved at the end; 0: only at the end
    c.checkpoint.keep = 2  # keep the last K
    c.checkpoint.async_save = True
    # Start from another run's checkpoints (must exist): its checkpoint folder (newest step) or
    # one step folder in it (".../checkpoints/40"). Ignored once this workdir has checkpoints.
    c.checkpoint.resume_from = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0: only at the end (when there are eval files)
    c.eval.batch_size = 8
    c.eval.max_batches = 0  # 0: the whole held-out set

    c.metrics = ml_collections.ConfigDict()
    c.metrics.log_every = 10
    c.metrics.tensorboard = True
    c.metrics.progress = True
    # per-device peak FLOP/s for MFU; 0: looked up from the device kind (TPU v2-v6e, A100, H100,
    # H200, L4, ...: training.metrics.PEAK_FLOPS); unknown there (CPU): MFU is not reported
    c.metrics.peak_flops = 0.0
    c.metrics.log_example_ids = False  # write examples_seen-<process>.jsonl (ids per step)
    # more scalar writers besides metrics.jsonl (and TensorBoard above): "wandb", "clu",
    # "tensorboard", or a name registered with training.metrics.register_writer
    c.metrics.writers = ()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # ('data', 'fsdp', 'tensor')

    c.export = ml_collections.ConfigDict()
    c.export.format = "checkpoint"  # CLI only: checkpoint | hf | none, written to <workdir>/final

    c.debug = ml_collections.ConfigDict()
    c.debug.step_sleep_s = 0.0  # sleep after every step (only to make kill/resume tests reliable)
    return c


def with_defaults(cfg) -> ml_collections.ConfigDict:
    """A copy of ``default_config()`` updated with every key present in ``cfg`` (a ConfigDict
    or a nested dict). Unknown keys are kept, so stage configs may carry their own extras."""
    base = default_config().to_dict()
    if cfg is None:
        return ml_collections.ConfigDict(base)
    src = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)

    def merge(dst: dict, s: dict):
        for k, v in s.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(base, src)
    return ml_collections.ConfigDict(base)


# ----------------------------------------------------------------------------- validation
# One table of rules, (dotted key -> Rule), checks every numeric / boolean / choice key of a
# fine-tune config BEFORE anything runs; ``pipeline/defaults.py`` uses the same Rule types for the
# stage sections and applies FINETUNE_RULES to ``engrave.train`` / ``verbose_clone.train``.
# Errors name the key as the caller knows it: ``where`` is "" for ``run_sft`` (its own argument
# names, e.g. ``train.batch_size``), "config." for the CLI, "config.engrave.train." for a stage.

@dataclasses.dataclass(frozen=True)
class Rule:
    """The type and range of one config value. ``kind``: int | float | bool | choice | names |
    mesh | writers (metrics writer names, see ``training.metrics``). Ranges are inclusive unless
    ``lo_open`` / ``hi_open``; ``none_ok`` also allows None."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    none_ok: bool = False
    empty_ok: bool = False  # mesh: () means "no mesh"

    def _range(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f" {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f" {'<' if self.hi_open else '<='} {self.hi:g}"
        return ""

    def problem(self, v) -> str | None:
        """What is wrong with ``v`` (a message), or None."""
        if v is None and self.none_ok:
            return None
        if self.kind in ("int", "float"):
            is_int = isinstance(v, numbers.Integral) and not isinstance(v, bool)
            ok = is_int if self.kind == "int" else (
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v))
            if ok and (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) \
                    and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)):
                return None
            what = "an integer" if self.kind == "int" else "a number"
            return f"must be {what}{self._range()} (got {v!r})"
        if self.kind == "bool":
            return None if isinstance(v, bool) else f"must be True or False (got {v!r})"
        if self.kind == "choice":
            return None if v in self.choices else (
                f"must be one of {', '.join(map(repr, self.choices))} (got {v!r})")
        if self.kind == "names":
            if isinstance(v, str) or not isinstance(v, (tuple, list)) or not v:
                return f"must be a non-empty tuple of names among {list(self.choices)} (got {v!r})"
            bad = [x for x in v if x not in self.choices]
            return f"unknown name(s) {bad}; use names among {list(self.choices)}" if bad else None
        if self.kind == "mesh":
            if self.empty_ok and isinstance(v, (tuple, list)) and len(v) == 0:
                return None
            ok = isinstance(v, (tuple, list)) and len(v) == 3 and all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and (d >= 1 or d == -1)
                for d in v) and list(v).count(-1) <= 1
            return None if ok else (f"must be a ('data', 'fsdp', 'tensor') shape of 3 integers "
                                    f">= 1 with at most one -1, e.g. (1, -1, 1) (got {v!r})")
        if self.kind == "writers":
            from dromedary_jax.training.metrics import writers_problem

            return writers_problem(v)
        raise ValueError(f"unknown rule kind {self.kind!r}")


def Int(lo=None, hi=None, **kw) -> Rule:  # noqa: N802 - rule constructors read as types
    """A Rule for an integer (bools refused) in [lo, hi] (None: unbounded; ``lo_open`` /
    ``hi_open`` and ``none_ok`` as keywords)."""
    return Rule("int", lo, hi, **kw)


def Float(lo=None, hi=None, **kw) -> Rule:  # noqa: N802
    """A Rule for a finite real number (bools refused) in [lo, hi] (keywords as :func:`Int`)."""
    return Rule("float", lo, hi, **kw)


BOOL = Rule("bool")


def Choice(*choices, **kw) -> Rule:  # noqa: N802
    """A Rule for a value equal to one of ``choices``."""
    return Rule("choice", choices=tuple(choices), **kw)


PROB = Float(0, 1, lo_open=True)  # top_p
UNIT = Float(0, 1)

FINETUNE_RULES: dict[str, Rule] = {
    # model / export: the CLI's sections (a stage's fine-tune takes config.model instead)
    "model.seed": Int(0), "model.dtype": Choice("float32", "bfloat16"),
    "model.remat": Choice("none", "full", "dots"),
    "export.format": Choice("checkpoint", "hf", "none"),
    "data.add_bos": Rule("bool", none_ok=True), "data.add_eos": BOOL, "data.max_len": Int(2),
    "data.pack": BOOL, "data.num_epochs": Int(0), "data.shuffle": BOOL, "data.seed": Int(0),
    "data.prepare_timeout_s": Float(0, lo_open=True), "data.read_threads": Int(1),
    "train.batch_size": Int(1), "train.grad_accum": Int(1), "train.num_steps": Int(0),
    "train.learning_rate": Float(0), "train.schedule": Choice("cosine", "linear", "constant"),
    "train.warmup_steps": Int(0), "train.warmup_ratio": UNIT, "train.end_lr_ratio": UNIT,
    "train.weight_decay": Float(0), "train.b1": Float(0, 1, hi_open=True),
    "train.b2": Float(0, 1, hi_open=True), "train.eps": Float(0, lo_open=True),
    "train.clip_norm": Float(0), "train.seed": Int(0),
    "lora.enabled": BOOL, "lora.rank": Int(1), "lora.alpha": Float(0, lo_open=True),
    "lora.dropout": Float(0, 1, hi_open=True), "lora.targets": Rule("names", choices=LORA_TARGETS),
    "checkpoint.every_steps": Int(0), "checkpoint.keep": Int(1), "checkpoint.async_save": BOOL,
    "eval.every_steps": Int(0), "eval.batch_size": Int(1), "eval.max_batches": Int(0),
    "metrics.log_every": Int(1), "metrics.tensorboard": BOOL, "metrics.progress": BOOL,
    "metrics.peak_flops": Float(0), "metrics.log_example_ids": BOOL,
    "metrics.writers": Rule("writers"),
    "mesh.shape": Rule("mesh"),
    "debug.step_sleep_s": Float(0),
}
_MISSING = object()


def lookup(cfg, dotted: str):
    """``cfg[a][b]...`` for ``"a.b..."``, or a sentinel when a key is missing."""
    node = cfg
    for k in dotted.split("."):
        try:
            node = node[k]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def check_rules(cfg, rules: dict[str, Rule], where: str = "") -> None:
    """Check every key of ``rules`` present in ``cfg``; the first bad value raises
    ``UserError("<where><key>: <problem>")``."""
    for key, rule in rules.items():
        v = lookup(cfg, key)
        if v is _MISSING:
            continue
        msg = rule.problem(v)
        if msg:
            raise UserError(f"{where}{key}: {msg}")


def validate(cfg, where: str = "") -> None:
    """Check a fine-tune config (``default_config()`` layout; keys it lacks are skipped) before
    anything runs: FINETUNE_RULES, then the rules that tie two keys together. Raises a one-line
    UserError naming the key as ``<where><key>``."""
    check_rules(cfg, FINETUNE_RULES, where)
    t, d = lookup(cfg, "train"), lookup(cfg, "data")
    if t is not _MISSING and "batch_size" in t and "grad_accum" in t \
            and int(t.batch_size) % int(t.grad_accum):
        raise UserError(f"{where}train.batch_size: must be a multiple of train.grad_accum="
                        f"{t.grad_accum} (got {t.batch_size})")
    if t is not _MISSING and d is not _MISSING and "num_epochs" in d and "num_steps" in t \
            and int(d.num_epochs) < 1 and int(t.num_steps) <= 0:
        raise UserError(f"{where}data.num_epochs: must be >= 1 when train.num_steps is 0 (got "
                        f"{d.num_epochs}); or set train.num_steps > 0")


@contextlib.contextmanager
def config_path(where: str):
    """Inside, a UserError whose message starts with a fine-tune key (``train.batch_size...``,
    ``data.max_len=...``) is re-raised with ``where`` in front (e.g. ``config.engrave.train.``),
    so a stage reports library errors under the config path the user sets."""
    try:
        yield
    except UserError as e:
        msg = str(e)
        head = re.match(r"[a-z_]+\.[a-z_]+", msg)
        if head and head.group(0) in FINETUNE_RULES and not msg.startswith(where):
            raise UserError(where + msg) from None
        raise
