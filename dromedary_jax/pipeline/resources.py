"""What the stages need besides the config: the generator (model + tokenizer, or the scripted
fake) and the host layout. Built lazily, once per run, and shared by the stages.

``config.model`` picks the generator:

* ``kind = "scripted"``: ``dromedary_jax.testing.scripted.ScriptedGenerator`` (no model; tests
  and demos);
* ``checkpoint``: ``load_model(checkpoint, dtype, mesh, param_dtype)`` +
  ``load_tokenizer(tokenizer or checkpoint)`` (every stage loads its model folders so, via
  ``load_run_model``: on ``model.mesh``, computing in ``model.dtype``);
* ``preset``: a randomly initialised ``Llama(preset(name, **overrides), rngs=nnx.Rngs(seed))``
  with ``tokenizer`` (its vocab size overrides the preset's unless ``overrides`` sets one).

``kind = ""`` (auto) means checkpoint if set, else preset if set, else an error naming the key.

The weights' dtype (``param_dtype``) follows the rule of ``checkpoint.dtypes``: the sampling
stages, the evaluation and the report hold them in bfloat16 when ``model.dtype`` is bfloat16 (or
the checkpoint stores bfloat16), else float32 (:func:`sampling_param_dtype`); a full fine-tune
holds float32 master weights, a LoRA fine-tune its frozen base as sampling does
(:func:`finetune_param_dtype`). :class:`Resources` holds ONE copy of the base model and converts
or reloads it when a stage needs another dtype.
"""
from __future__ import annotations

import gc
import os

from dromedary_jax.errors import UserError
from dromedary_jax.model.config import ModelConfig, preset
from dromedary_jax.distributed import Hosts

KINDS = ("", "scripted", "checkpoint", "preset")


def model_kind(model_cfg) -> str:
    """What ``config.model`` generates with: ``"scripted"``, ``"checkpoint"`` or ``"preset"``;
    ``kind=""`` picks checkpoint if ``model.checkpoint`` is set, else preset if ``model.preset``
    is. UserError naming the key for an unknown kind, or when ``kind=""`` and neither is set."""
    kind = model_cfg.kind
    if kind not in KINDS:
        raise UserError(f"config.model.kind={kind!r}: use one of {KINDS[1:]} (or '' to pick from "
                        f"model.checkpoint / model.preset)")
    if kind:
        return kind
    if model_cfg.checkpoint:
        return "checkpoint"
    if model_cfg.preset:
        return "preset"
    raise UserError("config.model: set model.checkpoint (a model folder), model.preset (random "
                    "init, with model.tokenizer) or model.kind='scripted'")


def real_model_kind(model_cfg) -> str:
    """'checkpoint' or 'preset': the model the training stages load. With ``kind="scripted"``
    the generator is the fake, but a checkpoint/preset set beside it is still what the training
    stages fine-tune (UserError when neither is set)."""
    kind = model_kind(model_cfg)
    if kind == "scripted":
        kind = "checkpoint" if model_cfg.checkpoint else "preset" if model_cfg.preset else kind
    if kind == "scripted":
        raise UserError("config.model: the training stages need a real model; set model.checkpoint "
                        "or model.preset beside model.kind='scripted'")
    return kind


def compute_dtype(model_cfg) -> str:
    """The base model's compute dtype: ``model.dtype`` (a preset's ``overrides.dtype`` when
    set)."""
    if real_model_kind(model_cfg) == "preset" and "dtype" in dict(model_cfg.overrides or {}):
        return str(dict(model_cfg.overrides)["dtype"])
    return model_cfg.dtype


def stored_param_dtype_of(model_cfg, path: str | None = None) -> str | None:
    """The dtype the checkpoint at ``path`` stores (default: ``model.checkpoint`` when the run
    loads its base model from one; None for a preset), see
    ``checkpoint.dtypes.stored_param_dtype``."""
    from dromedary_jax.checkpoint.dtypes import stored_param_dtype

    if path is None:
        path = model_cfg.checkpoint if real_model_kind(model_cfg) == "checkpoint" else ""
    return stored_param_dtype(path) if path else None


def sampling_param_dtype(model_cfg, path: str | None = None) -> str:
    """The dtype the run holds a model's weights in to sample or score with it: ``"bfloat16"``
    when ``model.dtype`` is bfloat16 or the checkpoint at ``path`` (default: the base model's,
    ``model.checkpoint`` when the run loads one) stores bfloat16, else ``"float32"``
    (``checkpoint.dtypes.sampling_param_dtype``)."""
    from dromedary_jax.checkpoint import dtypes

    dtype = model_cfg.dtype if path is not None else compute_dtype(model_cfg)
    return dtypes.sampling_param_dtype(dtype, stored_param_dtype_of(model_cfg, path))


def finetune_param_dtype(model_cfg, train_cfg) -> str:
    """The dtype a fine-tune (``train_cfg``: a stage's ``train`` section) holds the base model's
    weights in: float32 master weights for a full fine-tune; for LoRA
    (``train_cfg.lora.enabled``) the frozen base as sampling holds it (bfloat16 for a bfloat16
    run), the adapters being float32 (``checkpoint.dtypes.finetune_param_dtype``)."""
    from dromedary_jax.checkpoint import dtypes

    return dtypes.finetune_param_dtype(compute_dtype(model_cfg), lora=bool(train_cfg.lora.enabled),
                                       stored=stored_param_dtype_of(model_cfg))


def load_base_tokenizer(model_cfg, workdir: str = ""):
    """The base model's tokenizer (``model.tokenizer``, else the checkpoint folder's), after the
    checks :func:`load_model_and_tokenizer` makes first."""
    kind = real_model_kind(model_cfg)
    if kind == "checkpoint":
        check_checkpoint(model_cfg)
        return load_tokenizer_for(model_cfg, workdir, default=model_cfg.checkpoint)
    if not model_cfg.tokenizer:
        raise UserError("config.model.tokenizer: a randomly initialised preset needs a tokenizer path "
                        "(or 'builtin:demo' for a tiny tokenizer trained on data/)")
    return load_tokenizer_for(model_cfg, workdir)


def load_model_and_tokenizer(model_cfg, seed: int = 0, workdir: str = "",
                             param_dtype: str | None = None, tokenizer=None):
    """(model, tokenizer) from ``model.checkpoint`` or ``model.preset`` (see
    :func:`real_model_kind`), the weights in ``param_dtype`` (default
    :func:`sampling_param_dtype`; a preset is initialised in float32 and rounded, so every dtype
    holds the same model). ``tokenizer``: reuse this one instead of loading it again."""
    kind = real_model_kind(model_cfg)
    if tokenizer is None:
        tokenizer = load_base_tokenizer(model_cfg, workdir)
    elif kind == "checkpoint":
        check_checkpoint(model_cfg)
    if param_dtype is None:
        param_dtype = sampling_param_dtype(model_cfg)
    if kind == "checkpoint":
        model = load_run_model(model_cfg, model_cfg.checkpoint, param_dtype=param_dtype)
        model.config = model.config.replace(remat=model_cfg.remat)
        return model, tokenizer
    if kind == "preset":
        from flax import nnx

        from dromedary_jax.model.llama import Llama

        overrides = dict(model_cfg.overrides) if model_cfg.overrides else {}
        if "param_dtype" in overrides:
            raise UserError("config.model.overrides.param_dtype: the weights' dtype follows "
                            "model.dtype and the stage (bfloat16 to sample in a bfloat16 run, "
                            "float32 masters for a full fine-tune); drop this override")
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("dtype", model_cfg.dtype)
        overrides.setdefault("remat", model_cfg.remat)
        overrides["param_dtype"] = param_dtype
        try:
            cfg = preset(model_cfg.preset, **overrides)
        except TypeError as e:
            raise UserError(f"config.model.overrides: {e}") from None
        mesh = model_mesh(model_cfg)
        if mesh is not None:
            from dromedary_jax.sharding import check_model_fits_mesh

            check_model_fits_mesh(cfg, mesh)
        rngs = nnx.Rngs(int(model_cfg.init_seed if model_cfg.init_seed >= 0 else seed))
        return Llama(cfg, rngs=rngs, mesh=mesh), tokenizer
    raise UserError(f"config.model.kind={kind!r} has no model")


def check_checkpoint(model_cfg) -> str:
    """The format of ``model.checkpoint`` ('hf', 'meta', 'orbax' or 'gguf'); a UserError naming
    the key when the path is not a model folder or file (``fetch:NAME``: a file
    ``python -m dromedary_jax.fetch NAME`` has not fetched yet)."""
    from dromedary_jax.checkpoint import detect_format

    path = model_cfg.checkpoint
    if path.startswith("fetch:"):  # a config naming a file `python -m dromedary_jax.fetch` gets
        name = path[len("fetch:"):]
        raise UserError(f"config.model.checkpoint={path}: the model file is not in the cache yet; "
                        f"run `python -m dromedary_jax.fetch {name}` (make demo does) or set "
                        "--config.model.checkpoint=PATH")
    try:
        return detect_format(path)
    except UserError as e:
        msg = str(e)
        msg = msg[len(path):].lstrip(" :") if path and msg.startswith(path) else msg
        raise UserError(f"config.model.checkpoint={path}: {msg}") from None


