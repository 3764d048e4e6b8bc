"""What the stages need besides the config: the generator (model + tokenizer, or the scripted
fake) and the host layout. Built lazily, once per run, and shared by the stages.

``config.model`` picks the generator:

* ``kind = "scripted"``: ``ScriptedGenerator`` (no model; tests and demos);
* ``checkpoint``: ``dj.load_model(checkpoint, dtype, mesh)`` + ``load_tokenizer(tokenizer or checkpoint)``
  (every stage loads its model folders so, via ``load_run_model``: on ``model.mesh`` in ``model.dtype``);
* ``preset``: a randomly initialised ``Llama(preset(name, **overrides), rngs=nnx.Rngs(seed))``
  with ``tokenizer`` (its vocab size overrides the preset's unless ``overrides`` sets one).

``kind = ""`` (auto) means checkpoint if set, else preset if set, else an error naming the key.
"""
from __future__ import annotations

import os

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline.records import Hosts

KINDS = ("", "scripted", "checkpoint", "preset")


def model_kind(model_cfg) -> str:
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


def load_model_and_tokenizer(model_cfg, seed: int = 0, workdir: str = ""):
    """(model, tokenizer) from ``model.checkpoint`` or ``model.preset`` (see
    :func:`real_model_kind`)."""
    kind = real_model_kind(model_cfg)
    if kind == "checkpoint":
        check_checkpoint(model_cfg)
        tokenizer = load_tokenizer_for(model_cfg, workdir, default=model_cfg.checkpoint)
        model = load_run_model(model_cfg, model_cfg.checkpoint)
        model.config = model.config.replace(remat=model_cfg.remat)
        return model, tokenizer
    if kind == "preset":
        from flax import nnx

        from dromedary_jax.model.config import preset
        from dromedary_jax.model.llama import Llama

        if not model_cfg.tokenizer:
            raise UserError("config.model.tokenizer: a randomly initialised preset needs a tokenizer path "
                            "(or 'builtin:demo' for a tiny tokenizer trained on data/)")
        tokenizer = load_tokenizer_for(model_cfg, workdir)
        overrides = dict(model_cfg.overrides) if model_cfg.overrides else {}
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("dtype", model_cfg.dtype)
        overrides.setdefault("remat", model_cfg.remat)
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


def load_run_model(model_cfg, path: str):
    """A model folder loaded the way every stage loads its models: on the run's mesh
    (``model.mesh``) in the run's compute dtype (``model.dtype``)."""
    import dromedary_jax as dj

    return dj.load_model(path, dtype=model_cfg.dtype, mesh=model_mesh(model_cfg))


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
        from dromedary_jax.pipeline.demo_tokenizer import ensure_demo_tokenizer

        path = ensure_demo_tokenizer(os.path.join(workdir or ".", "tokenizer"))
    if not model_cfg.tokenizer and default and os.path.isdir(path) and \
            tokenizer_file_in(path) is None:
        raise UserError(f"config.model.checkpoint={path}: no tokenizer.model or tokenizer.json in "
                        f"this folder; set --config.model.tokenizer=PATH (a tokenizer file or folder)")
    return load_tokenizer(path)


def model_generator(model, tokenizer, model_cfg):
    from dromedary_jax.pipeline.generator import ModelGenerator

    return ModelGenerator(model, tokenizer, batch_size=model_cfg.batch_size, top_k=model_cfg.top_k,
                          progress=model_cfg.progress)


def build_generator(config, model_and_tokenizer=None):
    """The Generator for ``config.model`` (see module docstring)."""
    model_cfg = config.model
    if model_kind(model_cfg) == "scripted":
        from dromedary_jax.pipeline.scripted import ScriptedGenerator

        return ScriptedGenerator(delay_s=model_cfg.delay_s)
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(model_cfg, seed=config.seed)
    return model_generator(model, tokenizer, model_cfg)


class Resources:
    """Lazily built base model, generator and host layout, shared by the stages of one run."""

    def __init__(self, config, *, generator=None, hosts: Hosts | None = None, workdir: str = ""):
        self._config = config
        self._generator = generator
        self._hosts = hosts
        self._model = None
        self.workdir = workdir

    @property
    def model_and_tokenizer(self):
        """(base model, tokenizer), loaded once."""
        if self._model is None:
            self._model = load_model_and_tokenizer(self._config.model, seed=self._config.seed,
                                                   workdir=self.workdir)
        return self._model

    @property
    def generator(self):
        if self._generator is None:
            scripted = model_kind(self._config.model) == "scripted"
            self._generator = build_generator(self._config,
                                              None if scripted else self.model_and_tokenizer)
        return self._generator

    @property
    def hosts(self) -> Hosts:
        if self._hosts is None:
            self._hosts = Hosts.from_jax()
        return self._hosts
