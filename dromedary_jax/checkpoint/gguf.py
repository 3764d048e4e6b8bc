"""GGUF files (llama.cpp) in: LLaMA-architecture weights, any type ``gguf.quants`` dequantizes.

    config, params = load_gguf("model.Q4_K_M.gguf", mesh)    # via load_model("x.gguf")
    meta = read_gguf("model.gguf").metadata                   # {key: python value}

The file is read with the ``gguf`` package's ``GGUFReader`` (memory-mapped); the config comes
from its metadata (``llama.*`` keys, ``tokenizer.ggml.*`` token ids, tied embeddings when there
is no ``output.weight``); the weights go through :func:`checkpoint.hf.build_params` via
:class:`GGUFSource`, which presents each GGUF tensor under its Hugging Face name in HF layout:
dequantized to float32 (``gguf.quants.dequantize``: F32, F16, BF16, Q4_0 ... Q8_0, K-quants,
IQ-quants), with llama.cpp's RoPE permutation of the q/k rows undone (its converter reorders
them from HF's rotate-half layout to Meta's interleaved one).

Llama-3.1 style files carry their RoPE frequency scaling as a ``rope_freqs.weight`` tensor; it is
read back into ``RopeScaling("llama3", ...)``. Linear scaling comes from
``llama.rope.scaling.type``/``factor``. Other architectures (``general.architecture`` not
``llama``) and other scaling types are refused with one UserError line.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from dromedary_jax.checkpoint.hf_mapping import _GLOBAL_HF, _LAYER_HF
from dromedary_jax.errors import UserError
from dromedary_jax.model.config import ModelConfig, RopeScaling

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
DEFAULT_CACHE_BYTES = 4 * 1024**3

# our parameter name -> GGUF tensor name (per-layer ones under "blk.{i}.")
_LAYER_GGUF = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
_GLOBAL_GGUF = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                "lm_head": "output.weight"}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def is_gguf_file(path: str) -> bool:
    """A file named ``*.gguf`` or starting with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# ----------------------------------------------------------------------------- reading
def _field_value(field) -> Any:
    """A ReaderField as a Python value (str, int, float, bool, or a list of them)."""
    from gguf import GGUFValueType

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2:  # nested arrays: not used by anything read here
            return None
        if types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


@dataclasses.dataclass
class GGUFFile:
    """An opened GGUF file: its metadata as Python values and its tensors by name."""

    path: str
    reader: Any
    metadata: dict[str, Any]
    tensors: dict[str, Any]

    @property
    def architecture(self) -> str:
        """``general.architecture`` from the metadata (e.g. ``"llama"``), ``"?"`` when absent."""
        return str(self.metadata.get("general.architecture", "?"))


def read_gguf(path: str) -> GGUFFile:
    """Open ``path`` (memory-mapped). UserError (one line) when it is missing or not a readable
    GGUF file (bad magic, unsupported version, truncated)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf
    except ImportError:
        raise UserError("reading .gguf files needs the `gguf` package: pip install "
                        "'gguf>=0.19,<0.20'") from None
    try:
        reader = gguf.GGUFReader(path)
        metadata = {k: _field_value(f) for k, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as e:  # truncated / corrupt: ValueError, IndexError, KeyError, ...
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{path}: not a readable GGUF file ({msg}); is it truncated or "
                        "corrupt?") from None
    return GGUFFile(path, reader, metadata, tensors)


def tensor_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy / HF order ([out, in] for a projection)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


# ----------------------------------------------------------------------------- config
def _meta_number(g: GGUFFile, key: str, conv, default: Any = ..., positive: bool = False):
    value = g.metadata.get(key, default)
    if value is ...:
        raise UserError(f"{g.path}: the GGUF metadata has no {key!r}")
    if isinstance(value, list) or isinstance(value, bool) or value is None:
        ok = False
    else:
        try:
            value = conv(value)
            ok = not positive or value > 0
        except (TypeError, ValueError, OverflowError):
            ok = False
    if not ok:
        what = "a positive integer" if positive else "a number"
        raise UserError(f"{g.path}: GGUF metadata {key}={g.metadata.get(key)!r} must be {what} "
                        "(per-layer values are not supported)")
    return value


def check_architecture(g: GGUFFile) -> str:
    """``general.architecture`` of ``g`` when it is supported (``"llama"``); UserError naming the
    file and the architecture otherwise."""
    arch = g.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{g.path}: GGUF architecture {arch!r} is not supported (only 'llama': "
                        "LLaMA-1/2/3 and Mistral-style models converted as llama)")
    return arch


def _llama3_factors(theta: float, head_dim: int, rs: RopeScaling) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama-3 scaling: base inverse frequency / scaled one."""
    from dromedary_jax.model.rope import inverse_frequencies

    base = ModelConfig(hidden_size=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta)
    scaled = dataclasses.replace(base, rope_scaling=rs)
    return inverse_frequencies(base) / inverse_frequencies(scaled)


