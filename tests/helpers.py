"""Shared helpers for tests: tiny random HF models and their conversion to ours."""
from __future__ import annotations

import numpy as np

TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def tiny_hf_model(seed: int = 0, **overrides):
    """A tiny random transformers.LlamaForCausalLM (float32, eval mode)."""
    import torch
    import transformers

    cfg = dict(TINY_HF)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def ours_from_hf(hf_model, mesh=None, **config_overrides):
    """The same weights as a dromedary_jax Llama (in memory, no files)."""
    from dromedary_jax.checkpoint.hf_mapping import params_from_hf_tensors
    from dromedary_jax.model import Llama, ModelConfig
    from dromedary_jax.model.llama import place_params

    cfg = ModelConfig.from_hf_config(hf_model.config.to_dict(), **config_overrides)
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    params = params_from_hf_tensors(sd.__getitem__, cfg)
    return Llama(cfg, params=place_params(params, cfg, mesh), mesh=mesh)


def random_ids(batch: int, length: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, size=(batch, length)).astype(np.int32)


_WORDS = ("the quick brown fox jumps over a lazy dog while assistant answers user questions "
          "about science history math code principles ethics helpful honest harmless "
          "internal thoughts sorry cannot know future weather today please explain why how "
          "what when where who which number step first second third answer question").split()


def tiny_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choice(_WORDS, size=rng.randint(4, 16))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ":"]))
    lines += ["### User: hi", "### Assistant: hello", "(internal thoughts): ok", "0123456789",
              "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz ,;'\"()[]-#/\n"]
    return lines


def train_tiny_sentencepiece(out_prefix: str, vocab_size: int = 256, llama_style: bool = False
                             ) -> str:
    """Train a tiny SentencePiece BPE model (no download); returns the .model path.

    ``llama_style``: normalised as LLaMA-1/2's tokenizer.model is (identity normalisation, no
    removal of extra whitespace, a dummy "▁" prefix, byte fallback, split digits), so encoding
    " x" at the start of a text gives a lone "▁" piece as LLaMA's does."""
    import sentencepiece as spm

    extra = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                 add_dummy_prefix=True, byte_fallback=True, split_digits=True,
                 allow_whitespace_only_pieces=True) if llama_style else dict(byte_fallback=False)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_prefix=out_prefix, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, hard_vocab_limit=False, **extra)
    return out_prefix + ".model"