def load_run_model(model_cfg, path: str, param_dtype: str | None = None):
    """A model folder loaded the way every stage loads its models: on the run's mesh
    (``model.mesh``), computing in the run's dtype (``model.dtype``), the weights held in
    ``param_dtype`` (default :func:`sampling_param_dtype` of that folder: bfloat16 for a
    bfloat16 run or a bfloat16 checkpoint, else float32)."""
    from dromedary_jax.checkpoint import load_model

    if param_dtype is None:
        param_dtype = sampling_param_dtype(model_cfg, path)
    return load_model(path, dtype=model_cfg.dtype, mesh=model_mesh(model_cfg),
                         param_dtype=param_dtype)


def with_param_dtype(model, param_dtype: str):
    """``model`` with its weights cast to ``param_dtype`` (same mesh and shardings); the model
    itself when they already are. Rounding float32 weights to bfloat16 gives exactly the
    weights a bfloat16 load of the same checkpoint gives."""
    import jax.numpy as jnp

    from dromedary_jax.model.llama import Llama

    if model.config.param_dtype == param_dtype:
        return model
    dt = jnp.dtype(param_dtype)
    return Llama(model.config.replace(param_dtype=param_dtype),
                 params={k: v.astype(dt) for k, v in model.params.items()}, mesh=model.mesh)


def model_mesh(model_cfg):
    """The mesh of ``model.mesh`` (None for an empty shape: one device, no mesh)."""
    shape = tuple(model_cfg.get("mesh") or ())
    if not shape:
        return None
    from dromedary_jax.sharding import make_mesh

    return make_mesh(shape)


def load_tokenizer_for(model_cfg, workdir: str = "", default: str = ""):
    """``model.tokenizer`` (a path, or ``builtin:demo``: a tiny SentencePiece model trained on this
    project's data/ files into ``<workdir>/tokenizer``), else ``default``."""
    from dromedary_jax.tokenizer import load_tokenizer, tokenizer_file_in

    path = model_cfg.tokenizer or default
    if path == "builtin:demo":
        from dromedary_jax.testing.demo_tokenizer import ensure_demo_tokenizer

        path = ensure_demo_tokenizer(os.path.join(workdir or ".", "tokenizer"))
    if not model_cfg.tokenizer and default and os.path.isdir(path) and \
            tokenizer_file_in(path) is None:
        raise UserError(f"config.model.checkpoint={path}: no tokenizer.model or tokenizer.json in "
                        f"this folder; set --config.model.tokenizer=PATH (a tokenizer file or folder)")
    return load_tokenizer(path)


def model_generator(model, tokenizer, model_cfg):
    """A ``pipeline.generator.ModelGenerator`` sampling ``model`` with ``tokenizer``, with
    ``config.model``'s ``batch_size``, ``engine``, ``top_k`` and ``progress``."""
    from dromedary_jax.pipeline.generator import ModelGenerator

    return ModelGenerator(model, tokenizer, batch_size=model_cfg.batch_size, top_k=model_cfg.top_k,
                          progress=model_cfg.progress, engine=model_cfg.engine)


def build_generator(config, model_and_tokenizer=None):
    """The Generator for ``config.model`` (see module docstring)."""
    model_cfg = config.model
    if model_kind(model_cfg) == "scripted":
        from dromedary_jax.testing.scripted import ScriptedGenerator

        return ScriptedGenerator(delay_s=model_cfg.delay_s)
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(model_cfg, seed=config.seed)
    return model_generator(model, tokenizer, model_cfg)


