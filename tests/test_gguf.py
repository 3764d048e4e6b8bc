"""GGUF import: tiny random LLaMA GGUF files (written with the gguf package, q/k rows permuted
as llama.cpp's converter does) loaded by dj.load_model vs transformers loading the same file."""
import json
import os

import numpy as np
import pytest

from dromedary_jax.errors import UserError
from gguf_helpers import byte_bpe_vocab, spm_vocab, write_llama_gguf

TEXTS = ["Hello world", "  two  spaces\n\nand\ttabs", "def f(x):\n    return x * 2",
         "emoji 😀 CJK 漢字 العربية", "1234567 89", "<|im_start|>user\nhi<|im_end|>", ""]


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return {"bpe": byte_bpe_vocab(), "spm": spm_vocab(str(d))}


def _ids(vocab_size, seed=0):
    return np.random.RandomState(seed).randint(3, vocab_size, size=(2, 11)).astype(np.int32)


def _hf_logits(folder, name, ids):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(ids, dtype=torch.long)).logits.numpy()


CASES = {
    "q8_0-gqa": dict(vocab="bpe", qtype="Q8_0"),
    "f16-tied": dict(vocab="spm", qtype="F16", tied=True),
    "q4_0-mha": dict(vocab="bpe", qtype="Q4_0", kv_heads=4, tied=True),
    "q4_1-q8emb": dict(vocab="bpe", qtype="Q4_1", embed_qtype="Q8_0", heads=8, kv_heads=2),
    "bf16": dict(vocab="spm", qtype="BF16", kv_heads=1),
    "q4_k": dict(vocab="bpe", qtype="Q4_K", hidden=256, ff=256),
    "q6_k-tied": dict(vocab="spm", qtype="Q6_K", hidden=256, ff=512, heads=8, tied=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, vocabs, tmp_path):
    import dromedary_jax as dj
    from dromedary_jax.checkpoint import detect_format

    kw = dict(CASES[case])
    vocab = vocabs[kw.pop("vocab")]
    path = str(tmp_path / f"{case}.gguf")
    write_llama_gguf(path, vocab, **kw)
    assert detect_format(path) == "gguf"
    model = dj.load_model(path)
    assert model.config.tie_embeddings == kw.get("tied", False)
    assert model.config.num_kv_heads == kw.get("kv_heads", 2)
    ids = _ids(model.config.vocab_size)
    ours = dj.logits(model, ids)
    theirs = _hf_logits(str(tmp_path), os.path.basename(path), ids)
    assert np.abs(theirs).max() > 0.5  # not a degenerate model
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_unpermute_is_what_makes_them_agree(vocabs, tmp_path, monkeypatch):
    """Without undoing llama.cpp's q/k permutation the logits differ: the test above would fail."""
    import dromedary_jax as dj
    from dromedary_jax.checkpoint import gguf as gguf_io

    path = str(tmp_path / "m.gguf")
    write_llama_gguf(path, vocabs["bpe"], qtype="Q8_0")
    ids = _ids(400)
    theirs = _hf_logits(str(tmp_path), "m.gguf", ids)
    monkeypatch.setattr(gguf_io.GGUFSource, "_rows_permutation", lambda self, key, rows: None)
    wrong = dj.logits(dj.load_model(path), ids)
    assert np.abs(wrong - theirs).max() > 1e-2


def test_config_from_metadata(vocabs, tmp_path):
    from dromedary_jax.checkpoint.gguf import gguf_config, read_gguf

    path = str(tmp_path / "c.gguf")
    write_llama_gguf(path, vocabs["bpe"], hidden=64, layers=3, heads=8, kv_heads=2, ff=96,
                     context_length=384, rope_theta=123456.0, tied=True)
    c = gguf_config(read_gguf(path), dtype="bfloat16")
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
            c.intermediate_size, c.max_seq_len) == (400, 64, 3, 8, 2, 8, 96, 384)
    assert c.rope_theta == 123456.0 and c.rope_scaling is None and c.tie_embeddings
    assert abs(c.rms_norm_eps - 1e-5) < 1e-10 and c.dtype == "bfloat16"
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)


def _llama3_freqs(theta, hd, factor, low=1.0, high=4.0, orig=8192):
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    out = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.asarray(out, np.float32)


def test_rope_scaling_from_file(vocabs, tmp_path):
    """Llama-3.1 files carry rope_freqs.weight (llama.cpp's per-frequency divisors)."""
    from dromedary_jax.checkpoint.gguf import gguf_config, read_gguf
    from dromedary_jax.model.config import RopeScaling
    from dromedary_jax.model.rope import inverse_frequencies

    theta, hd = 500000.0, 16
    freqs = _llama3_freqs(theta, hd, 8.0)
    assert 1.0 < freqs.max() and freqs.min() == 1.0  # the three bands are all present
    path = str(tmp_path / "l3.gguf")
    write_llama_gguf(path, vocabs["bpe"], rope_theta=theta,
                     extra=lambda w: w.add_tensor("rope_freqs.weight", freqs))
    c = gguf_config(read_gguf(path))
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    base = inverse_frequencies(c.replace(rope_scaling=None))
    np.testing.assert_allclose(inverse_frequencies(c), base / freqs, rtol=1e-5)

    path = str(tmp_path / "odd.gguf")
    write_llama_gguf(path, vocabs["bpe"], rope_theta=theta,
                     extra=lambda w: w.add_tensor("rope_freqs.weight", freqs ** 0.5))
    with pytest.raises(UserError, match="rope_freqs.weight is not Llama-3 frequency scaling"):
        gguf_config(read_gguf(path))

    def linear(w):
        w.add_string("llama.rope.scaling.type", "linear")
        w.add_float32("llama.rope.scaling.factor", 4.0)

    path = str(tmp_path / "lin.gguf")
    write_llama_gguf(path, vocabs["bpe"], extra=linear)
    assert gguf_config(read_gguf(path)).rope_scaling == RopeScaling("linear", 4.0)

    path = str(tmp_path / "yarn.gguf")
    write_llama_gguf(path, vocabs["bpe"], extra=lambda w: w.add_string(
        "llama.rope.scaling.type", "yarn"))
    with pytest.raises(UserError, match="RoPE scaling 'yarn' is not supported"):
        gguf_config(read_gguf(path))


