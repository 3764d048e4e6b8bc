"""Checkpoints in and out: HF / Meta import against transformers, HF export, Orbax across meshes,
and the convert CLI's error lines."""
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import dromedary_jax as dj
from dromedary_jax.checkpoint import load_model, save_checkpoint, save_hf
from dromedary_jax.checkpoint.meta import hf_to_meta_rows, meta_to_hf_rows
from dromedary_jax.errors import UserError
from helpers import ours_from_hf, random_ids, tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = dict(rope_theta=500000.0, rope_scaling=dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=32))
# name -> (LlamaConfig overrides, save_pretrained kwargs, torch dtype stored)
VARIANTS = {
    "mha": ({}, {}, None),
    "gqa": (dict(num_key_value_heads=2), {}, None),
    "tied": (dict(tie_word_embeddings=True), {}, None),
    "theta500k": (dict(rope_theta=500000.0), {}, None),
    "llama3_scaling": (LLAMA3, {}, None),
    "sharded": (dict(num_key_value_heads=2), dict(max_shard_size="100KB"), None),
    "bf16": ({}, {}, torch.bfloat16),
    "fp16": (dict(num_key_value_heads=2), {}, torch.float16),
}
SEEDS = {name: i for i, name in enumerate(VARIANTS)}


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def ids():
    return random_ids(2, 24)


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """variant -> (folder, float32 transformers model holding exactly the saved weights)."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg, save_kw, dtype = VARIANTS[name]
            hf = tiny_hf_model(SEEDS[name], **cfg)
            folder = str(tmp_path_factory.mktemp(f"hf_{name}"))
            if dtype is not None:
                hf = hf.to(dtype)
            hf.save_pretrained(folder, **save_kw)
            cache[name] = (folder, hf.to(torch.float32))
        return cache[name]

    return get


# ----------------------------------------------------------------------------- HF import
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_folder_matches_transformers(variant, hf_saved, ids):
    folder, hf = hf_saved(variant)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if variant == "sharded":
        assert len(files) > 1
        assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    if variant in ("bf16", "fp16"):
        from safetensors import safe_open

        with safe_open(os.path.join(folder, files[0]), framework="numpy") as f:
            stored = f.get_slice("model.embed_tokens.weight").get_dtype()
        assert stored == {"bf16": "BF16", "fp16": "F16"}[variant]
    model = load_model(folder)
    assert model.params["wq"].dtype == np.float32
    np.testing.assert_allclose(dj.logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_hf_load_on_mesh_is_sharded_and_matches_one_device(hf_saved, ids):
    folder, _ = hf_saved("gqa")
    one = dj.logits(load_model(folder), ids)
    model = load_model(folder, mesh=(2, 2, 2))
    p = model.params
    assert model.mesh is not None and model.mesh.devices.size == 8
    assert p["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["wk"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["wo"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert p["embed"].sharding.spec == P("tensor", "fsdp")
    assert p["w_down"].sharding.spec == P(None, "tensor", "fsdp")
    assert p["wq"].addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert p["wk"].addressable_shards[0].data.shape == (2, 32, 1, 16)
    np.testing.assert_allclose(dj.logits(model, ids), one, atol=1e-5, rtol=0)


def test_hf_load_reads_only_each_devices_slice(hf_saved):
    from dromedary_jax.checkpoint.hf import SafetensorsSource, build_params, read_hf_config
    from dromedary_jax.sharding import make_mesh

    folder, _ = hf_saved("mha")
    reads = []

    class Recording(SafetensorsSource):
        def read(self, key, index):
            out = super().read(key, index)
            reads.append((key, out.shape))
            return out

    config = read_hf_config(folder)
    with Recording(folder) as src:
        params = build_params(src, config, make_mesh((2, 2, 2)))
    q_reads = [shape for key, shape in reads if key == "model.layers.0.self_attn.q_proj.weight"]
    # 4 distinct (fsdp, tensor) blocks of the [64, 64] q_proj, each read once, none whole.
    assert sorted(q_reads) == [(32, 32)] * 4
    assert params["wq"].sharding.spec == P(None, "fsdp", "tensor", None)


def test_hf_load_bfloat16_params_and_compute(hf_saved):
    folder, _ = hf_saved("mha")
    model = load_model(folder, dtype="bfloat16", param_dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.params["w_up"].dtype == ml_dtypes.bfloat16


# ----------------------------------------------------------------------------- Meta import
# family -> (params.json entries, the axis Meta's reference code splits tok_embeddings along,
#           the context length an import must infer, LlamaConfig overrides of the same model)
META_FAMILIES = {
    "llama1": (dict(norm_eps=1e-6), 1, 2048, dict(rms_norm_eps=1e-6)),
    "llama2": (dict(norm_eps=1e-5), 1, 4096, dict(rms_norm_eps=1e-5)),
    "llama3": (dict(norm_eps=1e-5, rope_theta=500000.0), 0, 8192,
               dict(rms_norm_eps=1e-5, rope_theta=500000.0)),
    "llama3.1": (dict(norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True), 0, 131072,
                 dict(rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(
                     rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192))),
}


def _write_meta(hf, folder, n_shards, tokenizer=None, params=None, embed_dim=1):
    """A Meta folder (params.json + consolidated.NN.pth) holding ``hf``'s weights, its
    tok_embeddings split along ``embed_dim`` (LLaMA-1/2: 1, LLaMA-3: 0)."""
    c = hf.config
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    hd = D // H
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(dict(dict(dim=D, n_layers=c.num_hidden_layers, n_heads=H, n_kv_heads=KV,
                            vocab_size=-1, multiple_of=32, ffn_dim_multiplier=0.75,
                            norm_eps=c.rms_norm_eps, rope_theta=10000.0), **(params or {})), f)
    if tokenizer:
        shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}

    def unpermute(w, n):  # HF rotate_half rows -> Meta interleaved rows (inverse of HF permute)
        return w.view(n, 2, hd // 2, D).transpose(1, 2).reshape(n * hd, D)

    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], embed_dim),
            "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd["lm_head.weight"], 0)}
    names = {"attention.wq": ("self_attn.q_proj", 0), "attention.wk": ("self_attn.k_proj", 0),
             "attention.wv": ("self_attn.v_proj", 0), "attention.wo": ("self_attn.o_proj", 1),
             "feed_forward.w1": ("mlp.gate_proj", 0), "feed_forward.w3": ("mlp.up_proj", 0),
             "feed_forward.w2": ("mlp.down_proj", 1),
             "attention_norm": ("input_layernorm", None),
             "ffn_norm": ("post_attention_layernorm", None)}
    for i in range(c.num_hidden_layers):
        for meta, (hfn, dim) in names.items():
            w = sd[f"model.layers.{i}.{hfn}.weight"]
            if meta == "attention.wq":
                w = unpermute(w, H)
            elif meta == "attention.wk":
                w = unpermute(w, KV)
            full[f"layers.{i}.{meta}.weight"] = (w, dim)
    for s in range(n_shards):
        shard = {k: (w.clone() if dim is None else w.chunk(n_shards, dim=dim)[s].clone())
                 for k, (w, dim) in full.items()}
        torch.save(shard, os.path.join(folder, f"consolidated.{s:02d}.pth"))
    return folder


def test_meta_permutation_is_hf_permute_inverse():
    w = torch.randn(3 * 8, 5)  # 3 heads of head_dim 8
    hf_permute = w.view(3, 4, 2, 5).transpose(1, 2).reshape(24, 5)  # convert_llama_weights_to_hf
    np.testing.assert_array_equal(meta_to_hf_rows(w.numpy(), 8), hf_permute.numpy())
    np.testing.assert_array_equal(hf_to_meta_rows(meta_to_hf_rows(w.numpy(), 8), 8), w.numpy())


@pytest.mark.parametrize("mesh", [None, (2, 2, 2)])
def test_meta_folder_matches_transformers(mesh, hf_saved, ids, sp_model_path, tmp_path):
    _, hf = hf_saved("gqa")
    folder = _write_meta(hf, str(tmp_path / "meta"), n_shards=2, tokenizer=sp_model_path)
    model = load_model(folder, mesh=mesh)
    assert model.config.vocab_size == 256 and model.config.num_kv_heads == 2
    assert model.config.intermediate_size == 128
    np.testing.assert_allclose(dj.logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(META_FAMILIES))
def test_meta_shards_and_context_length_per_family(family, ids, sp_model_path, tmp_path):
    """2-shard Meta folders of every family: the embedding's shard axis and the context length
    (params.json has none) come out right, and the logits equal transformers' model."""
    params, embed_dim, context, hf_cfg = META_FAMILIES[family]
    hf = tiny_hf_model(7, num_key_value_heads=2, **hf_cfg)
    folder = _write_meta(hf, str(tmp_path / family), n_shards=2, tokenizer=sp_model_path,
                         params=params, embed_dim=embed_dim)
    model = load_model(folder)
    assert model.config.max_seq_len == context
    np.testing.assert_allclose(dj.logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    if family == "llama2":  # the context length can be given instead
        assert load_model(folder, max_seq_len=1024).config.max_seq_len == 1024
        with pytest.raises(UserError, match="max_seq_len"):
            load_model(folder, max_seq_len=0)


def test_meta_embedding_shards_that_fit_no_family_are_refused():
    from dromedary_jax.checkpoint.meta import embedding_shard_dim

    assert embedding_shard_dim([(256, 64), (256, 64)], 64, "x") == 0
    assert embedding_shard_dim([(256, 32), (256, 32)], 64, "x") == 1
    with pytest.raises(UserError, match="neither"):
        embedding_shard_dim([(128, 32), (256, 32)], 64, "x")


def test_meta_without_torch_says_how_to_install(monkeypatch, tmp_path):
    from dromedary_jax.checkpoint import meta

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match=r"pip install torch==2\.13\.0"):
        meta.MetaSource(str(tmp_path), head_dim=16)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("variant", ["llama3_scaling", "tied"])
