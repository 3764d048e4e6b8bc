"""Tokenizers behind one interface: SentencePiece ``.model`` (LLaMA-1/2) and HF ``tokenizer.json``
(LLaMA-3 and other BPE tokenizers).

    tok = load_tokenizer(path)        # a .model file, a tokenizer.json, or a folder holding one
    ids = tok.encode("Hello", bos=True, eos=False)
    text = tok.decode(ids)
    tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size
"""
from __future__ import annotations

import os
from typing import Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json


class Tokenizer:
    """Common interface. ``decode`` drops special tokens (bos/eos/pad)."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False):
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def _encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-1/2 style SentencePiece model."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        pad = int(self.sp.pad_id())
        # LLaMA's model has no pad piece (-1): use eos for padding, as HF does for LLaMA.
        self.pad_id = pad if pad >= 0 else self.eos_id
        self._special = {i for i in (self.bos_id, self.eos_id, pad) if i >= 0}

    def _encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in self._special])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class HFJsonTokenizer(Tokenizer):
    """A ``tokenizer.json`` (Llama-3: <|begin_of_text|>, <|end_of_text|> / <|eot_id|>)."""

    BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
    EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

    def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        from tokenizers import Tokenizer as _Tok

        self.path = path
        self.tk = _Tok.from_file(path)
        self.vocab_size = int(self.tk.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._find(bos_token, self.BOS_NAMES, "bos")
        self.eos_id = self._find(eos_token, self.EOS_NAMES, "eos")
        self.pad_id = self._find(pad_token, (), "pad") if pad_token else self.eos_id
        self._special = {self.bos_id, self.eos_id, self.pad_id}

    def _find(self, explicit, names, what) -> int:
        for name in ([explicit] if explicit else list(names)):
            i = self.tk.token_to_id(name)
            if i is not None:
                return int(i)
        raise UserError(f"{self.path}: no {what} token found (tried {[explicit] if explicit else list(names)}); "
                        f"pass it via tokenizer_config.json")

    def _encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids if int(i) not in self._special],
                              skip_special_tokens=False)


def _special_from_config(folder: str) -> dict:
    """bos/eos/pad token strings from a tokenizer_config.json next to tokenizer.json, if any."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    cfg = read_json(path)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in a folder, in order of preference


def tokenizer_file_in(folder: str) -> str | None:
    """The tokenizer file :func:`load_tokenizer` takes from ``folder``, or None."""
    for name in TOKENIZER_FILES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece ``.model`` file, a ``tokenizer.json``, or a folder holding one of them
    (``tokenizer.model`` is preferred over ``tokenizer.json`` when both are present)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = tokenizer_file_in(path)
        if candidate is not None:
            return load_tokenizer(candidate)
        raise UserError(f"{path}: no tokenizer.model or tokenizer.json in this folder")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found: {path}")
    if path.endswith(".json"):
        try:
            return HFJsonTokenizer(path, **_special_from_config(os.path.dirname(path)))
        except UserError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions on bad files
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
    try:
        return SentencePieceTokenizer(path)
    except Exception as e:
        raise UserError(f"{path}: not a valid SentencePiece model ({e})") from None