def test_sharded_load_dequantizes_each_tensor_once(vocabs, tmp_path, monkeypatch):
    import gguf

    import dromedary_jax as dj
    from dromedary_jax.checkpoint.gguf import load_gguf
    from dromedary_jax.model import Llama

    path = str(tmp_path / "s.gguf")
    weights = write_llama_gguf(path, vocabs["bpe"], qtype="Q8_0")
    calls = []
    real = gguf.dequantize
    monkeypatch.setattr(gguf, "dequantize", lambda data, qtype: calls.append(qtype) or
                        real(data, qtype))
    mesh = dj.make_mesh({"fsdp": 4, "tensor": 2})
    config, params = load_gguf(path, mesh)
    n_quantized = sum(w.ndim == 2 for w in weights.values())
    assert len(calls) == n_quantized  # 8 devices, one dequantization per tensor
    assert len(params["wq"].sharding.device_set) == 8
    ids = _ids(400)
    sharded = dj.logits(Llama(config, params=params, mesh=mesh), ids)
    single = dj.logits(dj.load_model(path), ids)
    np.testing.assert_allclose(sharded, single, atol=1e-5)

    calls.clear()  # no cache: each device block dequantizes just its rows (same result)
    config, params = load_gguf(path, mesh, cache_bytes=0)
    assert len(calls) > n_quantized
    np.testing.assert_allclose(dj.logits(Llama(config, params=params, mesh=mesh), ids), single,
                               atol=1e-5)


def test_bad_files_are_one_line_errors(vocabs, tmp_path):
    import dromedary_jax as dj
    from dromedary_jax.checkpoint import detect_format

    def one_line(fn, pattern):
        with pytest.raises(UserError, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value)

    one_line(lambda: dj.load_model(str(tmp_path / "missing.gguf")),
             r"missing\.gguf does not exist.*or a \.gguf file")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    one_line(lambda: dj.load_model(str(tmp_path / "junk.gguf")), r"junk\.gguf: not a GGUF file")
    good = str(tmp_path / "good.gguf")
    write_llama_gguf(good, vocabs["bpe"], qtype="Q8_0")
    data = open(good, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    one_line(lambda: dj.load_model(str(tmp_path / "cut.gguf")),
             r"cut\.gguf: not a readable GGUF file .*truncated or corrupt")
    other = str(tmp_path / "qwen.gguf")
    write_llama_gguf(other, vocabs["bpe"], architecture="qwen2")
    one_line(lambda: dj.load_model(other), r"GGUF architecture 'qwen2' is not supported")
    biased = str(tmp_path / "bias.gguf")
    write_llama_gguf(biased, vocabs["bpe"], extra=lambda w: w.add_tensor(
        "blk.0.attn_q.bias", np.zeros(64, np.float32)))
    one_line(lambda: dj.load_model(biased),
             r"tensor\(s\) blk\.0\.attn_q\.bias are not part of the LLaMA architecture")
    moe = str(tmp_path / "moe.gguf")
    write_llama_gguf(moe, vocabs["bpe"], extra=lambda w: w.add_uint32("llama.expert_count", 8))
    one_line(lambda: dj.load_model(moe), r"mixture-of-experts .*expert_count=8")
    (tmp_path / "dir").mkdir()
    os.symlink(good, tmp_path / "dir" / "m.gguf")
    one_line(lambda: detect_format(str(tmp_path / "dir")), r"pass the file itself")
    # a GGUF without the .gguf suffix is still recognised by its magic bytes
    os.symlink(good, tmp_path / "model.bin")
    assert detect_format(str(tmp_path / "model.bin")) == "gguf"


def test_convert_cli_writes_hf_folder_with_tokenizer(vocabs, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dromedary_jax as dj
    from dromedary_jax.convert import main

    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    path = str(tmp_path / "m.gguf")
    write_llama_gguf(path, vocabs["bpe"], qtype="Q4_1", chat_template=template)
    dst = str(tmp_path / "hf")
    assert main(["--src", path, "--dst", dst, "--to", "hf"]) == 0
    assert "and the GGUF's tokenizer" in capsys.readouterr().out
    assert sorted(os.listdir(dst)) == [
        "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(dst, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == template
    ours = dj.load_model(path)
    ids = _ids(400)
    hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(dj.logits(ours, ids), hf(torch.tensor(ids).long()).logits,
                                   atol=1e-4, rtol=0)
    tok, hf_tok = dj.load_tokenizer(path), AutoTokenizer.from_pretrained(dst)
    assert hf_tok.chat_template == template
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text

    ck = str(tmp_path / "ck")
    assert main(["--src", path, "--dst", ck, "--to", "orbax"]) == 0
    np.testing.assert_allclose(dj.logits(dj.load_model(ck), ids), dj.logits(ours, ids), atol=1e-6)
