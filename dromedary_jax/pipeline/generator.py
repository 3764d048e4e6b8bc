"""The generation interface the pipeline stages call, and its model-backed implementation.

    texts = generator.generate(prompts, ids=ids, max_new_tokens=256, temperature=0.5, top_p=0.95,
                               stop=("\\n\\nUser:",), logit_bias={"Sorry": -100.0},
                               shared_prefix=principle_prompt, seed=0)

* ``ids``: one stable string id per prompt; randomness comes from (seed, id), never from the
  batch position, so a record's text does not depend on batching or on resuming.
* ``shared_prefix``: a text common to every prompt (the principle prompt). When given, each entry
  of ``prompts`` is the text that FOLLOWS the prefix (as in ``dj.generate_text``); the prefix is
  prefilled once and shared by the batch.
* ``logit_bias``: keys are token ids (int), ``"#<id>"``, ``"<eos>"``, or words: a word's bias goes
  to the first token of its encoding that is not a bare space (encoded with and without a leading
  space), e.g. the paper's -100 on the first token of "Sorry".
* Returns the text generated for each prompt, cut before the first stop string.
* A generator whose ``progress`` attribute is True also takes ``progress=`` (a
  :class:`dromedary_jax.progress.TokenProgress` or False): the pipeline's loop passes one bar
  for a whole generation step (see ``pipeline/loop.py``); others are never passed it.

``ScriptedGenerator`` (a fake model for tests and demos) lives in ``pipeline/scripted.py``.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from dromedary_jax.errors import UserError


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], *, ids: Sequence[str], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
                 logit_bias: Mapping | None = None, shared_prefix: str | None = None,
                 seed: int = 0, ngram_penalties: Sequence = ()) -> list[str]:
        ...


def resolve_logit_bias(tokenizer, logit_bias: Mapping | None) -> dict[int, float]:
    """Words / "#id" / "<eos>" / int keys -> {token_id: bias} for ``tokenizer``."""
    out: dict[int, float] = {}
    for key, bias in (logit_bias or {}).items():
        bias = float(bias)
        if isinstance(key, int):
            ids = [key]
        elif key == "<eos>":
            ids = [tokenizer.eos_id]
        elif isinstance(key, str) and key.startswith("#") and key[1:].isdigit():
            ids = [int(key[1:])]
        elif isinstance(key, str) and key.strip():
            ids = []
            for variant in (key, " " + key):
                # the first token that carries part of the word (skip a bare-space piece)
                first = next((i for i in tokenizer.encode(variant, bos=False) if tokenizer.decode([i]).strip()), None)
                if first is not None and first not in ids:
                    ids.append(first)
        else:
            raise UserError(f"logit_bias key {key!r}: use a word, '#<token id>' or '<eos>'")
        for i in ids:
            if not 0 <= int(i) < tokenizer.vocab_size:
                raise UserError(f"logit_bias key {key!r}: token id {i} outside the vocabulary")
            out[int(i)] = bias
    return out


class ModelGenerator:
    """``dj.generate_text`` behind the Generator interface. ``progress``: show progress (the
    pipeline's loop then draws one bar per stage step and passes it to every call as
    ``generate(..., progress=bar)``; a call without one uses ``progress`` as generate_text does)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32, top_k: int = 0, progress: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.top_k, self.progress = int(batch_size), int(top_k), bool(progress)

    def generate(self, prompts, *, ids, max_new_tokens, temperature=0.0, top_p=1.0, stop=(),
                 logit_bias=None, shared_prefix=None, seed=0, ngram_penalties=(),
                 progress=None) -> list[str]:
        import dromedary_jax as dj

        if len(ids) != len(prompts):
            raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
        if not prompts and self.model.mesh is None:
            return []  # (with a mesh an empty call still joins the other hosts' collectives)
        return dj.generate_text(
            self.model, self.tokenizer, list(prompts), max_new_tokens=int(max_new_tokens),
            temperature=float(temperature), top_p=float(top_p), top_k=self.top_k, stop=tuple(stop),
            logit_bias=resolve_logit_bias(self.tokenizer, logit_bias) or None, seed=int(seed),
            ids=[str(i) for i in ids], shared_prefix=shared_prefix, batch_size=self.batch_size,
            progress=self.progress if progress is None else progress,
            ngram_penalties=tuple(tuple(p) for p in ngram_penalties))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]
