"""LoRA adapters exported as a Hugging Face PEFT adapter folder (dj.save_peft_adapter): PEFT loads
it onto the base model and gives our merged model's logits; the train CLI and the pipeline's
LoRA fine-tunes write it next to their merged model."""
import os
import types

import numpy as np
import pytest

from helpers import ours_from_hf, random_ids, tiny_hf_model

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora(config, rank, targets=ALL_TARGETS, seed=0, std=0.1):
    """Adapters with non-zero random a AND b (a fresh init has b = 0, which would hide a
    transposed or mis-scaled B)."""
    import jax.numpy as jnp

    from dromedary_jax.training.lora import lora_shapes

    rng = np.random.default_rng(seed)
    return {n: {k: jnp.asarray(rng.normal(0, std, s).astype(np.float32)) for k, s in ab.items()}
            for n, ab in lora_shapes(config, rank, targets).items()}


def tiny_config():
    from dromedary_jax.model import ModelConfig

    return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, max_seq_len=64)


def test_peft_tensors_are_our_delta_in_hf_layout():
    """Per layer and target, scale * lora_B @ lora_A is our merged delta in HF's [out, in]
    layout (hf_mapping.ours_to_hf), GQA shapes included; names are PEFT's saved names."""
    from dromedary_jax.checkpoint.hf_mapping import ours_to_hf
    from dromedary_jax.checkpoint.peft_export import peft_tensors
    from dromedary_jax.training.lora import delta

    c = tiny_config()
    lora = random_lora(c, rank=3)
    t = peft_tensors(lora, c)
    assert len(t) == 2 * len(ALL_TARGETS) * c.num_layers
    mods = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
            "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
            "w_down": "mlp.down_proj"}
    for name, ab in lora.items():
        d = np.asarray(delta(ab["a"], ab["b"]))
        for i in range(c.num_layers):
            p = f"base_model.model.model.layers.{i}.{mods[name]}"
            A, B = t[f"{p}.lora_A.weight"], t[f"{p}.lora_B.weight"]
            want = ours_to_hf(name, d[i], c)
            assert A.shape == (3, want.shape[1]) and B.shape == (want.shape[0], 3)
            assert A.dtype == np.float32 and B.dtype == np.float32
            np.testing.assert_allclose(B @ A, want, atol=1e-6, rtol=0, err_msg=f"{name}[{i}]")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_model_from_pretrained_matches_our_merged_model(tied, tmp_path):
    """PeftModel.from_pretrained(base HF model, our adapter folder) == dj.logits of merge_lora ==
    transformers on our merged HF export (float32, max abs 1e-4), for a GQA model with adapters
    on all seven projections."""
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    import dromedary_jax as dj
    from dromedary_jax.model import Llama
    from dromedary_jax.training.lora import merge_lora, scale

    hf = tiny_hf_model(seed=3, num_key_value_heads=2, tie_word_embeddings=tied)
    base = ours_from_hf(hf)
    c = base.config
    assert c.num_kv_heads == 2 and c.num_heads == 4 and c.tie_embeddings == tied
    rank, alpha = 4, 6.0  # scale 1.5: a scale of 1 would hide alpha/r mix-ups
    lora = random_lora(c, rank, seed=1)
    base_dir, adapter_dir, merged_dir = (str(tmp_path / n) for n in ("base", "adapter", "merged"))
    dj.save_hf(base, base_dir)
    written = dj.save_peft_adapter(lora, c, adapter_dir, alpha=alpha,
                                   base_model_name_or_path=base_dir)
    assert sorted(os.path.basename(p) for p in written) == ["adapter_config.json",
                                                           "adapter_model.safetensors"]
    merged = Llama(c, params=merge_lora(base.params, lora, scale(alpha, rank)))
    dj.save_hf(merged, merged_dir)

    ids = random_ids(2, 16, vocab=c.vocab_size, seed=5)
    ours = dj.logits(merged, ids)
    assert np.abs(ours - dj.logits(base, ids)).max() > 1e-2  # the adapters matter

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                           adapter_dir).eval()
    assert peft_model.peft_config["default"].base_model_name_or_path == base_dir
    loaded = get_peft_model_state_dict(peft_model)  # every tensor we wrote, and only those
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert sorted(loaded) == sorted(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(loaded[k].detach().numpy(), v, err_msg=k)
    x = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        got = peft_model(x).logits.float().numpy()
        ref = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(x).logits.float().numpy()
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ref, ours, atol=1e-4, rtol=0)


