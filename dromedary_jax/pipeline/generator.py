"""The generation interface the pipeline stages call, and its model-backed implementation.

    settings = SamplingSettings.from_config(config.self_align, "self_align")
    texts = generator.generate(prompts, ids=ids, settings=settings,
                               shared_prefix=principle_prompt, seed=0)

* ``settings``: one validated :class:`dromedary_jax.sampling.settings.SamplingSettings`
  (max_new_tokens, temperature, top_p, top_k, stop, logit_bias, ngram_penalties, eos_id).
  ``logit_bias`` keys are token ids (int), ``"#<id>"``, ``"<eos>"``, or words: a word's bias goes
  to the first token of its encoding that is not a bare space (encoded with and without a leading
  space), e.g. the paper's -100 on the first token of "Sorry".
* ``ids``: one stable string id per prompt; randomness comes from (seed, id), never from the
  batch position, so a record's text does not depend on batching or on resuming.
* ``shared_prefix``: a text common to every prompt (the principle prompt). When given, each entry
  of ``prompts`` is the text that FOLLOWS the prefix (as in ``dj.generate_text``); the prefix is
  prefilled once and shared by the batch.
* Returns the text generated for each prompt, cut before the first stop string.
* A generator whose ``progress`` attribute is True also takes ``progress=`` (a
  :class:`dromedary_jax.progress.TokenProgress` or False): the pipeline's loop passes one bar
  for a whole generation step (see ``pipeline/generation.py``); others are never passed it.

``ScriptedGenerator`` (a fake model for tests and demos) lives in ``testing/scripted.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.sampling.settings import SamplingSettings, resolve_logit_bias

__all__ = ["Generator", "ModelGenerator", "resolve_logit_bias"]


class Generator(Protocol):
    """What a pipeline stage generates with (see the module docstring): ``ModelGenerator``, or
    ``testing.scripted.ScriptedGenerator``."""

    def generate(self, prompts: Sequence[str], *, ids: Sequence[str], settings: SamplingSettings,
                 shared_prefix: str | None = None, seed: int = 0) -> list[str]:
        """One text per prompt, sampled with ``settings``; randomness from (seed, id)."""
        ...


class ModelGenerator:
    """``dj.generate_text`` behind the Generator interface.

    ``batch_size``: rows per device batch (decode slots with the continuous engine). ``top_k``:
    the top_k of settings that leave it off (0; ``config.model.top_k``). ``progress``: show
    progress (the pipeline's loop then draws one bar per stage step and passes it to every call
    as ``generate(..., progress=bar)``; a call without one uses ``progress`` as generate_text
    does). ``engine``: "static" or "continuous" (see ``dj.generate_text``; anything else is a
    UserError). With several processes, each runs its own slots over its share of the prompts
    (either engine)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32, top_k: int = 0,
                 progress: bool = False, engine: str = "static"):
        from dromedary_jax.sampling.engine import check_engine

        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.top_k, self.progress = int(batch_size), int(top_k), bool(progress)
        self.engine = check_engine(engine)

    @property
    def streams(self) -> bool:
        """Whether a call should get a whole stage step's prompts at once and stream results
        through ``on_result`` (the continuous engine: a finished row's slot is refilled with the
        next prompt, so more prompts per call keep the slots full)."""
        return self.engine == "continuous"

    def generate(self, prompts, *, ids, settings: SamplingSettings, shared_prefix=None, seed=0,
                 progress=None, on_result=None) -> list[str]:
        """Texts for ``prompts`` (see the module docstring). A ``settings`` that is not a
        SamplingSettings is a UserError; ids and prompts of different lengths a ValueError.
        ``on_result(i, text)``: called for prompt ``i`` as soon as its text is final."""
        from dromedary_jax.sampling.api import generate_text

        if not isinstance(settings, SamplingSettings):
            raise UserError(f"settings must be a SamplingSettings, got {type(settings).__name__}")
        if self.top_k and settings.top_k == 0:
            settings = dataclasses.replace(settings, top_k=self.top_k)
        if len(ids) != len(prompts):
            raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
        if not prompts and self.model.mesh is None:
            return []  # (with a mesh an empty call still joins the other hosts' collectives)
        return generate_text(
            self.model, self.tokenizer, list(prompts), settings=settings, seed=int(seed),
            ids=[str(i) for i in ids], shared_prefix=shared_prefix, batch_size=self.batch_size,
            progress=self.progress if progress is None else progress, engine=self.engine,
            on_result=on_result)
