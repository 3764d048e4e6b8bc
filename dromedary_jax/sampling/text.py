"""Text <-> ids at the sampler's seams: prompts behind a shared prefix, and generated text read
as the continuation of its prompt.

Two texts encoded apart and concatenated are not the text encoded whole: a SentencePiece
tokenizer (LLaMA-1/2, ``add_dummy_prefix``) turns " question" into a lone "▁" token plus
"▁question" when it starts a text, and decodes a lone "▁world" as "world" without its space.
Both helpers here work on the joined text, so the model reads, and the stop strings see,
exactly what the same text gets in one piece.
"""
from __future__ import annotations

from typing import Sequence

from dromedary_jax.tokenizer import common_prefix_length


def encode_prompts(tokenizer, prompts: Sequence[str], shared_prefix: str | None = None
                   ) -> tuple[list[int] | None, list[list[int]]]:
    """``(prefix ids or None, per-prompt ids)`` for :func:`dromedary_jax.generate_text`.

    Every row is ``encode(shared_prefix + prompt)`` (BOS by the tokenizer's own rule, see
    ``Tokenizer.add_bos``), split into the prefix part all rows share and each row's own
    suffix. The shared part is ``encode(shared_prefix)`` cut back to the ids every row starts
    with (normally all of it; a token that merges across the seam stays in the rows), so
    ``prefix ids + row ids == encode(shared_prefix + prompt)`` for every prompt.
    """
    if shared_prefix is None:
        return None, [list(tokenizer.encode(p)) for p in prompts]
    prefix = list(tokenizer.encode(shared_prefix))
    rows = [list(tokenizer.encode(shared_prefix + p)) for p in prompts]
    n = len(prefix)
    for r in rows:
        n = min(n, common_prefix_length(prefix, r))
    return prefix[:n], [r[n:] for r in rows]


def continuation_text(tokenizer, context: Sequence[int], generated: Sequence[int]) -> str:
    """The text ``generated`` adds after ``context`` (the prompt's ids).

    ``decode(context[-1:] + generated)`` minus ``decode(context[-1:])``: a leading space that
    decoding the generated ids alone would drop (SentencePiece) is kept, so a stop string that
    begins with a space is seen even as the first thing generated. Falls back to
    ``decode(generated)`` when the context token's text is not a prefix of the joined text
    (e.g. it ends inside a multi-byte character).
    """
    generated = [int(t) for t in generated]
    if not context:
        return tokenizer.decode(generated)
    ctx = [int(context[-1])]
    head = tokenizer.decode(ctx)
    whole = tokenizer.decode(ctx + generated)
    if whole.startswith(head):
        return whole[len(head):]
    return tokenizer.decode(generated)
