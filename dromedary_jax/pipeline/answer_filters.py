"""The one cleaning and filtering rule for generated answers, shared by stage 2 (self-align) and
stage 4 (verbose cloning).

    answer, flags = clean(text, names)          # text: what follows the answer header
    reason = degenerate(answer, names, question=q, thoughts=(...), principle_keys=(...))

``names``: the names that open a turn besides ``User`` (the assistant's name and the prompt
codename). ``clean`` cuts, in this order (``flags`` says which step changed the text):

* ``cut_user_turn``: at the first further turn, a line that starts with ``User:``,
  ``<Name>:`` or ``<Name> (...):``, the prompt's ``# <Name>`` header, or a ``###`` separator line
  (bare, or naming a role: ``### Instruction:``, ``### Response``, ...). A markdown heading such
  as ``### Ingredients`` is no turn. A header at the very start of the text is left in place, so
  that ``degenerate`` reports it (``turn_marker``) instead of an empty answer.
* ``cut_repeat``: before the first sentence (>= 3 words) already seen in the answer.
* ``trimmed``: a trailing sentence fragment (text cut off by the token limit).

``degenerate`` returns None or the first of ``REASONS`` that applies:

* ``thoughts_leak``: the answer restates the internal-thoughts template: the words "internal
  thoughts", a principle citation (``principles 2``, ``3 (helpful), 7 (candor)``, ``N (<a
  principle key>)``), a sentence in the thoughts' style (``The user asks ...``), or a sentence (>= 6
  words) of ``thoughts`` (the record's own thoughts and the exemplars'). Phrases that are in the
  question do not count.
* ``turn_marker``: a turn header is still inside the answer (``Watson:``, ``User:``, ``<Name>
  (detailed):``, ``(auto reply)``), at its start or in the middle of a line; a name that occurs
  in the question does not count.
* ``repetition``: runaway repetition that the sentence cut does not catch (a loop inside one
  sentence, or repeated sentences that differ in a number): of the answer's word 4-grams, fewer
  than ``MIN_DISTINCT_4GRAMS`` are distinct (answers of >= ``MIN_WORDS_FOR_RATIO`` words), or
  one 3-gram makes up more than ``MAX_TOP_3GRAM_SHARE`` of them.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

REASONS = ("thoughts_leak", "turn_marker", "repetition")
USER = "User"
ROLE_WORDS = ("Instruction", "Input", "Response", "Human", "Assistant", "User", "System")
MIN_WORDS_FOR_RATIO = 24        # the n-gram measures need some text
MIN_DISTINCT_4GRAMS = 0.75      # distinct / all word 4-grams
MAX_TOP_3GRAM_SHARE = 0.2       # the most frequent word 3-gram's share of all 3-grams
MIN_THOUGHT_SENTENCE_WORDS = 6
_TERMINAL = tuple('.!?"\')]}`*')
_WORD = re.compile(r"\w+(?:['’-]\w+)*")


def _names_alt(names: Sequence[str]) -> str:
    uniq = [n for n in dict.fromkeys([USER, *names]) if n]
    return "|".join(re.escape(n) for n in sorted(uniq, key=len, reverse=True))


def turn_start(names: Sequence[str]) -> re.Pattern:
    """A line that opens a further turn (see the module docstring); matches at the line start."""
    alt = _names_alt(names)
    roles = "|".join(ROLE_WORDS)
    return re.compile(
        rf"(?m)^[ \t]*(?:(?:{alt})(?:[ \t]*\([^()\n]{{0,40}}\))?[ \t]*:"   # User: / Watson (auto reply):
        rf"|#[ \t]*(?:{alt})[ \t]*$"                                      # the prompt's '# Watson' header
        rf"|###+[ \t]*(?:{roles}|{alt})?[ \t]*(?::|$))")                   # '###' / '### Response:'


def cut_at_turn(text: str, names: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the first further-turn line (one at the very start is kept)."""
    for m in turn_start(names).finditer(text):
        if text[:m.start()].strip():
            return text[:m.start()].rstrip(), True
    return text, False


def cut_repeated_sentence(text: str, min_words: int = 3) -> tuple[str, bool]:
    """Cut ``text`` before the first sentence (of >= ``min_words`` words) seen earlier in it."""
    pieces = re.split(r"(?<=[.?!\n])", text)
    seen, out = set(), []
    for piece in pieces:
        key = " ".join(piece.split())
        if len(key.split()) >= min_words:
            if key in seen:
                return "".join(out).rstrip(), True
            seen.add(key)
        out.append(piece)
    return text, False


