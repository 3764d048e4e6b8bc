"""One typed, validated set of sampling settings: what to sample and when to stop.

    s = SamplingSettings(max_new_tokens=256, temperature=0.5, top_p=0.95,
                         stop=("\\n\\nUser:",), logit_bias={"Sorry": -100.0})
    dj.generate_text(model, tok, prompts, settings=s, seed=0)
    s = SamplingSettings.from_config(config.self_align, "self_align")   # a pipeline section

The settings are checked ONCE, when the object is made (a bad value is a one-line UserError that
names the field, e.g. ``temperature must be 0 (greedy) or >= 0.0001, got -1.0``), and stored in
normal form (ints, floats, tuples, a read-only mapping), so the object can be passed on and
compared freely. What depends on a model or tokenizer (``max_new_tokens`` against max_seq_len,
token ids against the vocabulary, word keys of ``logit_bias``) is checked where the model is
known (``api.loop_inputs``, :func:`bias_by_token`).

Not settings: ``seed`` and the example ids (which random stream a row draws from; the pipeline
fixes one seed per run and an id per record), and how a call is run (batch size, engine, shared
prefix, progress).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping, Union

import numpy as np

from dromedary_jax.errors import UserError
from dromedary_jax.sampling.checks import float_arg, int_arg
from dromedary_jax.sampling.stop_strings import normalize_stop

MIN_TEMPERATURE = 1e-4  # smaller temperatures are 0 (greedy) or overflow in float32
EOS_KEY = "<eos>"       # the logit_bias key for the tokenizer's EOS token

BiasKey = Union[int, str]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Sampling settings, validated in ``__post_init__`` (a bad value raises a UserError naming
    the field). Fields, as stored after validation:

    * ``max_new_tokens`` (int >= 1): tokens to generate at most per prompt (EOS not counted in
      the result); a call also refuses more than 4x the model's max_seq_len.
    * ``temperature`` (float): 0 = greedy, else >= 1e-4 (logits are divided by it).
    * ``top_p`` (float in (0, 1]): nucleus sampling; 1 = off.
    * ``top_k`` (int >= 0): keep the k most likely tokens; 0 = off (also when >= the vocabulary).
    * ``stop`` (tuple of non-empty str; a single string is accepted): text is cut before the
      first stop string (text generation only: ``generate`` on token ids refuses it).
    * ``logit_bias`` (read-only mapping key -> float, added to the logits at every step): keys are
      token ids (int >= 0), ``"#<id>"``, ``"<eos>"`` (the tokenizer's EOS), or words (the first
      token of the word's encoding that is not a bare space, with and without a leading space).
      Words and ``"<eos>"`` need a tokenizer (``generate_text``). ``None`` / ``{}``: no bias.
    * ``ngram_penalties`` (tuple of (n: int >= 1, penalty: float)): a token that would complete
      an n-gram already in the generated tokens gets ``-penalty`` added to its logit.
    * ``eos_id`` (None or tuple of int >= 0): None = the tokenizer's (``generate_text``) or the
      model config's (``generate``) EOS; an int, a list of ints, or -1 / () to disable EOS.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    logit_bias: Mapping[BiasKey, float] | None = None
    ngram_penalties: tuple[tuple[int, float], ...] = ()
    eos_id: tuple[int, ...] | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name)))

    def __hash__(self):
        return hash(tuple(frozenset(v.items()) if isinstance(v, Mapping) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    @property
    def greedy(self) -> bool:
        """True when ``temperature`` is 0 (argmax decoding)."""
        return self.temperature == 0.0

    @classmethod
    def from_config(cls, section, path: str) -> "SamplingSettings":
        """Settings from a config section (an ml_collections ConfigDict or any object with
        attribute access and ``.get``) with the keys ``max_new_tokens``, ``temperature``,
        ``top_p`` (required) and ``top_k``, ``stop``, ``logit_bias``, ``ngram_penalties``
        (optional; missing or None: the defaults). Other keys of the section are ignored.
        ``path``: the section's dotted path under ``config`` (e.g. ``"self_instruct.topics"``);
        errors name the key as ``config.<path>.<key>``, e.g.
        ``config.self_align.temperature must be 0 (greedy) or >= 0.0001, got -1.0``."""
        kwargs = {}
        for key in ("max_new_tokens", "temperature", "top_p"):
            value = section.get(key)
            if value is None:
                raise UserError(f"config.{path}.{key} is missing (a sampling setting)")
            kwargs[key] = value
        for key in ("top_k", "stop", "logit_bias", "ngram_penalties"):
            value = section.get(key)
            if value is not None:
                kwargs[key] = dict(value) if key == "logit_bias" and _is_mapping(value) else value
        try:
            return cls(**kwargs)
        except UserError as e:
            raise UserError(_config_message(str(e), path)) from None


# ----------------------------------------------------------------------------- field checks
def _max_new_tokens(v) -> int:
    return int_arg("max_new_tokens", v, 1)


def _temperature(v) -> float:
    t = float_arg("temperature", v)
    if t != 0 and not t >= MIN_TEMPERATURE:
        raise UserError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {t!r}")
    return t


def _top_p(v) -> float:
    p = float_arg("top_p", v)
    if not (0 < p <= 1 and np.float32(p) > 0):
        raise UserError(f"top_p must be in (0, 1], got {p}")
    return p


def _top_k(v) -> int:
    return int_arg("top_k", v, 0, hint=" (0 = off)")


def _is_mapping(v) -> bool:
    return isinstance(v, Mapping) or (hasattr(v, "items") and hasattr(v, "keys"))


def _bias_key(k) -> BiasKey:
    """A logit_bias key -> int (a token id) or str (``"#<id>"``, ``"<eos>"`` or a word)."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)) and int(k) >= 0:
        return int(k)
    if isinstance(k, str) and k.strip():
        return k
    raise UserError(f"logit_bias key {k!r} must be a token id (an int >= 0), a word, "
                    f"'#<token id>' or '{EOS_KEY}'")


def _logit_bias(v) -> Mapping[BiasKey, float]:
    if v is None or (isinstance(v, (list, tuple)) and not v):
        return MappingProxyType({})
    if not _is_mapping(v):
        raise UserError(f"logit_bias must be a mapping {{token_id: bias}} (e.g. {{5: -100.0}}), "
                        f"got {type(v).__name__}")
    out: dict[BiasKey, float] = {}
    for k, b in v.items():
        key = _bias_key(k)
        out[key] = float_arg(f"logit_bias[{key if isinstance(key, int) else repr(key)}]", b)
    return MappingProxyType(out)


def _ngram_penalties(v) -> tuple[tuple[int, float], ...]:
    if v is None:
        return ()
    if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
        raise UserError(f"ngram_penalties must be a list of (n, penalty) pairs, got {v!r}")
    out = []
    for item in v:
        try:
            n, p = item
        except (TypeError, ValueError):
            raise UserError(
                f"ngram_penalties entries must be (n, penalty) pairs, got {item!r}") from None
        out.append((int_arg("ngram_penalties: n", n, 1),
                    float_arg(f"ngram_penalties: the penalty for n={n}", p)))
    return tuple(out)


def normalize_eos_id(v) -> tuple[int, ...] | None:
    """An ``eos_id`` argument -> None (the default EOS) or a tuple of token ids >= 0: an int
    (< 0: EOS disabled, ()), or an iterable of ints. Raises UserError naming ``eos_id``."""
    if v is None:
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return () if int(v) < 0 else (int(v),)
    if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
        raise UserError(f"eos_id must be a token id (int), a list of token ids, or -1 to disable "
                        f"EOS; got {v!r}")
    eos = tuple(int_arg("eos_id", e, hint=" (a token id)") for e in v)
    for e in eos:
        if e < 0:
            raise UserError(f"eos_id {e} is not a token id (ids are >= 0; -1 alone disables EOS)")
    return eos


_CHECKS = {"max_new_tokens": _max_new_tokens, "temperature": _temperature, "top_p": _top_p,
           "top_k": _top_k, "stop": normalize_stop, "logit_bias": _logit_bias,
           "ngram_penalties": _ngram_penalties, "eos_id": normalize_eos_id}