def test_save_hf_reloads_in_transformers(variant, hf_saved, ids, tmp_path):
    import transformers

    _, hf = hf_saved(variant)
    out = str(tmp_path / "export")
    files = save_hf(ours_from_hf(hf), out, max_shard_bytes=150_000)
    assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    back = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings == (variant == "tied")
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_save_hf_bfloat16_round_trip(hf_saved, tmp_path):
    _, hf = hf_saved("gqa")
    model = ours_from_hf(hf)
    out = str(tmp_path / "bf16")
    assert save_hf(model, out, dtype="bfloat16") == ["model.safetensors"]
    back = load_model(out)
    for name, w in model.params.items():
        want = np.asarray(w).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(back.params[name]), want, err_msg=name)


# ----------------------------------------------------------------------------- Orbax
def test_orbax_save_on_mesh_restore_on_one_device_and_back(hf_saved, ids, tmp_path):
    folder, hf = hf_saved("gqa")
    ref = hf_logits(hf, ids)
    on_mesh = load_model(folder, mesh=(2, 2, 2))
    ck8 = save_checkpoint(on_mesh, str(tmp_path / "ck8"))
    one = load_model(ck8)
    assert one.mesh is None and len(one.params["wq"].sharding.device_set) == 1
    one_logits = dj.logits(one, ids)
    np.testing.assert_allclose(one_logits, ref, atol=1e-4, rtol=0)

    ck1 = save_checkpoint(one, str(tmp_path / "ck1"))
    again = load_model(ck1, mesh={"data": 2, "fsdp": -1, "tensor": 2})
    assert again.params["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert again.config == one.config
    np.testing.assert_allclose(dj.logits(again, ids), one_logits, atol=1e-5, rtol=0)

    with pytest.raises(UserError, match="already holds a checkpoint"):
        save_checkpoint(one, ck1)
    half = load_model(ck1, param_dtype="bfloat16")
    assert half.params["embed"].dtype == ml_dtypes.bfloat16


# ----------------------------------------------------------------------------- bad input
def test_unknown_folder_names_path_and_formats(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty.*config\.json.*params\.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_missing_tensor_is_named(hf_saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = hf_saved("mha")
    bad = str(tmp_path / "bad")
    shutil.copytree(folder, bad)
    tensors = load_file(os.path.join(bad, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_model(bad)


def _bad_shape_folder(folder, dst):
    shutil.copytree(folder, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 96
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_shape_mismatch_names_tensor_and_both_shapes(hf_saved, tmp_path):
    folder, _ = hf_saved("mha")
    bad = _bad_shape_folder(folder, str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"mlp\.gate_proj\.weight.*\(128, 64\).*\(96, 64\)"):
        load_model(bad)


def test_mesh_must_divide_heads(hf_saved):
    folder, _ = hf_saved("mha")
    with pytest.raises(UserError, match="does not divide num_heads=4"):
        load_model(folder, mesh=(1, 1, 8))


def test_convert_cli_in_process(hf_saved, tmp_path, ids, capsys):
    from dromedary_jax.convert import main

    folder, hf = hf_saved("gqa")
    out = str(tmp_path / "hf_bf16")
    assert main(["--src", folder, "--dst", out, "--dtype", "bfloat16",
                 "--max_shard_size", "100KB", "--mesh", "1,-1,1"]) == 0
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert main(["--src", out, "--dst", str(tmp_path / "ck"), "--to", "orbax"]) == 0
    assert "wrote" in capsys.readouterr().out
    back = load_model(str(tmp_path / "ck"))
    np.testing.assert_allclose(dj.logits(back, ids), hf_logits(hf, ids), atol=0.05, rtol=0)


def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "dromedary_jax.convert", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def _one_error_line(proc, pattern):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert pattern in lines[0], lines[0]


def test_cli_missing_config_json(hf_saved, tmp_path):
    folder, _ = hf_saved("mha")
    bad = str(tmp_path / "noconfig")
    shutil.copytree(folder, bad)
    os.remove(os.path.join(bad, "config.json"))
    _one_error_line(_run_cli("--src", bad, "--dst", str(tmp_path / "o")), "no config.json")


def test_malformed_config_json_names_file_and_line(hf_saved, tmp_path):
    folder, _ = hf_saved("mha")
    bad = str(tmp_path / "badconfig")
    shutil.copytree(folder, bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write('{\n  "hidden_size": 64,\n  "num_hidden_layers": \n}')
    with pytest.raises(UserError, match=r"badconfig/config\.json:4: malformed JSON \("):
        load_model(bad)


def test_cli_shape_mismatch(hf_saved, tmp_path):
    folder, _ = hf_saved("mha")
    bad = _bad_shape_folder(folder, str(tmp_path / "bad"))
    _one_error_line(_run_cli("--src", bad, "--dst", str(tmp_path / "o")), "has shape (128, 64)")


def test_cli_mesh_not_dividing_heads(hf_saved, tmp_path):
    folder, _ = hf_saved("mha")
    _one_error_line(_run_cli("--src", folder, "--dst", str(tmp_path / "o"), "--mesh", "1,1,8"),
                    "does not divide num_heads=4")


# ----------------------------------------------------------------------------- output folders, bad
# paths, bad config / marker values, failed Orbax restores: one UserError (CLI: one error line)
@pytest.fixture(scope="module")
def tiny_model():
    from flax import nnx

    from dromedary_jax.model import Llama

    return Llama(dj.preset("tiny", num_layers=1, vocab_size=64), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def orbax_ck(tiny_model, tmp_path_factory):
    return save_checkpoint(tiny_model, str(tmp_path_factory.mktemp("orbax") / "ck"))


def _convert_error(capsys, *argv):
    """The convert CLI in-process: exit code 2 and the one ``error:`` line."""
    from dromedary_jax.convert import main

    capsys.readouterr()  # drop earlier output (e.g. a fixture's save_pretrained progress bar)
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_convert_refuses_dst_that_is_src_through_a_symlink(hf_saved, tmp_path, capsys):
    folder, _ = hf_saved("mha")
    src = str(tmp_path / "src")
    shutil.copytree(folder, src)
    before = open(os.path.join(src, "model.safetensors"), "rb").read()
    os.symlink(src, str(tmp_path / "link"))
    for dst in (str(tmp_path / "link"), str(tmp_path / "link" / ".." / "src")):
        line = _convert_error(capsys, "--src", src, "--dst", dst, "--dtype", "bfloat16")
        assert "is the same folder as --src" in line
    assert open(os.path.join(src, "model.safetensors"), "rb").read() == before


def test_save_hf_refuses_a_non_empty_folder_unless_overwrite(tiny_model, orbax_ck, tmp_path):
    from dromedary_jax.checkpoint import detect_format

    ck = str(tmp_path / "ck")
    shutil.copytree(orbax_ck, ck)
    with pytest.raises(UserError, match=r"save_hf: .*/ck is not empty; pass overwrite=True"):
        save_hf(tiny_model, ck)
    assert sorted(os.listdir(ck)) == ["dromedary_checkpoint.json", "params"]  # untouched
    assert save_hf(tiny_model, ck, overwrite=True) == ["model.safetensors"]
    assert detect_format(ck) == "hf"  # the Orbax marker went with the overwrite
    np.testing.assert_array_equal(np.asarray(load_model(ck).params["wq"]),
                                  np.asarray(tiny_model.params["wq"]))
    (tmp_path / "empty").mkdir()
    assert save_hf(tiny_model, str(tmp_path / "empty")) == ["model.safetensors"]


@pytest.mark.parametrize("to", ["hf", "orbax"])
def test_convert_refuses_a_non_empty_dst_unless_overwrite(to, orbax_ck, tmp_path, capsys):
    from dromedary_jax.convert import main

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    line = _convert_error(capsys, "--src", orbax_ck, "--dst", str(dst), "--to", to)
    assert "is not empty; pass --overwrite" in line
    assert sorted(os.listdir(dst)) == ["notes.txt"]
    assert main(["--src", orbax_ck, "--dst", str(dst), "--to", to, "--overwrite"]) == 0
    assert load_model(str(dst)).config.vocab_size == 64


@pytest.mark.parametrize("writer", ["save_hf", "save_checkpoint", "convert"])
@pytest.mark.parametrize("where, match", [
    ("file", "exists and is not a folder"),
    ("file/sub", "cannot create the folder"),
], ids=["file", "under_file"])
def test_writing_onto_a_file_names_the_path(writer, where, match, tiny_model, orbax_ck,
                                            tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    dst = str(tmp_path / where)
    if writer == "convert":
        assert match in _convert_error(capsys, "--src", orbax_ck, "--dst", dst)
    else:
        with pytest.raises(UserError, match=match):
            {"save_hf": save_hf, "save_checkpoint": save_checkpoint}[writer](tiny_model, dst)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("size", ["inf", "-inf", "infGB", "1e400", "nan"])
def test_convert_max_shard_size_must_be_finite(size):
    from dromedary_jax.convert import parse_size

    with pytest.raises(UserError, match=f"--max_shard_size '{size}'"):
        parse_size(size)


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(data), f)


@pytest.mark.parametrize("edit, match", [
    (lambda c: dict(c, hidden_size="abc"), r"config\.json: hidden_size='abc' must be a positive"),
    (lambda c: dict(c, vocab_size=0), r"config\.json: vocab_size=0 must be a positive integer"),
    (lambda c: dict(c, eos_token_id=[]), r"config\.json: eos_token_id=\[\] is an empty list"),
    (lambda c: dict(c, rope_scaling={"rope_type": "linear"}),
     r"config\.json: missing the key 'rope_scaling\.factor'"),
    (lambda c: dict(c, rope_scaling="linear"), r"config\.json: rope_scaling='linear' must be an"),
    (lambda c: [c], r"config\.json: expected a JSON object, got list"),
], ids=["hidden_size_str", "vocab_size_0", "eos_empty_list", "linear_no_factor",
        "rope_scaling_str", "json_list"])
def test_bad_config_json_value_names_file_and_key(edit, match, hf_saved, tmp_path):
    folder, _ = hf_saved("mha")
    bad = str(tmp_path / "bad")
    os.mkdir(bad)  # the config is read before any weights
    shutil.copy(os.path.join(folder, "config.json"), bad)
    _edit_json(os.path.join(bad, "config.json"), edit)
    with pytest.raises(UserError, match=r"/bad/" + match):
        load_model(bad)


def _set_config(**kw):
    return lambda m: dict(m, config=dict(m["config"], **kw))


@pytest.mark.parametrize("edit, match", [
    (lambda m: [], r"not a valid dromedary_jax checkpoint marker .*got a JSON list"),
    (lambda m: dict(m, config=None), r"not a valid dromedary_jax checkpoint marker"),
    (_set_config(rope_scaling={"factor": 2.0, "scale": 1}),
     r"rope_scaling has unknown key\(s\) 'scale'"),
    (_set_config(hidden_size="abc"), r"hidden_size='abc' must be a positive integer"),
    (_set_config(num_heads=0), r"num_heads=0 must be a positive integer"),
], ids=["json_list", "config_null", "rope_scaling_unknown_key", "hidden_size_str",
        "num_heads_0"])
def test_bad_orbax_marker_names_file_and_key(edit, match, tmp_path):
    from dromedary_jax.checkpoint.orbax_io import MARKER, config_to_json

    bad = tmp_path / "bad"
    bad.mkdir()  # the marker is read before the params
    marker = str(bad / MARKER)
    with open(marker, "w") as f:
        json.dump({"format": "dromedary_jax", "version": 1,
                   "config": config_to_json(dj.preset("tiny"))}, f)
    _edit_json(marker, edit)
    with pytest.raises(UserError, match=r"/bad/dromedary_checkpoint\.json: "
                                         r"(invalid model config: )?" + match):
        load_model(str(bad))


def _break_orbax(ck, how):
    from dromedary_jax.checkpoint.orbax_io import MARKER

    params = os.path.join(ck, "params")
    if how == "empty params/":
        shutil.rmtree(params)
        os.mkdir(params)
    elif how == "no ocdbt.process_0":
        shutil.rmtree(os.path.join(params, "ocdbt.process_0"))
    else:  # the marker's config disagrees with the stored shapes
        _edit_json(os.path.join(ck, MARKER), _set_config(intermediate_size=96))


@pytest.mark.parametrize("how, match", [
    ("empty params/", r"/ck: params/ is empty; the checkpoint was not saved completely"),
    ("no ocdbt.process_0", r"/ck/params: cannot be restored \(.*\); the checkpoint is incomplete"),
    ("shape", r"/ck/params: parameter 'w_gate' has shape \(1, 64, 176\) but .*/ck/"
              r"dromedary_checkpoint\.json implies \(1, 64, 96\)"),
], ids=["empty_params", "no_ocdbt", "shape"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_broken_orbax_checkpoint_is_one_user_error(how, match, orbax_ck, tmp_path):
    ck = str(tmp_path / "ck")
    shutil.copytree(orbax_ck, ck)
    _break_orbax(ck, how)
    with pytest.raises(UserError, match=match):
        load_model(ck, mesh={"fsdp": -1})
    _collect_orphaned_orbax_reads()


def _collect_orphaned_orbax_reads(timeout_s: float = 5.0):
    """A failed Orbax restore leaves the reads still in flight as coroutines on a closed event
    loop; collect them here (their "never awaited" reports are ignored above) rather than during
    a later test."""
    import gc
    import time
    import types

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        gc.collect()
        if not any(type(o) is types.CoroutineType and "orbax" in o.cr_code.co_filename
                   for o in gc.get_objects()):
            return
        time.sleep(0.05)


def test_cli_broken_orbax_checkpoint_is_one_error(orbax_ck, tmp_path):
    ck = str(tmp_path / "ck")
    shutil.copytree(orbax_ck, ck)
    _break_orbax(ck, "no ocdbt.process_0")
    proc = _run_cli("--src", ck, "--dst", str(tmp_path / "o"))
    # One error line. (When a read fails, Orbax closes its event loop under the reads still in
    # flight, and their threads may print "Event loop is closed" tracebacks after it.)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot be restored" in errors[0], proc.stderr[-2000:]
    assert proc.returncode == 2 and not os.path.exists(str(tmp_path / "o"))


@pytest.mark.parametrize("call, match", [
    (lambda f: load_model(f, mesh="fsdp"), r"mesh='fsdp': expected None .* a dict of axis sizes"),
    (lambda f: load_model(f, mesh={"fsdp": "all"}), r"mesh \{'fsdp': 'all'\}: expected axis"),
    (lambda f: load_model(f, mesh=8), r"mesh 8: expected axis sizes"),
    (lambda f: load_model(None), r"load_model path=None: expected a model folder path"),
    (lambda f: save_hf(None, None), r"save_hf out_dir=None: expected a folder path"),
    (lambda f: dj.preset("tiny", foo=1), r"preset\('tiny'\): unknown ModelConfig field\(s\) "
                                         r"'foo'; valid fields: vocab_size, hidden_size"),
], ids=["mesh_str", "mesh_dict_str_size", "mesh_int", "load_model_none", "save_hf_none",
        "preset_unknown_field"])
def test_bad_arguments_are_user_errors(call, match, orbax_ck):
    with pytest.raises(UserError, match=match):
        call(orbax_ck)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_layers", "num_heads",
                                   "num_kv_heads", "intermediate_size", "max_seq_len"])
@pytest.mark.parametrize("value", [0, -2])
def test_model_config_rejects_non_positive_sizes(field, value):
    with pytest.raises(UserError, match=f"invalid model config: {field}={value} must be a "
                                        "positive integer"):
        dj.ModelConfig(**{field: value})


def test_read_model_config_equals_the_loaded_models_config(hf_saved, orbax_ck, sp_model_path,
                                                          tmp_path):
    """Every format's config without its weights (the dry run's and the input checks' source)
    is the config load_model builds."""
    from gguf_helpers import byte_bpe_vocab, write_llama_gguf

    from dromedary_jax.checkpoint import read_model_config

    hf_dir, hf = hf_saved("gqa")
    meta_dir = _write_meta(hf, str(tmp_path / "meta"), n_shards=2, tokenizer=sp_model_path)
    gguf_path = str(tmp_path / "m.gguf")
    write_llama_gguf(gguf_path, byte_bpe_vocab(), hidden=64, layers=2, heads=4, kv_heads=2, ff=96)
    for path in (hf_dir, orbax_ck, meta_dir, gguf_path):
        assert read_model_config(path) == load_model(path).config, path
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        read_model_config(str(tmp_path / "empty"))