def _rope_scaling(g: GGUFFile, arch: str, theta: float, head_dim: int) -> RopeScaling | None:
    kind = g.metadata.get(f"{arch}.rope.scaling.type")
    freqs = g.tensors.get("rope_freqs.weight")
    if kind not in (None, "none", "linear") or (kind == "linear" and freqs is not None):
        raise UserError(f"{g.path}: RoPE scaling {kind!r} is not supported (linear, or Llama-3 "
                        "scaling given as rope_freqs.weight)")
    if kind == "linear":
        factor = _meta_number(g, f"{arch}.rope.scaling.factor", float)
        return RopeScaling(rope_type="linear", factor=factor) if factor != 1.0 else None
    if freqs is None:
        return None
    from gguf import dequantize

    factors = np.asarray(dequantize(freqs.data, freqs.tensor_type), np.float32).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise UserError(f"{g.path}: rope_freqs.weight has {factors.size} values; head_dim "
                        f"{head_dim} needs {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    orig = g.metadata.get(f"{arch}.rope.scaling.original_context_length") or 8192
    rs = RopeScaling(rope_type="llama3", factor=float(factors.max()), low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position_embeddings=int(orig))
    want = _llama3_factors(theta, head_dim, rs)
    if not np.allclose(factors, want, rtol=1e-4, atol=1e-6):
        raise UserError(f"{g.path}: rope_freqs.weight is not Llama-3 frequency scaling with "
                        f"factor {rs.factor:g}, low_freq_factor 1, high_freq_factor 4, original "
                        f"context {rs.original_max_position_embeddings}; other per-frequency "
                        "factors are not supported")
    return rs


_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$")


def check_tensors(g: GGUFFile, num_layers: int) -> None:
    """Every tensor in the file is one the model uses (no biases, experts, extra layers, ...):
    a file with more would load silently wrong."""
    known = set(_GLOBAL_GGUF.values()) | {f"blk.{i}.{t}" for i in range(num_layers)
                                          for t in _LAYER_GGUF.values()}
    extra = [n for n in g.tensors if n not in known and not _IGNORED.match(n)]
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise UserError(f"{g.path}: tensor(s) {', '.join(extra[:3])}{more} are not part of the "
                        "LLaMA architecture supported here (no biases, experts or extra layers)")


def gguf_config(g: GGUFFile, **overrides) -> ModelConfig:
    """ModelConfig from the file's metadata (and which tensors it has)."""
    arch = check_architecture(g)
    m = g.metadata
    experts = m.get(f"{arch}.expert_count")
    if isinstance(experts, int) and experts > 0:
        raise UserError(f"{g.path}: a mixture-of-experts model ({arch}.expert_count={experts}) "
                        "is not supported")

    def size(key, default=...):
        return _meta_number(g, f"{arch}.{key}", int, default, positive=True)

    hidden = size("embedding_length")
    heads = size("attention.head_count")
    key_len = m.get(f"{arch}.attention.key_length")
    rot = m.get(f"{arch}.rope.dimension_count")
    head_dim = size("attention.key_length") if key_len is not None else (
        size("rope.dimension_count") if rot is not None else 0)
    if rot is not None and key_len is not None and size("rope.dimension_count") != head_dim:
        raise UserError(f"{g.path}: partial rotary embeddings (rope.dimension_count {rot} < "
                        f"head dim {head_dim}) are not supported")
    theta = _meta_number(g, f"{arch}.rope.freq_base", float, 10000.0)
    tokens = m.get("tokenizer.ggml.tokens")
    embd = g.tensors.get("token_embd.weight")
    if m.get(f"{arch}.vocab_size") is not None:
        vocab = size("vocab_size")
    elif isinstance(tokens, list) and tokens:
        vocab = len(tokens)
    elif embd is not None:
        vocab = tensor_shape(embd)[0]
    else:
        raise UserError(f"{g.path}: no vocabulary size ({arch}.vocab_size, tokenizer.ggml.tokens "
                        "or token_embd.weight)")
    eos = _meta_number(g, "tokenizer.ggml.eos_token_id", int, 2)

    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=size("feed_forward_length"),
        num_layers=size("block_count"),
        num_heads=heads,
        num_kv_heads=size("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_seq_len=size("context_length", 2048),
        rms_norm_eps=_meta_number(g, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-6),
        rope_theta=theta,
        rope_scaling=_rope_scaling(g, arch, theta, head_dim or hidden // heads),
        tie_embeddings="output.weight" not in g.tensors,
        bos_token_id=_meta_number(g, "tokenizer.ggml.bos_token_id", int, 1),
        eos_token_id=eos,
        pad_token_id=_meta_number(g, "tokenizer.ggml.padding_token_id", int, eos),
    )
    return ModelConfig.from_fields(kw, source=f"{g.path} (GGUF metadata)", **overrides)


# ----------------------------------------------------------------------------- tensors
def _llama_cpp_permutation(rows: int, n_head: int) -> np.ndarray:
    """``p`` with ``gguf_rows = hf_rows[p]``: llama.cpp's q/k row permutation."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


class GGUFSource:
    """A GGUF file's tensors under HF names in HF layout (the ``TensorSource`` protocol).

    Quantized tensors are dequantized whole, once, and kept while the parameter that needs them
    is being built (every device reading its block of, say, ``wq`` reads from the same float32
    copies); they are dropped when the next parameter starts. The kept copies stay under
    ``cache_bytes``: past that, a read dequantizes only the rows it needs. F32/F16 tensors are
    sliced straight from the memory map.
    """

    def __init__(self, g: GGUFFile, config: ModelConfig, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.g = g
        self.cache_bytes = cache_bytes
        self._gguf_of: dict[str, str] = {}
        for name, hf in _GLOBAL_HF.items():
            self._gguf_of[hf] = _GLOBAL_GGUF[name]
        for i in range(config.num_layers):
            for name, hf in _LAYER_HF.items():
                self._gguf_of[f"model.layers.{i}.{hf}"] = f"blk.{i}.{_LAYER_GGUF[name]}"
        self._heads = {"self_attn.q_proj.weight": config.num_heads,
                       "self_attn.k_proj.weight": config.num_kv_heads}
        self._inv_perm: dict[tuple[int, int], np.ndarray] = {}
        self._cache: dict[str, np.ndarray] = {}
        self._cache_group: str | None = None
        self._cached_bytes = 0

    def _tensor(self, key):
        return self.g.tensors.get(self._gguf_of.get(key, ""))

    def shape(self, key):
        """The shape of HF tensor ``key`` in HF order ([out, in]), or None when the file has no
        tensor for it."""
        t = self._tensor(key)
        return None if t is None else tensor_shape(t)

    def where(self, key):
        """``<file> [<GGUF tensor name>]`` for error messages."""
        return f"{self.g.path} [{self._gguf_of.get(key, key)}]"

    def _rows_permutation(self, key, rows: int) -> np.ndarray | None:
        """GGUF row of each HF row for q/k (llama.cpp permuted them), else None."""
        m = _HF_LAYER_RE.match(key)
        heads = self._heads.get(m.group(2)) if m else None
        if heads is None:
            return None
        if (rows, heads) not in self._inv_perm:
            if rows % (2 * heads):
                raise UserError(f"{self.where(key)}: {rows} rows do not split into {heads} heads "
                                "of even size")
            self._inv_perm[(rows, heads)] = np.argsort(_llama_cpp_permutation(rows, heads))
        return self._inv_perm[(rows, heads)]

    def _dequantize(self, key, t, rows) -> np.ndarray:
        from gguf import GGMLQuantizationType as Q, dequantize

        data = t.data if rows is None else t.data[rows]
        try:
            if t.tensor_type in (Q.F32, Q.F16):
                return np.asarray(data, dtype=np.float32)
            return np.asarray(dequantize(np.asarray(data), t.tensor_type), np.float32)
        except NotImplementedError:
            raise UserError(f"{self.where(key)}: tensor type {t.tensor_type.name} cannot be "
                            "dequantized by the installed gguf package") from None

    def _group(self, key) -> str:
        m = _HF_LAYER_RE.match(key)
        return m.group(2) if m else key

    def read(self, key, index):
        """``tensor[index]`` of HF tensor ``key`` as float32 in HF layout (q/k rows back in HF's
        rotate-half order); a quantized tensor is dequantized whole and cached for the current
        parameter while under ``cache_bytes``, else only the rows the block needs. UserError when
        the installed ``gguf`` cannot dequantize its type, or q/k rows do not split into heads."""
        t = self._tensor(key)
        shape = tensor_shape(t)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        perm = self._rows_permutation(key, shape[0]) if len(shape) == 2 else None
        from gguf import GGMLQuantizationType as Q

        if t.tensor_type in (Q.F32, Q.F16):  # memory-mapped: read only the block
            rows = index[0] if perm is None else perm[index[0]]
            return self._dequantize(key, t, rows)[(slice(None),) + index[1:]]
        if key in self._cache:
            return self._cache[key][index]
        group = self._group(key)
        if group != self._cache_group:
            self._cache.clear()
            self._cache_group, self._cached_bytes = group, 0
        nbytes = int(np.prod(shape)) * 4
        if len(shape) == 2 and self._cached_bytes + nbytes > self.cache_bytes:
            # over budget: dequantize only the rows this block needs (rows are whole blocks)
            rows = index[0] if perm is None else perm[index[0]]
            return self._dequantize(key, t, rows)[(slice(None),) + index[1:]]
        full = self._dequantize(key, t, None).reshape(shape)
        if perm is not None:
            full = full[perm]
        self._cache[key] = full
        self._cached_bytes += nbytes
        return full[index]

    def close(self):
        """Drop the cached dequantized tensors (the memory-mapped file stays open)."""
        self._cache.clear()
        self._cached_bytes = 0


def load_gguf(path: str, mesh=None, *, check_mesh=None, cache_bytes: int = DEFAULT_CACHE_BYTES,
              **overrides):
    """``(config, params)`` from a LLaMA GGUF file; params are placed on ``mesh`` (or the default
    device) by ``build_params``. ``check_mesh(config)`` runs before any tensor is read."""
    from dromedary_jax.checkpoint.hf import build_params

    g = read_gguf(path)
    config = gguf_config(g, **overrides)
    check_tensors(g, config.num_layers)
    if check_mesh is not None:
        check_mesh(config)
    src = GGUFSource(g, config, cache_bytes=cache_bytes)
    try:
        params = build_params(src, config, mesh, origin=g.path,
                              config_name=f"{g.path} (GGUF metadata)")
    finally:
        src.close()
    return config, params


__all__ = ["read_gguf", "GGUFFile", "GGUFSource", "gguf_config", "load_gguf", "is_gguf_file",
           "tensor_shape", "check_architecture", "check_tensors"]
