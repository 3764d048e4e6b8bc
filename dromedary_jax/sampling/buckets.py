"""Length buckets: pad prompt lengths so a long run compiles a handful of programs.

Lengths round up to a power of two between ``minimum`` and ``pow2_until``, and to a multiple
of ``step`` above it (a 1.5k-token principle prompt pads to 1536, not 2048).
"""
from __future__ import annotations


def bucket(n: int, *, minimum: int = 16, pow2_until: int = 512, step: int = 256) -> int:
    """The smallest bucket >= n (n >= 0)."""
    n = max(int(n), 1)
    if n <= pow2_until:
        b = max(minimum, 1)
        while b < n:
            b *= 2
        return b
    return -(-n // step) * step


GEN_SLOTS_MULTIPLE = 16


def gen_slots(max_new_tokens: int) -> int:
    """The KV cache's slots for generated tokens: ``max_new_tokens`` rounded up to a multiple of
    ``GEN_SLOTS_MULTIPLE``. A call has ONE max_new_tokens (a stage's setting), so a power-of-two
    bucket would only add never-written slots that every decode step's attention still reads
    (65 new tokens: 80 slots instead of 128)."""
    return round_up(max(int(max_new_tokens), 1), GEN_SLOTS_MULTIPLE)


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple`` (>= 1)."""
    multiple = max(int(multiple), 1)
    return -(-int(n) // multiple) * multiple
