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
  metrics     JSONL + TensorBoard, progress bar, MFU peak FLOP/s, example-id log
  mesh        ('data', 'fsdp', 'tensor') shape, one -1 allowed
  export      CLI only: format of the final weights
  debug       test-only knobs
"""
from __future__ import annotations

import ml_collections

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

# A neutral default meta-prompt of our own. ``{prompt}`` is replaced by the record's prompt;
# the response follows the rendered text directly. Stage configs set their own template.
DEFAULT_TEMPLATE = "### User:\n{prompt}\n\n### Assistant:"


def default_config() -> ml_collections.ConfigDict:
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
    c.data.add_bos = True
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
    c.metrics.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: MFU not reported
    c.metrics.log_example_ids = False  # write examples_seen-<process>.jsonl (ids per step)

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