def test_adapter_config_fields(tmp_path):
    from dromedary_jax.checkpoint.peft_export import read_peft_adapter_config, save_peft_adapter

    c = tiny_config()
    save_peft_adapter(random_lora(c, 2, targets=("wv", "w_down", "wq")), c, tmp_path / "a",
                      alpha=16, dropout=0.05)
    got = read_peft_adapter_config(tmp_path / "a")
    assert got["peft_type"] == "LORA" and got["task_type"] == "CAUSAL_LM"
    assert got["r"] == 2 and got["lora_alpha"] == 16 and got["use_rslora"] is False
    assert got["target_modules"] == ["q_proj", "v_proj", "down_proj"]  # the layer's order
    assert got["lora_dropout"] == 0.05 and got["base_model_name_or_path"] is None
    save_peft_adapter(random_lora(c, 2), c, tmp_path / "b", alpha=2.5)
    assert read_peft_adapter_config(tmp_path / "b")["lora_alpha"] == 2.5


def test_sharded_adapters_export_the_same_tensors(tmp_path):
    """Adapters placed on an 8-device (1, 4, 2) mesh are gathered into the same file."""
    import jax
    from safetensors.numpy import load_file

    from dromedary_jax import sharding as shd
    from dromedary_jax.checkpoint.peft_export import save_peft_adapter
    from dromedary_jax.training.lora import lora_shardings

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    c = tiny_config()
    lora = random_lora(c, 4)
    mesh = shd.make_mesh((1, 4, 2))
    sh = lora_shardings(c, 4, ALL_TARGETS, mesh)
    placed = {n: {k: jax.device_put(v, sh[n][k]) for k, v in ab.items()} for n, ab in lora.items()}
    assert any(len(placed[n][k].sharding.device_set) == 8 and
               not placed[n][k].sharding.is_fully_replicated
               for n in placed for k in ("a", "b"))
    save_peft_adapter(lora, c, tmp_path / "plain", alpha=8)
    save_peft_adapter(placed, c, tmp_path / "sharded", alpha=8)
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("plain", "sharded"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bad_input_is_one_user_error(tmp_path):
    from dromedary_jax.errors import UserError
    from dromedary_jax.checkpoint.peft_export import save_peft_adapter

    c = tiny_config()
    lora = random_lora(c, 2, targets=("wq",))
    wk = random_lora(c, 2, targets=("wk",))["wk"]  # GQA: 2 kv heads, where wq has 4 heads
    with pytest.raises(UserError, match=r"lora\['wq'\]\['b'\] has shape \(2, 2, 2, 8\) but the "
                                        r"model config .* implies \(2, 2, 4, 8\)"):
        save_peft_adapter({"wq": wk}, c, tmp_path / "x", alpha=4)
    with pytest.raises(UserError, match=r"lora\.targets=\['embed'\]: choose among"):
        save_peft_adapter({"embed": lora["wq"]}, c, tmp_path / "x", alpha=4)
    with pytest.raises(UserError, match=r"alpha=0.0: expected a number > 0"):
        save_peft_adapter(lora, c, tmp_path / "x", alpha=0)
    with pytest.raises(UserError, match=r"lora: expected the adapters"):
        save_peft_adapter(None, c, tmp_path / "x", alpha=4)
    with pytest.raises(UserError, match=r"lora\['wq'\]: expected \{'a': array, 'b': array\}"):
        save_peft_adapter({"wq": {"a": lora["wq"]["a"]}}, c, tmp_path / "x", alpha=4)
    assert not os.path.exists(tmp_path / "x")  # nothing written on a refusal
    save_peft_adapter(lora, c, tmp_path / "x", alpha=4)
    with pytest.raises(UserError, match=r"is not empty; pass overwrite=True"):
        save_peft_adapter(lora, c, tmp_path / "x", alpha=4)
    save_peft_adapter(lora, c, tmp_path / "x", alpha=8, overwrite=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match=r"exists and is not a folder"):
        save_peft_adapter(lora, c, tmp_path / "f", alpha=4)


def _train_export(tmp_path, tokenizer, fmt, lora, base_dir, merged_params, c):
    from dromedary_jax import train
    from dromedary_jax.model import Llama
    from dromedary_jax.training.config import default_config

    cfg = default_config()
    cfg.export.format = fmt
    cfg.lora.enabled = lora is not None
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 2, 3.0, ALL_TARGETS
    cfg.model.checkpoint = base_dir
    result = types.SimpleNamespace(model=Llama(c, params=merged_params), lora=lora)
    return train.export(result, cfg, str(tmp_path), tokenizer)


def test_train_cli_export_writes_the_adapter_next_to_final(llama_sp_tokenizer, tmp_path,
                                                           monkeypatch):
    """python -m dromedary_jax.train's export of a LoRA fine-tune: <workdir>/adapter next to
    <workdir>/final, base_model_name_or_path = the (absolute) model.checkpoint, the tokenizer and
    chat template as in final/; PEFT on the base folder gives final/'s logits. A rerun
    re-exports; a full fine-tune and export.format=none write no adapter."""
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dromedary_jax as dj
    from dromedary_jax.checkpoint.peft_export import read_peft_adapter_config
    from dromedary_jax.tokenizer import load_tokenizer
    from dromedary_jax.training.lora import merge_lora, scale

    vocab = llama_sp_tokenizer.vocab_size
    base = ours_from_hf(tiny_hf_model(seed=4, vocab_size=vocab, num_key_value_heads=2,
                                      hidden_size=32, intermediate_size=48))
    c = base.config
    lora = random_lora(c, 2, seed=2)
    merged = merge_lora(base.params, lora, scale(3.0, 2))
    dj.save_hf(base, str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)  # a relative model.checkpoint is recorded as an absolute path
    work = tmp_path / "work"
    for _ in range(2):  # the second time: a rerun re-exports over the first
        assert _train_export(work, llama_sp_tokenizer, "hf", lora, "base", merged, c)
    adapter = work / "adapter"
    assert sorted(os.listdir(work)) == ["adapter", "final"]
    got = read_peft_adapter_config(adapter)
    assert got["base_model_name_or_path"] == str(tmp_path / "base")
    assert got["r"] == 2 and got["lora_alpha"] == 3 and got["target_modules"] == HF_NAMES
    assert load_tokenizer(str(adapter)).encode("hi there") == llama_sp_tokenizer.encode("hi there")
    assert AutoTokenizer.from_pretrained(str(adapter)).chat_template == \
        AutoTokenizer.from_pretrained(str(work / "final")).chat_template
    ids = torch.tensor(random_ids(1, 12, vocab=vocab, seed=1), dtype=torch.long)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(got["base_model_name_or_path"]), str(adapter)).eval()
    with torch.no_grad():
        got_logits = peft_model(ids).logits.numpy()
        want = AutoModelForCausalLM.from_pretrained(str(work / "final")).eval()(ids).logits.numpy()
    np.testing.assert_allclose(got_logits, want, atol=1e-4, rtol=0)

    assert _train_export(tmp_path / "full", llama_sp_tokenizer, "checkpoint", None, "base",
                         base.params, c)
    assert not os.path.exists(tmp_path / "full" / "adapter")
    assert _train_export(tmp_path / "none", llama_sp_tokenizer, "none", lora, "base", merged,
                         c) is None
    assert not os.path.exists(tmp_path / "none")


def test_pipeline_save_adapter_is_atomic_and_kept_on_resume(sp_tokenizer, tmp_path):
    """pipeline.finetune.save_adapter (what finetune_and_save calls for engrave and
    verbose_clone): nothing for a full fine-tune; a finished folder is kept by a resumed call;
    no temp folder is left behind; the config's alpha and dropout are recorded."""
    import ml_collections

    from dromedary_jax.checkpoint.peft_export import read_peft_adapter_config
    from dromedary_jax.pipeline.finetune import save_adapter

    c = tiny_config()
    lora_cfg = ml_collections.ConfigDict({"alpha": 16.0, "dropout": 0.1, "rank": 4})
    out = str(tmp_path / "engrave" / "adapter")
    assert save_adapter(None, lora_cfg, c, sp_tokenizer, "Q: {prompt}\nA:", out) is None
    assert not os.path.exists(out)
    assert save_adapter(random_lora(c, 4), lora_cfg, c, sp_tokenizer, "Q: {prompt}\nA:", out,
                        base_model=None) == out
    cfg_path = os.path.join(out, "adapter_config.json")
    got = read_peft_adapter_config(out)
    assert got["lora_dropout"] == 0.1 and got["lora_alpha"] == 16 and got["r"] == 4
    with open(cfg_path) as f:
        first = f.read()
    lora_cfg.alpha = 8.0
    save_adapter(random_lora(c, 4, seed=9), lora_cfg, c, sp_tokenizer, "Q: {prompt}\nA:", out)
    with open(cfg_path) as f:
        assert f.read() == first  # kept: a resumed stage does not rewrite it
    assert sorted(os.listdir(tmp_path / "engrave")) == ["adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors",
            "tokenizer_config.json"} <= set(os.listdir(out))
