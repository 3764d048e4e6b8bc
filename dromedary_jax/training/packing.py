"""Rows of fixed length from a stream of examples: packing with segment ids and positions.

An example arrives as ``inputs`` / ``targets`` / ``loss_mask`` (length n, already shifted for
next-token prediction, see ``examples.model_inputs``) plus its integer ``index``. A row of length
``seq_len`` holds one example (``pack=False``) or as many consecutive examples as fit (greedy, in
stream order: an example that does not fit closes the row and starts the next one). Inside a row
example k (1-based) has segment id k and positions 0..n-1; padding has segment id 0, position 0,
loss mask 0. The model's attention rule (same non-zero segment, key position <= query position)
then never lets one example see another.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """``n`` padding rows: every ROW_KEYS array int32 zeros [n, seq_len] (segment 0, mask 0)."""
    return {k: np.zeros((n, seq_len), np.int32) for k in ROW_KEYS}


def make_row(examples: Sequence[dict], seq_len: int) -> dict[str, np.ndarray]:
    """One row from examples whose lengths sum to <= seq_len."""
    row = {k: np.zeros((seq_len,), np.int32) for k in ROW_KEYS}
    at = 0
    for seg, ex in enumerate(examples, start=1):
        n = len(ex["inputs"])
        row["tokens"][at:at + n] = ex["inputs"]
        row["targets"][at:at + n] = ex["targets"]
        row["loss_mask"][at:at + n] = ex["loss_mask"]
        row["segment_ids"][at:at + n] = seg
        row["positions"][at:at + n] = np.arange(n, dtype=np.int32)
        at += n
    if at > seq_len:
        raise ValueError(f"examples of total length {at} do not fit a row of {seq_len}")
    return row


class RowPacker:
    """Greedy streaming packer. ``add`` returns the finished row (a list of examples) when the
    new example does not fit the open row, else None; ``flush`` closes the open row."""

    def __init__(self, seq_len: int, pack: bool = True):
        self.seq_len = seq_len
        self.pack = pack
        self.open: list = []
        self.used = 0

    def fits(self, n: int) -> bool:
        """Whether an example of ``n`` tokens goes into the open row: always when it is empty,
        else only when packing and it still has ``n`` free positions."""
        if not self.open:
            return True
        return self.pack and self.used + n <= self.seq_len

    def add(self, item, n: int):
        """Put ``item`` (``n`` tokens) in the open row, first closing it when the item does not
        fit; returns the closed row (a list of items) or None. ValueError when ``n`` > seq_len."""
        if n > self.seq_len:
            raise ValueError(f"example of length {n} is longer than the row length {self.seq_len}")
        done = None
        if not self.fits(n):
            done = self.flush()
        self.open.append(item)
        self.used += n
        return done

    def flush(self):
        """Close the open row: its list of items, or None when it was empty."""
        done, self.open, self.used = self.open, [], 0
        return done or None


def count_rows(lengths: Iterable[int], seq_len: int, pack: bool = True) -> int:
    """How many rows ``RowPacker`` makes from examples of these (input) lengths, in this order."""
    packer = RowPacker(seq_len, pack)
    rows = 0
    for n in lengths:
        if packer.add(None, int(n)) is not None:
            rows += 1
    if packer.flush() is not None:
        rows += 1
    return rows


def pack_examples(examples: Iterable[dict], seq_len: int, pack: bool = True) -> Iterator[tuple]:
    """(row arrays, example indices) for each row (a plain, non-checkpointable helper)."""
    packer = RowPacker(seq_len, pack)
    for ex in examples:
        done = packer.add(ex, len(ex["inputs"]))
        if done:
            yield make_row(done, seq_len), [int(e["index"]) for e in done]
    done = packer.flush()
    if done:
        yield make_row(done, seq_len), [int(e["index"]) for e in done]
