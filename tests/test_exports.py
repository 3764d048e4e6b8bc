"""Every model folder the pipeline writes carries its tokenizer and a chat template that renders
the meta-prompt the model was fine-tuned on (issue: exported HF folders had no tokenizer)."""
import os

import pytest

from dromedary_jax.pipeline.finetune import chat_template, save_model_tokenizer
from dromedary_jax.tokenizer import load_tokenizer

META = ("Dromedary is an AI assistant.\n\nUser: {prompt}\n\nDromedary:")


@pytest.mark.parametrize("kind", ["sentencepiece", "llama_sentencepiece"])
def test_chat_template_renders_the_training_prompt(kind, sp_tokenizer, llama_sp_tokenizer,
                                                   tmp_path):
    from transformers import AutoTokenizer

    tok = sp_tokenizer if kind == "sentencepiece" else llama_sp_tokenizer
    folder = str(tmp_path / kind)
    save_model_tokenizer(tok, folder, META)
    hf = AutoTokenizer.from_pretrained(folder)
    q = 'Why is the sky "blue"?\nExplain.'
    want = META.replace("{prompt}", q)
    got = hf.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                 add_generation_prompt=True)
    assert got == hf.bos_token + want  # LLaMA-style SentencePiece: BOS first, as in training
    ids = hf.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                 add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    if kind == "llama_sentencepiece":  # (transformers drops the toy model's NFKC normaliser)
        assert list(ids) == tok.encode(want)  # the ids the model was trained on
    two = hf.apply_chat_template([{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}], tokenize=False)
    assert two == hf.bos_token + META.replace("{prompt}", "a") + " b\n\nUser: c\n\nDromedary:"
    # and our own loader reads the folder back with the same rule
    again = load_tokenizer(folder)
    assert again.add_bos == tok.add_bos and again.encode(want) == tok.encode(want)


def test_chat_template_without_bos():
    t = chat_template(META, add_bos=False)
    assert "bos_token" not in t and "User: " in t


@pytest.mark.parametrize("fmt", ["hf", "checkpoint"])
def test_train_cli_export_carries_the_tokenizer(fmt, llama_sp_tokenizer, tmp_path):
    """python -m dromedary_jax.train's final folder opens in transformers' AutoTokenizer and
    in our load_tokenizer without --tokenizer."""
    import types

    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from dromedary_jax import train
    from dromedary_jax.model import Llama, ModelConfig
    from dromedary_jax.model.llama import param_shapes
    from dromedary_jax.training.config import default_config

    c = ModelConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=2, max_seq_len=64)
    params = {k: jnp.asarray(np.ones(s, np.float32)) for k, s in param_shapes(c).items()}
    cfg = default_config()
    cfg.export.format = fmt
    out = train.export(types.SimpleNamespace(model=Llama(c, params=params)), cfg, str(tmp_path),
                       llama_sp_tokenizer)
    assert out
    folder = os.path.join(str(tmp_path), "final")
    assert load_tokenizer(folder).encode("hi there") == llama_sp_tokenizer.encode("hi there")
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf.chat_template and "{prompt}" not in hf.chat_template
