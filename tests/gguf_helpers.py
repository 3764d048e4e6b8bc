"""Tiny GGUF files for tests, written with the ``gguf`` package (no download).

Two vocabularies as llama.cpp writes them:

* ``byte_bpe_vocab()``: a byte-level BPE ("gpt2" tokenizer model, as SmolLM2 / Llama-3), trained
  with the ``tokenizers`` library on the tiny corpus, with three control tokens first.
* ``spm_vocab(dir)``: a SentencePiece BPE with byte fallback ("llama" tokenizer model, as
  LLaMA-1/2), trained with ``sentencepiece``; its pieces, scores and token types.

``write_llama_gguf`` writes a tiny random LLaMA with one of them, weights quantized per tensor,
q/k rows permuted the way llama.cpp's converter permutes them.
"""
from __future__ import annotations

import json

import numpy as np

from helpers import tiny_corpus

CONTROL, NORMAL, UNKNOWN, BYTE, USER_DEFINED = 3, 1, 2, 6, 4
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_bpe_vocab(vocab_size: int = 400) -> dict:
    """{"model": "gpt2", tokens, merges, token_type, bos/eos/unk/pad ids} (ids 0-2 control)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(tiny_corpus() + ["def f(x):\n    return x * 2  # ok", "1234567 89"],
                           trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [CONTROL if t in SPECIALS else NORMAL for t in tokens]
    return dict(model="gpt2", tokens=tokens, merges=merges, token_type=types, bos=1, eos=2,
                unk=0, pad=2)


def spm_vocab(tmp_dir: str, vocab_size: int = 400) -> dict:
    """{"model": "llama", tokens, scores, token_type, bos=1, eos=2, unk=0} from a SentencePiece
    BPE model with byte fallback (identity normalization, as LLaMA's)."""
    import sentencepiece as spm

    prefix = f"{tmp_dir}/spm_bf"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i)
                     else BYTE if sp.is_byte(i) else NORMAL)
    return dict(model="llama", tokens=tokens, scores=scores, token_type=types, bos=1, eos=2,
                unk=0, model_file=prefix + ".model")


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF rotate-half order -> interleaved)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def random_hf_weights(*, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                      ff: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random LLaMA weights under HF names, HF layout ([out, in]), float32."""
    rng = np.random.RandomState(seed)
    hd = hidden // heads

    def w(*shape, scale=0.08):
        return (rng.randn(*shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, hidden, scale=0.5),
           "model.norm.weight": 1 + w(hidden, scale=0.1)}
    if not tied:
        out["lm_head.weight"] = w(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + w(hidden, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(hidden, scale=0.1),
            p + "self_attn.q_proj.weight": w(heads * hd, hidden, scale=0.3),
            p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden, scale=0.3),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * hd),
            p + "mlp.gate_proj.weight": w(ff, hidden),
            p + "mlp.up_proj.weight": w(ff, hidden),
            p + "mlp.down_proj.weight": w(hidden, ff),
        })
    return out


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest]}"


def _random_kquant(shape, qtype, rng) -> np.ndarray:
    """Random raw bytes of a K-quant tensor (gguf-py can dequantize but not quantize them),
    with valid small float16 super-block scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.randint(0, 256, size=(rows, cols // block, size)).astype(np.uint8)
    def f16(x):
        return np.frombuffer(np.float16(x).tobytes(), np.uint8)

    scale = f16(0.0003)  # weights of about 0.1: moderate activations and logits
    if qtype == gguf.GGMLQuantizationType.Q6_K:  # ql, qh, scales (int8), then d (f16)
        raw[..., -2:] = f16(0.00004)
    elif qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K):
        raw[..., 0:2] = scale  # d, dmin (f16) first
        raw[..., 2:4] = scale
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return raw.reshape(rows, cols // block * size)


def write_llama_gguf(path: str, vocab: dict, *, hidden: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, ff: int = 128, tied: bool = False,
                     qtype: str = "F32", embed_qtype: str | None = None, seed: int = 0,
                     context_length: int = 256, rope_theta: float = 10000.0,
                     add_bos: bool | None = None, add_eos: bool | None = None,
                     chat_template: str | None = None, name: str = "tiny",
                     architecture: str = "llama", extra=None) -> dict[str, np.ndarray]:
    """Write a tiny random LLaMA GGUF; returns its HF-layout float32 weights before quantizing.

    ``qtype``: the GGML type of every 2-D tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, or a
    K-quant Q4_K / Q5_K / Q6_K, which needs ``hidden`` and ``ff`` multiples of 256 and is filled
    with random raw blocks); norms stay F32 as llama.cpp keeps them. ``embed_qtype``: another type
    for token_embd (SmolLM2's file: Q8_0 embeddings, Q4_1 elsewhere). ``extra(writer)`` adds keys.
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    n_vocab = len(vocab["tokens"])
    weights = random_hf_weights(vocab=n_vocab, hidden=hidden, layers=layers, heads=heads,
                                kv_heads=kv_heads, ff=ff, tied=tied, seed=seed)
    rng = np.random.RandomState(seed + 1)
    w = gguf.GGUFWriter(path, architecture)
    w.add_name(name)
    w.add_uint32(f"{architecture}.block_count", layers)
    w.add_uint32(f"{architecture}.context_length", context_length)
    w.add_uint32(f"{architecture}.embedding_length", hidden)
    w.add_uint32(f"{architecture}.feed_forward_length", ff)
    w.add_uint32(f"{architecture}.attention.head_count", heads)
    w.add_uint32(f"{architecture}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{architecture}.rope.freq_base", rope_theta)
    w.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{architecture}.rope.dimension_count", hidden // heads)
    w.add_uint32(f"{architecture}.vocab_size", n_vocab)
    w.add_tokenizer_model(vocab["model"])
    if vocab["model"] == "gpt2":
        w.add_tokenizer_pre(vocab.get("pre", "default"))
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_type"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_unk_token_id(vocab["unk"])
    if vocab.get("pad") is not None:
        w.add_pad_token_id(vocab["pad"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if extra is not None:
        extra(w)
    for hf_name, arr in weights.items():
        data = arr
        if hf_name.endswith("q_proj.weight"):
            data = llama_permute(arr, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_permute(arr, kv_heads)
        t = embed_qtype if (embed_qtype and hf_name == "model.embed_tokens.weight") else qtype
        if data.ndim == 1 or t == "F32":
            w.add_tensor(gguf_name(hf_name), np.ascontiguousarray(data, np.float32))
            continue
        q = Q[t]
        if t == "F16":
            w.add_tensor(gguf_name(hf_name), data.astype(np.float16))
        elif t.endswith("_K"):
            raw = _random_kquant(data.shape, q, rng)
            w.add_tensor(gguf_name(hf_name), raw, raw_dtype=q)
        else:
            raw = gguf.quants.quantize(data, q)
            w.add_tensor(gguf_name(hf_name), raw, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights
