"""Meta (original LLaMA) folders: ``params.json`` + ``consolidated.00.pth`` ... ``.NN.pth``.

The model-parallel shards are presented as one virtual HF-layout state dict
(:class:`MetaSource`), so ``hf.build_params`` places each parameter straight into its target
sharding, reading only the slices each device needs:

- column-parallel weights (wq, wk, wv, w1, w3, output) are concatenated along dim 0,
  row-parallel ones (wo, w2) along dim 1; norms are replicated (shard 0 is used);
- ``tok_embeddings`` differs by family: LLaMA-1/2's ``ParallelEmbedding`` splits the embedding
  dim (dim 1), LLaMA-3/3.1's ``VocabParallelEmbedding`` the vocabulary (dim 0). The axis is read
  off the shard shapes against params.json's ``dim`` (:func:`embedding_shard_dim`), so it is
  right for every family without being told which one it is;
- wq/wk rows are permuted from Meta's interleaved RoPE pairs (2i, 2i+1) into the rotate_half
  layout (i, i + head_dim/2) that HF and this project use (inverse of the ``permute`` in HF's
  ``convert_llama_weights_to_hf.py``; per head, so GQA's wk uses n_kv_heads).

Shards are opened with ``torch.load(mmap=True, weights_only=True)``: nothing is read into memory
until a slice is asked for, so host memory stays at about one parameter's slice at a time.
torch comes with the ``convert`` extra only.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from dromedary_jax.checkpoint.hf import build_params
from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json
from dromedary_jax.model.config import ModelConfig

PARAMS_FILE = "params.json"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")

# HF per-layer suffix -> (Meta per-layer suffix, concat dim or None, heads to un-permute)
_LAYER_META = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0, "q"),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0, "kv"),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0, None),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1, None),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0, None),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0, None),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1, None),
    "input_layernorm.weight": ("attention_norm.weight", None, None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None, None),
}
_GLOBAL_META = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1, None),  # dim: see embedding_shard_dim
    "model.norm.weight": ("norm.weight", None, None),
    "lm_head.weight": ("output.weight", 0, None),
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError("reading Meta .pth checkpoints needs torch: "
                        "pip install torch==2.13.0 (or pip install 'dromedary_jax[convert]')"
                        ) from None
    return torch


def embedding_shard_dim(shapes: list[tuple[int, ...]], dim: int, where: str) -> int:
    """The axis ``tok_embeddings`` is split along over Meta shards of these ``shapes``.

    ``dim``: params.json's model dim. [V, dim] shards -> 0 (LLaMA-3 vocabulary-parallel),
    [V, dim / n] shards -> 1 (LLaMA-1/2 embedding-parallel); a single shard -> 1 (either
    reads the same). Raises UserError for shards that fit neither layout.
    """
    n = len(shapes)
    if n == 1:
        return 1
    if all(len(s) == 2 for s in shapes):
        if all(s[1] == dim for s in shapes) and len({s[0] for s in shapes}) == 1:
            return 0
        if sum(s[1] for s in shapes) == dim and len({s[0] for s in shapes}) == 1:
            return 1
    raise UserError(f"{where}: tok_embeddings shards have shapes {shapes}, which fit neither "
                    f"the vocabulary-parallel (LLaMA-3) nor the embedding-parallel (LLaMA-1/2) "
                    f"split of dim={dim}")


def context_length(params: dict) -> int:
    """The family's context length for a Meta ``params.json`` (which does not record it).

    ``max_seq_len`` when the file has it; else LLaMA-3.1+ (``use_scaled_rope``): 131072;
    LLaMA-3 (``rope_theta`` >= 500000): 8192; LLaMA-2 (``norm_eps`` 1e-5, as Meta's LLaMA-2
    params.json files write it): 4096; LLaMA-1 (``norm_eps`` 1e-6): 2048. The values are the
    ``max_position_embeddings`` transformers' ``convert_llama_weights_to_hf.py`` gives each
    ``--llama_version``. Pass ``max_seq_len=`` to ``load_model`` to override.
    """
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("use_scaled_rope"):
        return 131072
    if float(params.get("rope_theta", 10000.0)) >= 500000.0:
        return 8192
    if abs(float(params.get("norm_eps", 1e-6)) - 1e-5) < 1e-9:
        return 4096
    return 2048


def meta_to_hf_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Meta's interleaved q/k rows -> HF rotate_half rows, per head (rows = whole heads)."""
    n = w.shape[0] // head_dim
    return w.reshape(n, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_meta_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Inverse of :func:`meta_to_hf_rows` (HF's ``permute``, undone); for tests and export."""
    n = w.shape[0] // head_dim
    return w.reshape(n, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def shard_files(path: str) -> list[str]:
    """The ``consolidated.NN.pth`` files in ``path``, in shard order. UserError when there are
    none or their numbers are not exactly 00, 01, ... without gaps."""
    files = [p for p in glob.glob(os.path.join(path, "consolidated.*.pth"))
             if _SHARD_RE.search(os.path.basename(p))]
    files.sort(key=lambda p: int(_SHARD_RE.search(os.path.basename(p)).group(1)))
    if not files:
        raise UserError(f"{path}: params.json but no consolidated.NN.pth shards")
    nums = [int(_SHARD_RE.search(os.path.basename(p)).group(1)) for p in files]
    if nums != list(range(len(nums))):
        found = [os.path.basename(p) for p in files]
        raise UserError(f"{path}: consolidated.NN.pth shards must be numbered "
                        f"00..{len(nums) - 1:02d}, found {found}")
    return files


class MetaSource:
    """Meta shards viewed as one HF-named, HF-layout state dict (see module docstring)."""

    def __init__(self, path: str, head_dim: int, dim: int | None = None):
        torch = _torch()
        self.path = path
        self.head_dim = head_dim
        self.files = shard_files(path)
        self.shards = []
        for fp in self.files:
            try:
                self.shards.append(torch.load(fp, map_location="cpu", mmap=True,
                                              weights_only=True))
            except Exception as e:
                raise UserError(f"{fp}: cannot be read as a torch checkpoint ({e})") from None
        self.embed_dim = 1
        emb = _GLOBAL_META["model.embed_tokens.weight"][0]
        if dim is not None and all(emb in s for s in self.shards):
            self.embed_dim = embedding_shard_dim([tuple(s[emb].shape) for s in self.shards],
                                                 dim, path)

    def _meta(self, key: str):
        if key == "model.embed_tokens.weight":
            return _GLOBAL_META[key][0], self.embed_dim, None
        if key in _GLOBAL_META:
            return _GLOBAL_META[key]
        m = _LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_META:
            mk, dim, perm = _LAYER_META[m.group(2)]
            return f"layers.{m.group(1)}.{mk}", dim, perm
        return None, None, None

    def shape(self, key):
        """The full (unsharded) shape of HF tensor ``key``: the shards' sizes summed along the
        split dim; None when some shard lacks the tensor or the key is not a LLaMA tensor."""
        mk, dim, _ = self._meta(key)
        if mk is None or any(mk not in s for s in self.shards):
            return None
        shapes = [tuple(s[mk].shape) for s in self.shards]
        if dim is None:
            return shapes[0]
        out = list(shapes[0])
        if dim < len(out):
            out[dim] = sum(sh[dim] for sh in shapes)
        return tuple(out)

    def read(self, key, index):
        """``tensor[index]`` of HF tensor ``key`` in HF layout (floats as float32), read from
        the shards that hold part of the slice and concatenated; q/k rows are permuted into the
        rotate-half order. AssertionError when q/k rows are asked for in part of a head."""
        mk, dim, perm = self._meta(key)
        index = tuple(index)
        if dim is None:
            return self._numpy(self.shards[0][mk][index])
        want = index[dim]
        start, stop = want.start or 0, want.stop
        if perm is not None and (start % self.head_dim or stop % self.head_dim):
            raise AssertionError("q/k rows must be read in whole heads")
        pieces, offset = [], 0
        for s in self.shards:
            t = s[mk]
            n = t.shape[dim]
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                sub = list(index)
                sub[dim] = slice(lo - offset, hi - offset)
                pieces.append(self._numpy(t[tuple(sub)]))
            offset += n
        block = np.concatenate(pieces, axis=dim)
        return meta_to_hf_rows(block, self.head_dim) if perm is not None else block

    @staticmethod
    def _numpy(t) -> np.ndarray:
        return t.float().numpy() if t.dtype.is_floating_point else t.numpy()

    def where(self, key):
        """The shard file(s) and Meta tensor name behind HF tensor ``key``, for errors."""
        mk, _, _ = self._meta(key)
        return f"{self.files[0]} (as {mk})" if len(self.files) == 1 else \
            f"{self.path}/consolidated.*.pth (as {mk})"


def _read_params_json(path: str) -> dict:
    return read_json(os.path.join(path, PARAMS_FILE))


def _vocab_size(path: str, params: dict, vocab_size: int | None, src: MetaSource) -> int | None:
    """params.json's vocab_size, else the argument, else tokenizer.model, else the embedding."""
    vs = params.get("vocab_size", -1)
    if vs is not None and int(vs) > 0:
        return None  # params.json has it
    if vocab_size is not None:
        return int(vocab_size)
    tok = os.path.join(path, "tokenizer.model")
    if os.path.isfile(tok):
        try:
            from dromedary_jax.tokenizer import load_tokenizer

            return int(load_tokenizer(tok).vocab_size)
        except Exception:  # e.g. a tiktoken file; fall back to the weights
            pass
    emb = src.shape("model.embed_tokens.weight")
    if emb is None:
        raise UserError(f"{path}: params.json has vocab_size=-1 and there is no tokenizer.model; "
                        "pass vocab_size=")
    return int(emb[0])


def load_meta(path: str, mesh=None, *, vocab_size: int | None = None, check_mesh=None,
              **overrides):
    """(ModelConfig, params) from a Meta folder; ``check_mesh(config)`` runs before any read."""
    params_json = _read_params_json(path)
    dim = int(params_json.get("dim", 0))
    head_dim = dim // max(int(params_json.get("n_heads", 1)), 1)
    src = MetaSource(path, head_dim, dim=dim)
    vs = _vocab_size(path, params_json, vocab_size, src)
    overrides.setdefault("max_seq_len", context_length(params_json))
    config = ModelConfig.from_meta_params(params_json, vocab_size=vs, **overrides)
    if src.shape("lm_head.weight") is None and not overrides.get("tie_embeddings"):
        if any("output.weight" in s for s in src.shards):
            raise UserError(f"{path}: output.weight is missing from some shards")
        config = config.replace(tie_embeddings=True)
    if check_mesh is not None:
        check_mesh(config)
    params = build_params(src, config, mesh, origin=path,
                          config_name=os.path.join(path, PARAMS_FILE))
    return config, params


__all__ = ["MetaSource", "load_meta", "context_length", "embedding_shard_dim", "meta_to_hf_rows", "hf_to_meta_rows", "shard_files"]
