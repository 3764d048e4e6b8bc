"""Tokenizers behind one interface: SentencePiece ``.model`` (LLaMA-1/2), HF ``tokenizer.json``
(LLaMA-3 and other BPE tokenizers) and the vocabulary inside a llama.cpp ``.gguf`` file.

    tok = load_tokenizer(path)        # a .model, a tokenizer.json, a .gguf, or a folder
    ids = tok.encode("Hello")         # BOS as the tokenizer itself decides (tok.add_bos)
    ids = tok.encode("Hello", bos=False, eos=True)
    text = tok.decode(ids)
    tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos, tok.add_eos
    save_tokenizer(tok, "out/hf", chat_template=None)   # files transformers loads as well

BOS is the tokenizer's decision, never a blanket default (SmolLM2 and many BPE models add
none): ``add_bos`` is True for a SentencePiece model; for a ``tokenizer.json`` it is the
``add_bos_token`` of the ``tokenizer_config.json`` next to it when that says, else whether the
tokenizer.json post-processor inserts the BOS token; for a GGUF it is
``tokenizer.ggml.add_bos_token`` (absent: True for a "llama" vocabulary, False for "gpt2").
``add_eos`` likewise (default False). ``bos_id`` may be an int even when ``add_bos`` is False
(the vocabulary names a BOS token that the tokenizer does not prepend), or None when there is no
BOS token at all.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json, write_json_atomic


class Tokenizer:
    """Common interface. ``decode`` drops the bos/eos/pad tokens."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    add_bos: bool = True
    add_eos: bool = False
    chat_template: str | None = None

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = False) -> list[int]:
        """Token ids of ``text``. ``bos``: None = the tokenizer's rule (``self.add_bos``),
        True/False force it; ``eos`` likewise (None = ``self.add_eos``; default False)."""
        ids = self._encode(text)
        if self.add_bos if bos is None else bos:
            ids = [self._bos()] + ids
        if self.add_eos if eos is None else eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool | None = None,
                     eos: bool | None = False) -> list[list[int]]:
        """:meth:`encode` of each text, same ``bos`` / ``eos`` rule; one id list per text."""
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def _bos(self) -> int:
        if self.bos_id is None:
            raise UserError(f"{self.origin}: this tokenizer has no BOS token; encode with "
                            "bos=False (or bos=None, the tokenizer's own rule)")
        return self.bos_id

    @property
    def origin(self) -> str:
        """Where the tokenizer came from (its file path, else the class name), for errors."""
        return getattr(self, "path", type(self).__name__)

    def id_to_token(self, i: int) -> str | None:  # pragma: no cover - abstract
        """The vocabulary string of token id ``i`` (e.g. ``"<s>"``, ``"▁the"``), or None when
        there is none. Subclasses implement it."""
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        """The text of token ids ``ids``, with the bos/eos/pad ids dropped first. Subclasses
        implement it."""
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, add_bos={self.add_bos})")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-1/2 style SentencePiece model; prepends BOS (``add_bos`` True) when it has one."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self.sp.vocab_size())
        bos = int(self.sp.bos_id())
        self.bos_id = bos if bos >= 0 else None
        self.add_bos = self.bos_id is not None
        self.add_eos = False
        self.eos_id = int(self.sp.eos_id())
        self.unk_id = int(self.sp.unk_id())
        self.real_pad_id = int(self.sp.pad_id())
        # LLaMA's model has no pad piece (-1): use eos for padding, as HF does for LLaMA.
        self.pad_id = self.real_pad_id if self.real_pad_id >= 0 else self.eos_id
        self._special = {i for i in (bos, self.eos_id, self.real_pad_id) if i >= 0}

    def _encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """SentencePiece's decode of ``ids`` without the bos/eos/pad ids."""
        return self.sp.decode([int(i) for i in ids if int(i) not in self._special])

    def id_to_piece(self, i: int) -> str:
        """The SentencePiece piece of id ``i`` (``sp.id_to_piece``)."""
        return self.sp.id_to_piece(int(i))

    def id_to_token(self, i):
        """The piece of id ``i``; None for None or a negative id (e.g. an absent BOS's -1)."""
        return None if i is None or i < 0 else self.sp.id_to_piece(int(i))


class TokenizersTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (BPE and the like) with the BOS/EOS rule given explicitly.

    The wrapped tokenizer's own post-processor is never applied (``encode`` adds BOS/EOS by the
    rule), so a tokenizer built in memory and one read from a file behave the same.
    """

    def __init__(self, tk, *, origin: str, bos_id: int | None, eos_id: int,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool,
                 add_eos: bool = False, chat_template: str | None = None):
        self.tk = tk
        self.path = origin
        self.vocab_size = int(tk.get_vocab_size(with_added_tokens=True))
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.unk_id = unk_id
        self.real_pad_id = pad_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.add_eos = bool(add_eos)
        self.chat_template = chat_template
        self._special = {i for i in (bos_id, eos_id, self.pad_id) if i is not None}

    def _encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The wrapped tokenizer's decode of ``ids`` without the bos/eos/pad ids (other special
        tokens are kept: ``skip_special_tokens=False``)."""
        return self.tk.decode([int(i) for i in ids if int(i) not in self._special],
                              skip_special_tokens=False)

    def id_to_token(self, i):
        """The vocabulary string of id ``i``; None for None or an id outside the vocabulary."""
        return None if i is None else self.tk.id_to_token(int(i))


def _template_specials(tk) -> tuple[list[int], list[int]]:
    """Ids the tokenizer's post-processor puts before / after one sequence."""
    plain = tk.encode("a", add_special_tokens=False).ids
    full = tk.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    return [], []


class HFJsonTokenizer(TokenizersTokenizer):
    """A ``tokenizer.json`` (Llama-3: <|begin_of_text|>, <|end_of_text|> / <|eot_id|>).

    bos/eos/pad token strings come from the arguments (``tokenizer_config.json``), else from the
    post-processor (the token it prepends is the BOS) or the usual names. ``add_bos`` /
    ``add_eos``: None = what the post-processor does.
    """

    BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
    EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

    def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 add_bos: bool | None = None, add_eos: bool | None = None,
                 chat_template: str | None = None):
        from tokenizers import Tokenizer as _Tok

        self.path = path
        tk = _Tok.from_file(path)
        before, after = _template_specials(tk)
        if bos_token:
            bos = self._find(tk, bos_token, (), "bos")
        elif before:
            bos = before[0]
        else:
            bos = self._find(tk, None, self.BOS_NAMES, "bos", required=bool(add_bos))
        if eos_token or not after:
            eos = self._find(tk, eos_token, self.EOS_NAMES, "eos")
        else:
            eos = after[-1]
        pad = self._find(tk, pad_token, (), "pad") if pad_token else None
        unk = tk.token_to_id(unk_token) if unk_token else None
        if add_bos is None:
            add_bos = bos is not None and bos in before
        if add_eos is None:
            add_eos = eos in after
        super().__init__(tk, origin=path, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk,
                         add_bos=add_bos, add_eos=add_eos, chat_template=chat_template)

    def _find(self, tk, explicit, names, what, required=True) -> int | None:
        for name in ([explicit] if explicit else list(names)):
            i = tk.token_to_id(name)
            if i is not None:
                return int(i)
        if not required:
            return None
        raise UserError(f"{self.path}: no {what} token found (tried "
                        f"{[explicit] if explicit else list(names)}); pass it via "
                        "tokenizer_config.json")


def _tokenizer_config(folder: str) -> dict:
    """HFJsonTokenizer arguments from a tokenizer_config.json next to tokenizer.json, if any."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    for key, arg in (("add_bos_token", "add_bos"), ("add_eos_token", "add_eos")):
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            raise UserError(f"{path}: {key}={v!r} must be true or false")
        if v is not None:
            out[arg] = v
    if isinstance(cfg.get("chat_template"), str):
        out["chat_template"] = cfg["chat_template"]
    return out


# ----------------------------------------------------------------------------- GGUF vocabularies
# Pre-tokenizer split patterns by ``tokenizer.ggml.pre``, as transformers' GGUF loader uses them
# (others: the byte-level default, GPT-2's pattern). The patterns are llama.cpp's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {
    **{k: _LLAMA3_SPLIT for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                  "pixtral", "midm-2.0", "lfm2", "jina-v5-nano", "dbrx",
                                  "smaug-bpe")},
    **{k: _QWEN2_SPLIT for k in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez")},
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **{k: _GPT4O_SPLIT for k in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
}
GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 3, 4


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE tokens)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary with scores (SentencePiece BPE files list none): every
    split of a token into two tokens, best score first (ties: shorter left, then right part),
    the same order transformers' ``generate_merges`` gives."""
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gguf_merges(meta: dict, path: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list):
        return [tuple(m.split(" ")) for m in merges]
    scores = meta.get("tokenizer.ggml.scores")
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise UserError(f"{path}: the GGUF vocabulary has neither merges nor one score per token")
    return merges_from_scores(vocab, dict(zip(tokens, scores)))


