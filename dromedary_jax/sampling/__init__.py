"""Batched sampling: jit'ed prefill + ``lax.while_loop`` decode over an explicit KV cache.

    dj.generate(model, prompt_ids, max_new_tokens=64)                    # -> new token ids
    dj.generate_text(model, tok, prompts, max_new_tokens=256, temperature=0.5, top_p=0.95,
                     stop=("### User",), logit_bias={sorry_id: -100.0},
                     shared_prefix=principle_prompt)                     # -> texts
    s = SamplingSettings(max_new_tokens=256, temperature=0.5, stop=("### User",))
    dj.generate_text(model, tok, prompts, settings=s)                    # the same, one object

Lower level: ``prefill_prefix(model, ids)`` prefills a shared prefix once (``PrefixState``: its
KV cache and last-token logits); ``PrefixCache`` is the LRU ``generate`` keeps them in.

Names are imported lazily, so ``dromedary_jax.sampling.settings`` (no jax) stays cheap to import.
"""
from dromedary_jax.lazy_names import lazy_names

_API = {
    "generate": "dromedary_jax.sampling.api",
    "generate_text": "dromedary_jax.sampling.api",
    "make_batch": "dromedary_jax.sampling.host",
    "SamplingSettings": "dromedary_jax.sampling.settings",
    "PrefixCache": "dromedary_jax.sampling.prefix_cache",
    "PrefixState": "dromedary_jax.sampling.prefix_cache",
    "default_prefix_cache": "dromedary_jax.sampling.prefix_cache",
    "prefill_prefix": "dromedary_jax.sampling.prefix_cache",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _API)
