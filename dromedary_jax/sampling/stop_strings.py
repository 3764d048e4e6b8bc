"""Stop strings, checked on the host between decode chunks.

The decode loop runs ``stop_check_every`` steps on device, then the host decodes each unfinished
row's generated tokens IN FULL and looks for any stop string in the text. Decoding the whole row
(not the newest token) is what catches a stop string split across several tokens. A row whose
text contains a stop string is marked done (so the loop exits early once every row is done);
the returned text is everything before the earliest stop string. Tokens generated after the
stop inside the same chunk are discarded.

The continuous engine also ends a chunk on device as soon as a row samples a *trigger* token
(:func:`stop_trigger_mask`: one whose text holds the last character of a stop string, or a
partial UTF-8 character), so the host checks right when a stop string can have completed
instead of up to ``stop_check_every`` steps later. Triggers only make the check earlier: the
texts are the same with or without them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dromedary_jax.errors import UserError


def normalize_stop(stop) -> tuple[str, ...]:
    """A string or a sequence of strings -> tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (bytes, dict)) or not hasattr(stop, "__iter__"):
        raise UserError(f"stop must be a string or a list of strings, got {stop!r}")
    out = tuple(stop)
    for s in out:
        if not isinstance(s, str) or not s:
            raise UserError(f"stop strings must be non-empty strings, got {s!r}")
    return out


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    best = -1
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` before the earliest stop string (all of it when none occurs)."""
    i = find_stop(text, stop)
    return text if i < 0 else text[:i]


def stop_trigger_mask(tokenizer, stop: Sequence[str], vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: the tokens after which a stop string may have just completed, i.e.
    whose decoded text holds the last character of some stop string, or U+FFFD (a byte of a
    character split over tokens). A stop string's last character arrives with the token that
    completes it, so every completion is flagged (plus some tokens that only look like one).
    Ids beyond the tokenizer's vocabulary are False. ``stop``: normalized stop strings."""
    ends = {s_[-1] for s_ in stop} | {"\ufffd"}
    mask = np.zeros(vocab_size, bool)
    for i in range(vocab_size):
        try:
            text = tokenizer.decode([i])
        except Exception:  # an id the tokenizer does not have (model vocab padded beyond it)
            continue
        mask[i] = any(ch in text for ch in ends)
    return mask


def mark_stopped(done: np.ndarray, n_valid: np.ndarray, last_n_valid: np.ndarray,
                 tokens: np.ndarray, example_of, is_stopped, rows) -> bool:
    """The host's check between decode chunks (both engines): every row ``b`` of ``rows`` that
    is not ``done``, has new tokens (``n_valid[b] != last_n_valid[b]``) and whose tokens so
    far satisfy ``is_stopped(example_of[b], tokens[b, :n_valid[b]])`` is marked done IN PLACE
    in ``done`` (bool [B]). ``tokens`` int [B, G]; ``example_of``: the example id of each row.
    Returns whether any row was marked (then ``done`` must go back to the device)."""
    hit = False
    for b in rows:
        if (not done[b] and n_valid[b] != last_n_valid[b]
                and is_stopped(int(example_of[b]), tokens[b, :n_valid[b]].tolist())):
            done[b] = hit = True
    return hit