class Resources:
    """Lazily built base model, generator and host layout, shared by the stages of one run.

    The base model is held once, in the dtype the last stage asked for: sampling stages
    (:attr:`model_and_tokenizer`) in :func:`sampling_param_dtype`, fine-tunes
    (:meth:`finetune_model_and_tokenizer`) in :func:`finetune_param_dtype`. A float32 model a
    sampling stage wants in bfloat16 is rounded in place of a reload; a bfloat16 one a full
    fine-tune wants in float32 is freed and loaded again in float32 (never upcast: float32
    masters start from the checkpoint's own values)."""

    def __init__(self, config, *, generator=None, hosts: Hosts | None = None, workdir: str = ""):
        self._config = config
        self._generator = generator
        self._hosts = hosts
        self._model = None
        self._tokenizer = None
        self._own_generator = False  # a generator built here around the base model
        self.workdir = workdir

    @property
    def model_and_tokenizer(self):
        """(base model, tokenizer) for sampling or scoring: weights in
        :func:`sampling_param_dtype` (loaded once; converted when a fine-tune held them in
        another dtype)."""
        return self._base(sampling_param_dtype(self._config.model))

    def finetune_model_and_tokenizer(self, train_cfg):
        """(base model, tokenizer) for a fine-tune under ``train_cfg`` (a stage's ``train``
        section): weights in :func:`finetune_param_dtype` (float32 masters for a full fine-tune;
        a LoRA fine-tune shares the sampling stages' copy)."""
        return self._base(finetune_param_dtype(self._config.model, train_cfg))

    @property
    def tokenizer(self):
        """The base model's tokenizer, without loading (or converting) the model."""
        if self._model is not None:
            return self._model[1]
        if self._tokenizer is None:
            self._tokenizer = load_base_tokenizer(self._config.model, self.workdir)
        return self._tokenizer

    def _base(self, param_dtype: str):
        if self._model is not None:
            model, tokenizer = self._model
            held = getattr(getattr(model, "config", None), "param_dtype", None)
            if held is None or held == param_dtype:  # (None: a model set from outside)
                return self._model
            if self._own_generator:  # it holds the old weights: rebuilt when next needed
                self._generator, self._own_generator = None, False
            if held == "float32":
                self._model = (with_param_dtype(model, param_dtype), tokenizer)
                return self._model
            self._tokenizer = tokenizer
            self._model = None  # free the weights before loading them in the other dtype
            del model
            gc.collect()
        self._model = load_model_and_tokenizer(self._config.model, seed=self._config.seed,
                                               workdir=self.workdir, param_dtype=param_dtype,
                                               tokenizer=self._tokenizer)
        self._tokenizer = None
        return self._model

    @property
    def generator(self):
        """The run's Generator, built on first use: the given one, the scripted fake, or a
        ModelGenerator around :attr:`model_and_tokenizer` (rebuilt after a fine-tune changed the
        base model's dtype)."""
        if self._generator is None:
            scripted = model_kind(self._config.model) == "scripted"
            self._generator = build_generator(self._config,
                                              None if scripted else self.model_and_tokenizer)
            self._own_generator = not scripted
        return self._generator

    @property
    def hosts(self) -> Hosts:
        """The host layout (``dromedary_jax.distributed.Hosts``): the given one, else
        ``Hosts.from_jax()`` on first use."""
        if self._hosts is None:
            self._hosts = Hosts.from_jax()
        return self._hosts


def model_config_of(model_cfg) -> tuple[ModelConfig | None, str]:
    """The ModelConfig a run will use, read from the preset or the checkpoint's json (no weights),
    in the run's compute dtype (``model.dtype``, as ``resources.load_model_and_tokenizer``)."""
    c, origin = _model_config_of(model_cfg)
    if c is not None and not (model_cfg.preset and not model_cfg.checkpoint
                              and "dtype" in dict(model_cfg.overrides or {})):
        c = c.replace(dtype=model_cfg.dtype)
    return c, origin


def _model_config_of(model_cfg) -> tuple[ModelConfig | None, str]:
    overrides = dict(model_cfg.overrides or {})
    if model_cfg.preset and not model_cfg.checkpoint:
        overrides.setdefault("vocab_size", 512 if model_cfg.tokenizer == "builtin:demo"
                             else preset(model_cfg.preset).vocab_size)
        return preset(model_cfg.preset, **overrides), f"preset {model_cfg.preset}"
    path = model_cfg.checkpoint
    if path and os.path.exists(path):
        from dromedary_jax.checkpoint import read_model_config

        try:
            return read_model_config(path), path
        except UserError:
            pass  # not a model here: estimates fall back to the preset, the run reports it
    if model_cfg.preset:
        return preset(model_cfg.preset, **overrides), (
            f"preset {model_cfg.preset} (checkpoint {path!r} is not readable here)")
    return None, f"checkpoint {path!r} not readable here (set model.preset for estimates)"


def check_model(config, selected: list[str]) -> None:
    """The model the selected stages load is there: the checkpoint folder (or .gguf file) and
    the tokenizer path exist, or the preset is known (no weights are read)."""
    m = config.model
    if model_kind(m) == "scripted" and not {"engrave", "verbose_clone"} & set(selected):
        return  # stages 1-2 with the scripted fake: no model
    kind = real_model_kind(m)
    if kind == "checkpoint":
        check_checkpoint(m)
    elif kind == "preset":
        try:
            preset(m.preset)
        except UserError as e:
            raise UserError(f"config.model.preset: {e}") from None
        if not m.tokenizer:
            raise UserError("config.model.tokenizer: a randomly initialised preset needs a "
                            "tokenizer path (or 'builtin:demo' for a tiny tokenizer trained on "
                            "data/)")
    if m.tokenizer and m.tokenizer != "builtin:demo" and not os.path.exists(m.tokenizer):
        raise UserError(f"config.model.tokenizer={m.tokenizer}: does not exist")
    trained = [s for s in ("engrave", "verbose_clone") if s in selected]
    if trained:
        mc, origin = model_config_of(m)  # the preset or the checkpoint's json: no weights
        for s in trained if mc is not None and "not readable" not in origin else ():
            max_len = int(config[s].train.data.max_len)
            if max_len > mc.max_seq_len:
                raise UserError(f"config.{s}.train.data.max_len={max_len} is over the model's "
                                f"maximum sequence length {mc.max_seq_len}; lower it")
