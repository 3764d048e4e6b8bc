"""Tokenizers: GGUF vocabularies (checked against transformers' GGUF tokenizer), the tokenizer's
own BOS rule, and save_tokenizer (reloaded by us and by transformers)."""
import json
import os

import pytest

from dromedary_jax.errors import UserError
from dromedary_jax.tokenizer import load_tokenizer, save_tokenizer
from gguf_helpers import byte_bpe_vocab, spm_vocab, write_llama_gguf

TEXTS = [
    "Hello world", "The quick brown fox.", "  two leading spaces and    four", "tabs\tand\n\nnew",
    "trailing   ", " ", "", "def f(x):\n    return x * 2  # ok", "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "CJK 漢字と仮名 中文 한국어", "Arabic مرحبا بالعالم", "digits 1234567890 3.14",
    "café naïve Ångström", "don't I'll we've", "<|im_start|>user\nhi<|im_end|>",
    "<s> and </s> and <unk>", "UPPER lower MiXeD", "a\u00a0nbsp",
]


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return {"bpe": byte_bpe_vocab(), "spm": spm_vocab(str(d))}


def _gguf(tmp_path, vocab, name="t.gguf", **kw):
    path = str(tmp_path / name)
    write_llama_gguf(path, vocab, layers=1, hidden=32, heads=2, kv_heads=1, ff=32, **kw)
    return path


def _hf_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _same_ids(ours, theirs, texts=TEXTS):
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text


@pytest.mark.parametrize("vocab,pre,add_bos,expect_bos", [
    ("bpe", "default", None, False),       # SmolLM2-like: gpt2 vocabulary, no flag -> no BOS
    ("bpe", "llama-bpe", True, True),      # Llama-3-like split pattern, flag on
    ("spm", None, None, True),             # LLaMA-2-like: llama vocabulary, no flag -> BOS
    ("spm", None, False, False),           # llama vocabulary that says no BOS
])
def test_gguf_tokenizer_matches_transformers(vocabs, tmp_path, vocab, pre, add_bos, expect_bos):
    v = dict(vocabs[vocab])
    if pre:
        v["pre"] = pre
    path = _gguf(tmp_path, v, add_bos=add_bos)
    tok = load_tokenizer(path)
    assert tok.add_bos is expect_bos and tok.add_eos is False
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400)
    assert (tok.encode("Hello")[0] == tok.bos_id) is expect_bos
    _same_ids(tok, _hf_gguf_tokenizer(path))
    for text in TEXTS:
        # (a "llama" vocabulary, like transformers' Metaspace, adds no second prefix space to a
        # text that starts with one, and its decoder strips one)
        if "<" not in text and not (vocab == "spm" and text[:1].isspace()):
            assert tok.decode(tok.encode(text)) == text, text


def test_split_pattern_is_used(vocabs, tmp_path):
    """tokenizer.ggml.pre picks the pre-tokenizer split: Llama-3's groups digits by three."""
    plain = load_tokenizer(_gguf(tmp_path, vocabs["bpe"], name="a.gguf"))
    llama3 = load_tokenizer(_gguf(tmp_path, dict(vocabs["bpe"], pre="llama-bpe"), name="b.gguf"))

    def split(tok, text):
        return [p for p, _ in tok.tk.pre_tokenizer.pre_tokenize_str(text)]

    assert split(plain, "12345678") == ["12345678"]
    assert split(llama3, "12345678") == ["123", "456", "78"]


def test_merges_from_scores_match_transformers(vocabs):
    from transformers.tokenization_utils_base import generate_merges

    from dromedary_jax.tokenizer import merges_from_scores

    v = vocabs["spm"]
    vocab = {t: i for i, t in enumerate(v["tokens"])}
    scores = dict(zip(v["tokens"], v["scores"]))
    ours = merges_from_scores(vocab, scores)
    assert len(ours) > 50
    assert ours == generate_merges(vocab, scores)


def test_bos_rule_encode_arguments(vocabs, tmp_path, sp_tokenizer):
    tok = load_tokenizer(_gguf(tmp_path, vocabs["bpe"]))  # add_bos False, bos_id 1
    plain = tok.encode("hi")
    assert plain[0] != 1
    assert tok.encode("hi", bos=True) == [1] + plain
    assert tok.encode("hi", bos=None, eos=True) == plain + [2]
    assert tok.encode_batch(["hi", "hi"]) == [plain, plain]
    assert tok.encode_batch(["hi"], bos=True) == [[1] + plain]
    # SentencePiece: BOS by default, as before
    assert sp_tokenizer.add_bos and sp_tokenizer.encode("hi")[0] == sp_tokenizer.bos_id
    assert sp_tokenizer.encode("hi", bos=False) == sp_tokenizer.encode("hi")[1:]