def trim_incomplete(text: str) -> tuple[str, bool]:
    """Drop a trailing sentence fragment (text cut off by the token limit)."""
    s = text.rstrip()
    if not s or s.endswith(_TERMINAL):
        return s, False
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)|\n", s)]
    if not ends:
        return s, False
    return s[:ends[-1]].rstrip(), True


def clean(text: str, names: Sequence[str]) -> tuple[str, dict]:
    """(cleaned answer, {"cut_user_turn", "cut_repeat", "trimmed": bool}) for the text after the
    answer header."""
    flags = {}
    text, flags["cut_user_turn"] = cut_at_turn(text.strip(), names)
    text, flags["cut_repeat"] = cut_repeated_sentence(text.strip())
    text, flags["trimmed"] = trim_incomplete(text)
    return text.strip(), flags


# ------------------------------------------------------------------------------------ filters

_CITE = r"\d{1,2}[ \t]*\([^()\n]{1,40}\)"
_CITE_RUN = re.compile(rf"{_CITE}(?:[ \t]*,[ \t]*(?:and[ \t]+)?{_CITE})+|{_CITE}[ \t]+and[ \t]+{_CITE}")
_PRINCIPLE_NUMBER = re.compile(r"\bprinciples?[ \t]+\d", re.IGNORECASE)
_THOUGHTS_OPENING = re.compile(r"(?:^|[.!?:]\s+|\n)[^\w\n]*(?:the[ \t]+)?user[ \t]+(?:asks|wants|needs|is[ \t]+asking|"
                               r"requests|would[ \t]+like)\b", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")


def words(text: str) -> list[str]:
    """Lower-cased words (``can't``, ``step-by-step`` stay one word)."""
    return _WORD.findall(text.lower())


def _norm(text: str) -> str:
    return " ".join(words(text))


def _thought_sentences(thoughts: Sequence[str]) -> list[str]:
    out = []
    for t in thoughts:
        for s in _SENTENCES.split(t or ""):
            n = _norm(s)
            if len(n.split()) >= MIN_THOUGHT_SENTENCE_WORDS:
                out.append(n)
    return list(dict.fromkeys(out))


def thoughts_leak(answer: str, question: str = "", thoughts: Sequence[str] = (),
                  principle_keys: Sequence[str] = ()) -> bool:
    """Does ``answer`` restate the internal-thoughts template (see the module docstring)?"""
    q = question.lower()
    if "internal thought" in answer.lower() and "internal thought" not in q:
        return True
    if "principle" not in q and (_PRINCIPLE_NUMBER.search(answer) or _CITE_RUN.search(answer)):
        return True
    keys = [k for k in principle_keys if k and k.lower() not in q]
    if keys:
        alt = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
        if re.search(rf"\d{{1,2}}[ \t]*\((?:{alt})\)", answer, re.IGNORECASE):
            return True
    if _THOUGHTS_OPENING.search(answer) and not re.search(r"\buser\b", q):
        return True
    a, qn = _norm(answer), _norm(question)
    return any(s in a and s not in qn for s in _thought_sentences(thoughts))


def turn_marker(answer: str, names: Sequence[str], question: str = "") -> bool:
    """Is a turn header (``Name:``, ``Name (...):``, ``User:``) or ``(auto reply)`` inside
    ``answer``? Names that occur in ``question`` do not count."""
    q = question.lower()
    kept = [n for n in dict.fromkeys([USER, *names]) if n and n.lower() not in q]
    if "(auto reply)" in answer.lower() and "auto reply" not in q:
        return True
    if not kept:
        return False
    alt = "|".join(re.escape(n) for n in sorted(kept, key=len, reverse=True))
    return re.search(rf"(?<!\w)(?:{alt})(?:[ \t]*\([^()\n]{{0,40}}\))?[ \t]*:(?!\S)", answer) is not None


def repetition(answer: str) -> bool:
    """Runaway repetition (see the module docstring)."""
    w = words(answer)
    if len(w) < MIN_WORDS_FOR_RATIO:
        return False
    grams4 = list(zip(w, w[1:], w[2:], w[3:]))
    if len(set(grams4)) < MIN_DISTINCT_4GRAMS * len(grams4):
        return True
    top = Counter(zip(w, w[1:], w[2:])).most_common(1)[0][1]
    return top > 2 and top > MAX_TOP_3GRAM_SHARE * (len(w) - 2)


def degenerate(answer: str, names: Sequence[str], *, question: str = "", thoughts: Sequence[str] = (),
               principle_keys: Sequence[str] = ()) -> str | None:
    """The first of ``REASONS`` that ``answer`` fails, or None."""
    if thoughts_leak(answer, question, thoughts, principle_keys):
        return "thoughts_leak"
    if turn_marker(answer, names, question):
        return "turn_marker"
    if repetition(answer):
        return "repetition"
    return None