def _config_message(message: str, path: str) -> str:
    """A field's error message -> the same naming the config key ``config.<path>.<field>``."""
    for name in sorted(_CHECKS, key=len, reverse=True):
        if message.startswith(name):
            return f"config.{path}.{message}"
    return f"config.{path}: {message}"


# ----------------------------------------------------------------------------- loose keywords
class Unset:
    """The default of a loose sampling keyword of ``generate`` / ``generate_text``: "not given"
    (the SamplingSettings default applies). Its repr is the default's, so signatures read as
    before (``temperature: float = 0.0``)."""

    __slots__ = ("value", "text")

    def __init__(self, value, text: str | None = None):
        self.value, self.text = value, text

    def __repr__(self) -> str:
        return self.text if self.text is not None else repr(self.value)


REQUIRED = Unset(dataclasses.MISSING, "<required without settings=>")
UNSET = {f.name: Unset(f.default) for f in dataclasses.fields(SamplingSettings)
         if f.default is not dataclasses.MISSING}
UNSET["max_new_tokens"] = REQUIRED


def settings_of(settings: SamplingSettings | None, keywords: Mapping[str, object]
                ) -> SamplingSettings:
    """``settings`` or the loose sampling ``keywords`` (name -> value, an :class:`Unset` where
    not given) -> one SamplingSettings. Raises UserError when both are given, when ``settings``
    is not a SamplingSettings, or when neither gives ``max_new_tokens``."""
    given = {k: v for k, v in keywords.items() if not isinstance(v, Unset)}
    if settings is not None:
        if not isinstance(settings, SamplingSettings):
            raise UserError(f"settings must be a SamplingSettings, got {type(settings).__name__}")
        if given:
            names = ", ".join(f"{k}=" for k in sorted(given))
            raise UserError(f"pass either settings= or the sampling keywords, not both (got "
                            f"settings= and {names})")
        return settings
    if "max_new_tokens" not in given:
        raise UserError("max_new_tokens is required (or pass settings=SamplingSettings(...))")
    return SamplingSettings(**given)


# ----------------------------------------------------------------------------- logit bias keys
def _key_token_ids(key: BiasKey, tokenizer) -> list[int]:
    """The token ids a (validated) logit_bias key stands for; words / "<eos>" need a tokenizer."""
    if isinstance(key, int):
        return [key]
    if key.startswith("#") and key[1:].isascii() and key[1:].isdigit():
        return [int(key[1:])]
    if tokenizer is None:
        raise UserError(f"logit_bias key {key!r} is a word or '{EOS_KEY}': generate takes token "
                        f"ids ({{id: bias}} or '#<id>'); use generate_text for words")
    if key == EOS_KEY:
        return [int(tokenizer.eos_id)]
    ids: list[int] = []
    for variant in (key, " " + key):
        # the first token that carries part of the word (skip a bare-space piece)
        first = next((i for i in tokenizer.encode(variant, bos=False)
                      if tokenizer.decode([i]).strip()), None)
        if first is not None and first not in ids:
            ids.append(int(first))
    return ids


def bias_by_token(logit_bias: Mapping[BiasKey, float], tokenizer=None,
                  vocab_size: int | None = None) -> dict[int, float]:
    """A validated ``SamplingSettings.logit_bias`` -> {token_id: bias}, keys taken in order (a
    later key that reaches the same token wins). ``tokenizer``: resolves words and ``"<eos>"``
    (None: only ints and ``"#<id>"``; others are a UserError). ``vocab_size``: when given, an
    id outside [0, vocab_size) is a UserError naming its key."""
    out: dict[int, float] = {}
    for key, bias in logit_bias.items():
        for i in _key_token_ids(key, tokenizer):
            if vocab_size is not None and not 0 <= i < vocab_size:
                raise UserError(f"logit_bias key {key!r}: token id {i} outside the vocabulary")
            out[i] = bias
    return out


def resolve_logit_bias(tokenizer, logit_bias: Mapping | None) -> dict[int, float]:
    """Words / "#id" / "<eos>" / int keys -> {token_id: bias} for ``tokenizer`` (as
    :func:`bias_by_token`). Bad keys or biases, and ids outside the tokenizer's vocabulary, are a
    UserError."""
    return bias_by_token(_logit_bias(logit_bias), tokenizer, tokenizer.vocab_size)