def _write_tokenizer_json(folder, *, template_bos: bool, bos="<s>", config=None):
    """A small BPE tokenizer.json (trained here) with or without a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from helpers import tiny_corpus

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [s for s in ("<unk>", bos, "</s>") if s]
    tk.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if template_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tk.token_to_id(bos))])
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", **(config or {})}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


@pytest.mark.parametrize("template_bos,config,expect", [
    (True, {}, True),                              # the post-processor inserts <s>
    (False, {"bos_token": "<s>"}, False),          # a BOS token that is not inserted
    (True, {"add_bos_token": True, "bos_token": "<s>"}, True),
    (True, {"add_bos_token": False}, False),       # tokenizer_config.json has the last word
    (False, {"add_bos_token": True, "bos_token": "<s>"}, True),
])
def test_tokenizer_json_bos_rule(tmp_path, template_bos, config, expect):
    from transformers import AutoTokenizer

    folder = _write_tokenizer_json(str(tmp_path / "t"), template_bos=template_bos, config=config)
    tok = load_tokenizer(folder)
    assert tok.add_bos is expect and tok.bos_id == 1
    assert (tok.encode("hi")[0] == 1) is expect
    if template_bos == expect:
        _same_ids(tok, AutoTokenizer.from_pretrained(folder))
    # (where the two disagree, transformers 5 follows the post-processor and ignores
    # add_bos_token; save_tokenizer writes a post-processor that agrees with the rule)
    out = str(tmp_path / "saved")
    save_tokenizer(tok, out)
    _check_saved(tok, out, texts=TEXTS[:6])


def test_tokenizer_json_without_bos_token(tmp_path):
    folder = _write_tokenizer_json(str(tmp_path / "t"), template_bos=False, bos=None)
    tok = load_tokenizer(folder)
    assert tok.bos_id is None and tok.add_bos is False
    assert tok.encode("hi") == tok.encode("hi", bos=False)
    with pytest.raises(UserError, match="has no BOS token"):
        tok.encode("hi", bos=True)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "eos_token": "</s>"}, f)
    with pytest.raises(UserError, match=r"no bos token found"):
        load_tokenizer(folder)


def _check_saved(tok, folder, texts=TEXTS, template=None):
    from transformers import AutoTokenizer

    again = load_tokenizer(folder)
    assert (again.add_bos, again.add_eos, again.bos_id, again.eos_id) == (
        tok.add_bos, tok.add_eos, tok.bos_id, tok.eos_id)
    hf = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        assert again.encode(text) == tok.encode(text), text
        assert hf(text)["input_ids"] == tok.encode(text), text
    assert hf.chat_template == template
    return again


@pytest.mark.parametrize("vocab", ["bpe", "spm"])
def test_save_gguf_tokenizer(vocabs, tmp_path, vocab):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = load_tokenizer(_gguf(tmp_path, vocabs[vocab], chat_template=template))
    out = str(tmp_path / "out")
    files = save_tokenizer(tok, out)
    assert sorted(os.path.basename(f) for f in files) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    again = _check_saved(tok, out, template=template)
    assert again.chat_template == template
    other = "{{ messages[0]['content'] }}"
    save_tokenizer(tok, out, chat_template=other)  # the argument wins over the GGUF's template
    _check_saved(tok, out, texts=TEXTS[:3], template=other)


def test_save_sentencepiece_tokenizer(sp_model_path, tmp_path):
    tok = load_tokenizer(sp_model_path)
    out = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")  # stale: would mislead transformers
    save_tokenizer(tok, out, chat_template="{{ bos_token }}")
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.model",
                                       "tokenizer_config.json"]
    # the tiny model normalises (NFKC, extra whitespace), which transformers' Llama tokenizer
    # does not do: compare on text both treat alike
    texts = ["Hello world", "The quick brown fox jumps over a lazy dog.", "0123456789",
             "### User: why is the sky blue?", "(internal thoughts): ok"]
    _check_saved(tok, out, texts=texts, template="{{ bos_token }}")


def test_tokenizer_errors_are_one_line(vocabs, tmp_path):
    path = _gguf(tmp_path, dict(vocabs["bpe"], model="bert"))
    with pytest.raises(UserError, match=r"GGUF tokenizer 'bert' .* is not supported") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 3)
    with pytest.raises(UserError, match=r"x\.gguf: not a readable GGUF file") as e:
        load_tokenizer(str(tmp_path / "x.gguf"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="save_tokenizer: expected a tokenizer"):
        save_tokenizer("tokenizer.model", str(tmp_path / "o"))