def gguf_tokenizer(meta: dict, path: str) -> TokenizersTokenizer:
    """The tokenizer a GGUF file's ``tokenizer.ggml.*`` metadata describes, built with the
    ``tokenizers`` library the way transformers builds it from the same file: "gpt2" (byte-level
    BPE, split pattern by ``tokenizer.ggml.pre``) or "llama" (SentencePiece-style BPE with byte
    fallback; merges from the file or derived from the scores); control tokens (type 3) and the
    named bos/eos/unk/pad tokens become special added tokens, user-defined ones (type 4) added
    tokens. One difference: ``tokenizer.ggml.add_space_prefix = false`` is honoured (as llama.cpp
    does) for a "llama" vocabulary.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    arch = meta.get("general.architecture")
    if not isinstance(tokens, list) or not tokens:
        raise UserError(f"{path}: the GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    if kind not in ("gpt2", "llama") or (kind == "llama" and (
            str(arch).startswith("gemma") or arch == "phi3")):
        raise UserError(f"{path}: GGUF tokenizer {kind!r} (architecture {arch!r}) is not "
                        "supported; supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece "
                        "BPE)")
    types = meta.get("tokenizer.ggml.token_type") or []
    spelled = None
    if kind == "gpt2":
        table = _byte_alphabet()
        spelled = set(table.values())
        vocab = {t if set(t) <= spelled else "".join(table[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        tk = _Tok(models.BPE(vocab=vocab, merges=_gguf_merges(meta, path, vocab), dropout=None,
                             continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False))
        split = GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        tk = _Tok(models.BPE(vocab=vocab, merges=_gguf_merges(meta, path, vocab), dropout=None,
                             fuse_unk=True, byte_fallback=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
        tk.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tk.decoder = decoders.Sequence(steps)

    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types)
               if ty == GGUF_TOKEN_CONTROL and (spelled is None or set(t) <= spelled)]
    if control:
        tk.add_special_tokens(control)
    vocab_now = tk.get_vocab()
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_USER_DEFINED and t in vocab_now]
    if user:
        tk.add_tokens(user)

    def token_id(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
            raise UserError(f"{path}: tokenizer.ggml.{key}={v!r} is not a token id (0.."
                            f"{len(tokens) - 1})")
        return v

    bos, eos, unk, pad = (token_id(k) for k in ("bos_token_id", "eos_token_id",
                                                "unknown_token_id", "padding_token_id"))
    if eos is None:
        raise UserError(f"{path}: the GGUF metadata has no tokenizer.ggml.eos_token_id")
    added = {t.content for t in tk.get_added_tokens_decoder().values()}
    named = [tokens[i] for i in (bos, eos, unk, pad) if i is not None]
    missing = [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(named)
               if t not in added and t in vocab_now]
    if missing:
        tk.add_special_tokens(missing)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = kind == "llama"
    template = meta.get("tokenizer.chat_template")
    return TokenizersTokenizer(
        tk, origin=path, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, add_bos=bool(add_bos),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=template if isinstance(template, str) else None)


# ----------------------------------------------------------------------------- loading
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in a folder, in order of preference


def tokenizer_file_in(folder: str) -> str | None:
    """The tokenizer file :func:`load_tokenizer` takes from ``folder``, or None. A GGUF file is
    its own tokenizer file."""
    if os.path.isfile(folder) and folder.lower().endswith(".gguf"):
        return folder
    for name in TOKENIZER_FILES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _is_gguf(path: str) -> bool:
    """Named ``*.gguf`` or starting with the GGUF magic (without importing the checkpoint code)."""
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece ``.model`` file, a ``tokenizer.json``, a ``.gguf`` file (its vocabulary),
    or a folder holding ``tokenizer.model`` / ``tokenizer.json`` (the former is preferred)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = tokenizer_file_in(path)
        if candidate is not None:
            return load_tokenizer(candidate)
        raise UserError(f"{path}: no tokenizer.model or tokenizer.json in this folder")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found: {path}")
    if _is_gguf(path):
        from dromedary_jax.checkpoint.gguf import read_gguf

        return gguf_tokenizer(read_gguf(path).metadata, path)
    if path.endswith(".json"):
        try:
            return HFJsonTokenizer(path, **_tokenizer_config(os.path.dirname(path)))
        except UserError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions on bad files
            msg = " ".join(str(e).split())
            raise UserError(f"{path}: not a valid tokenizer.json ({msg})") from None
    try:
        return SentencePieceTokenizer(path)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise UserError(f"{path}: not a valid SentencePiece model ({msg})") from None


# ----------------------------------------------------------------------------- saving
def _post_processor(bos: str | None, bos_id, eos: str | None, eos_id, add_bos, add_eos):
    """The TemplateProcessing transformers builds for add_bos_token / add_eos_token."""
    from tokenizers import processors

    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = (f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1"
            f"{(' ' + eos + ':1') if add_eos else ''}")
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_at_seam(tokenizer: "Tokenizer", first: str, second: str, *, bos: bool | None = None
                  ) -> tuple[list[int], list[int]]:
    """``(ids of first, ids of second)`` whose concatenation is exactly
    ``tokenizer.encode(first + second, bos=bos)``.

    Two texts encoded apart and concatenated are not the joined text encoded (a SentencePiece
    tokenizer puts a lone "▁" before a second text that starts with a space). The split point is
    the longest common prefix of ``encode(first)`` and ``encode(first + second)``: right after
    ``first``'s own ids unless a token merges across the seam (then it goes to the second part).
    ``bos``: None = the tokenizer's rule (``add_bos``).
    """
    whole = list(tokenizer.encode(first + second, bos=bos))
    n = common_prefix_length(tokenizer.encode(first, bos=bos), whole)
    return whole[:n], whole[n:]


def save_tokenizer(tokenizer: Tokenizer, folder: str, *, chat_template: str | None = None
                   ) -> list[str]:
    """Write ``tokenizer`` into ``folder`` (created if needed); returns the files written.

    SentencePiece: the ``.model`` copied to ``tokenizer.model``; others: ``tokenizer.json``
    (with a post-processor that adds BOS/EOS by the tokenizer's rule). Both get a
    ``tokenizer_config.json`` (tokenizer_class, add_bos_token, add_eos_token, the bos/eos/unk/
    pad token strings, ``chat_template`` -- the argument, else the tokenizer's own, e.g. from a
    GGUF) and ``special_tokens_map.json``, so that ``load_tokenizer(folder)`` gives the same ids
    and ``add_bos``, and transformers' ``AutoTokenizer.from_pretrained(folder)`` the same ids
    (BOS included by the same rule). A tokenizer file of the other kind already in ``folder``
    is removed (it would take precedence or mislead).
    """
    if not isinstance(tokenizer, (SentencePieceTokenizer, TokenizersTokenizer)):
        raise UserError(f"save_tokenizer: expected a tokenizer from dj.load_tokenizer, got "
                        f"{type(tokenizer).__name__}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise UserError(f"save_tokenizer chat_template must be a string, got "
                        f"{type(chat_template).__name__}")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"save_tokenizer: {folder} exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    t = tokenizer
    names = {k: t.id_to_token(i) if i is not None and i >= 0 else None for k, i in (
        ("bos_token", t.bos_id), ("eos_token", t.eos_id), ("unk_token", t.unk_id),
        ("pad_token", t.real_pad_id))}
    written = []
    if isinstance(t, SentencePieceTokenizer):
        dst = os.path.join(folder, "tokenizer.model")
        if not (os.path.exists(dst) and os.path.samefile(t.path, dst)):
            shutil.copyfile(t.path, dst)
        stale, cls = "tokenizer.json", "LlamaTokenizer"
        # legacy=True: transformers then puts SentencePiece's "▁" prefix on text after a special
        # token too (prepend_scheme "always"), as SentencePiece does after the BOS id: a chat
        # template that writes bos_token gives the ids the model was trained on.
        extra = {"legacy": True}
    else:
        from tokenizers import Tokenizer as _Tok

        tk = _Tok.from_str(t.tk.to_str())
        tk.post_processor = _post_processor(names["bos_token"], t.bos_id, names["eos_token"],
                                            t.eos_id, t.add_bos, t.add_eos)
        dst = os.path.join(folder, "tokenizer.json")
        tk.save(dst)
        stale, cls = "tokenizer.model", "PreTrainedTokenizerFast"
        extra = {}
    written.append(dst)
    if os.path.isfile(os.path.join(folder, stale)):
        os.remove(os.path.join(folder, stale))
    template = chat_template if chat_template is not None else t.chat_template
    config = {"tokenizer_class": cls, "add_bos_token": bool(t.add_bos),
              "add_eos_token": bool(t.add_eos), **names, "clean_up_tokenization_spaces": False,
              **extra}
    if template is not None:
        config["chat_template"] = template
    for name, obj in (("tokenizer_config.json", config),
                      ("special_tokens_map.json", {k: v for k, v in names.items() if v})):
        p = os.path.join(folder, name)
        write_json_atomic(p, obj)
        written.append(p)
    return written


__all__ = ["Tokenizer", "SentencePieceTokenizer", "TokenizersTokenizer", "HFJsonTokenizer",
           "load_tokenizer", "save_tokenizer", "tokenizer_file_in", "split_at_seam",
           "common_prefix_length", "gguf_tokenizer",
           "merges_from_scores", "TOKENIZER_FILES"]
