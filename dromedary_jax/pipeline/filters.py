"""Instruction filters for stage 1: ROUGE-L dedup (fast, same decisions as ``rouge_score``),
length / keyword / leading-character filters.

ROUGE-L here is exactly the ``rouge_score`` package's ``rougeL`` with ``use_stemmer=False``:
text is lower-cased, every run of characters outside ``[a-z0-9]`` becomes a separator, and
F = 2PR / (P + R) with P = LCS / len(prediction), R = LCS / len(target). The LCS comes from
rapidfuzz (bit-parallel C++): tokens are mapped to single characters, and the Indel
normalised similarity of two such strings is 2 * LCS / (m + n), which is the same F. Pool items
whose token count alone rules out F > threshold are never compared (length buckets), exact
duplicates are caught by a set lookup, and rapidfuzz prunes further with ``score_cutoff``.
The final keep/drop decision re-computes F with ``rouge_score``'s own float expression.
"""
from __future__ import annotations

import math
import re
import string
from typing import Iterable, Sequence

from rapidfuzz import process
from rapidfuzz.distance import Indel

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
# rapidfuzz normalised scores are computed differently from rouge_score's float expression; any
# pair within this band of the threshold is re-checked exactly.
_BAND = 1e-6

DEFAULT_BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                     "map", "maps", "draw", "plot", "go to", "video", "audio", "music",
                     "flowchart", "diagram")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def rouge_l_f(target_tokens: Sequence[str], prediction_tokens: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists, computed with rapidfuzz (reference helper for tests)."""
    if not target_tokens or not prediction_tokens:
        return 0.0
    vocab: dict[str, str] = {}
    a = "".join(_char(vocab, t) for t in target_tokens)
    b = "".join(_char(vocab, t) for t in prediction_tokens)
    return _f_from_lcs(_lcs(a, b), len(a), len(b))


def _char(vocab: dict[str, str], token: str) -> str:
    c = vocab.get(token)
    if c is None:
        i = len(vocab) + 1
        if i >= 0xD800:  # skip the surrogate block
            i += 0x800
        c = vocab[token] = chr(i)
    return c


def _lcs(a: str, b: str) -> int:
    return (len(a) + len(b) - Indel.distance(a, b)) // 2


def _f_from_lcs(lcs: int, n_target: int, n_pred: int) -> float:
    """rouge_score.scoring.fmeasure(precision, recall) with the package's own operation order."""
    precision = lcs / n_pred
    recall = lcs / n_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


class RougeLDeduper:
    """Incremental ROUGE-L dedup: ``keep(candidates)`` drops a candidate whose F with any pool
    member is > threshold; every kept candidate joins the pool for the ones after it."""

    def __init__(self, pool: Iterable[str] = (), threshold: float = 0.7):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self._vocab: dict[str, str] = {}
        self._by_len: dict[int, list[str]] = {}
        self._exact: set[str] = set()
        self.size = 0
        for text in pool:
            self._add(self._encode(text))

    def _encode(self, text: str) -> str:
        return "".join(_char(self._vocab, t) for t in rouge_tokens(text))

    def _add(self, s: str) -> None:
        self.size += 1
        if s:  # empty token lists score 0 against everything
            self._by_len.setdefault(len(s), []).append(s)
            self._exact.add(s)

    def _length_range(self, m: int) -> tuple[int, int]:
        """Pool lengths n for which F <= 2 min(m, n) / (m + n) can still exceed the threshold."""
        t = self.threshold
        if t <= 0.0:
            return 1, 1 << 62
        return max(1, math.floor(m * t / (2.0 - t))), math.ceil(m * (2.0 - t) / t)

    def max_f_exceeds(self, s: str) -> bool:
        """True iff some pool member has ROUGE-L F > threshold with the encoded candidate ``s``."""
        if not s:
            return False
        if s in self._exact:
            return 1.0 > self.threshold
        m = len(s)
        lo, hi = self._length_range(m)
        cutoff = max(0.0, self.threshold - _BAND)
        for n, bucket in self._by_len.items():
            if n < lo or n > hi or 2.0 * min(m, n) / (m + n) < cutoff:
                continue
            for choice, _, _ in process.extract(s, bucket, scorer=Indel.normalized_similarity,
                                                score_cutoff=cutoff, limit=None):
                if _f_from_lcs(_lcs(s, choice), m, len(choice)) > self.threshold:
                    return True
        return False

    def keep(self, candidates: Sequence[str]) -> list[bool]:
        """One keep (True) / drop (False) per candidate, in order: dropped iff its ROUGE-L F with
        a pool member (including candidates kept earlier, in this call or a previous one) is
        > ``threshold``. Kept candidates join the pool (``size`` grows by one each)."""
        out = []
        for text in candidates:
            s = self._encode(text)
            ok = not self.max_f_exceeds(s)
            if ok:
                self._add(s)
            out.append(ok)
        return out


def rouge_l_keep(candidates: Sequence[str], pool: Sequence[str], threshold: float = 0.7) -> list[bool]:
    """Keep/drop decisions for ``candidates`` in order: a candidate is dropped iff its ROUGE-L F
    (rouge_score, no stemming) with any pool member or any earlier KEPT candidate is > threshold.
    Same decisions as scoring each candidate against the whole pool with ``rouge_scorer``."""
    return RougeLDeduper(pool, threshold).keep(candidates)


# ---------------------------------------------------------------------------------------------
# Cheap instruction filters (vanilla self-instruct). Each returns a reason string or None.

def _word_re(words: Iterable[str]) -> re.Pattern | None:
    words = [w for w in words if w]
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


class InstructionFilter:
    """Length (in whitespace words), keyword blacklist, leading punctuation / non-ASCII."""

    REASONS = ("too_short", "too_long", "blacklist", "leading_punctuation", "non_ascii")

    def __init__(self, min_words: int = 4, max_words: int = 150,
                 blacklist: Sequence[str] = DEFAULT_BLACKLIST):
        self.min_words, self.max_words = int(min_words), int(max_words)
        self._black = _word_re(blacklist)

    def reason(self, instruction: str, input_text: str = "") -> str | None:
        """The first filter ``instruction`` fails, as one of ``REASONS``, else None: fewer than
        ``min_words`` or more than ``max_words`` whitespace-separated words, a blacklisted word
        (whole word, any case) in the instruction or ``input_text``, a first non-space character
        that is ASCII punctuation or not ASCII. The rules follow Stanford Alpaca's
        ``generate_instruction.py`` post-processing. ``instruction`` needs at least one word when
        ``min_words`` is 0 (IndexError otherwise)."""
        n = len(instruction.split())
        if n < self.min_words:
            return "too_short"
        if n > self.max_words:
            return "too_long"
        if self._black is not None and (self._black.search(instruction) or self._black.search(input_text)):
            return "blacklist"
        first = instruction.strip()[0]
        if first in string.punctuation:
            return "leading_punctuation"
        if not first.isascii():
            return "non_ascii"
        return None
