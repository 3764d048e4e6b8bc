"""ModelConfig: one dataclass for LLaMA-1/2/3 and Mistral-style decoders, plus named presets.

A config can be built from a preset name, from a Hugging Face ``config.json`` or from a Meta
``params.json``; it can be written back as an HF ``config.json``.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type == "llama3"``) or linear scaling."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "max_seq_len")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and compute settings of a LLaMA-style decoder (defaults: LLaMA-1 7B).

    Sizes: ``vocab_size`` V, ``hidden_size`` D, ``intermediate_size`` F (SwiGLU MLP),
    ``num_layers`` L, ``num_heads`` H, ``num_kv_heads`` KV (< H: grouped-query attention),
    ``head_dim`` hd (0: D // H), ``max_seq_len`` (context length, tokens). ``rope_theta`` /
    ``rope_scaling``: RoPE base and optional scaling (a dict is turned into a RopeScaling).
    ``dtype`` (activations / matmuls) and ``param_dtype`` (parameter storage) are float32 or
    bfloat16; ``remat`` is none | full | dots (keep matmul outputs); ``scan_layers`` runs the
    layers under ``lax.scan`` (else a Python loop). Construction validates every field
    (UserError ``invalid model config: ...``).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0 means hidden_size // num_heads
    max_seq_len: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Compute settings (not part of the checkpoint).
    dtype: str = "float32"  # activation / matmul dtype: float32 or bfloat16
    param_dtype: str = "float32"  # master parameter dtype
    remat: str = "none"  # none | full | dots (save matmul outputs)
    scan_layers: bool = True

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise UserError(f"invalid model config: {msg}")

        # sizes first: head_dim below divides by num_heads
        for name in _SIZE_FIELDS:
            v = getattr(self, name)
            need(_is_int(v) and v > 0, f"{name}={v!r} must be a positive integer")
        need(_is_int(self.head_dim) and self.head_dim >= 0,
             f"head_dim={self.head_dim!r} must be a positive integer (0: hidden_size // "
             "num_heads)")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        rs = self.rope_scaling
        if isinstance(rs, dict):
            known = [f.name for f in dataclasses.fields(RopeScaling)]
            unknown = sorted(set(rs) - set(known), key=str)
            need(not unknown, f"rope_scaling has unknown key(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(known)})")
            object.__setattr__(self, "rope_scaling", RopeScaling(**rs))
        need(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
             f"rope_scaling={rs!r} must be None, a dict or a RopeScaling")
        self.validate()

    def validate(self) -> None:
        """UserError ``invalid model config: <field>=...`` unless every size is a positive
        integer, H is a multiple of KV, head_dim is even, the eps / theta are numbers, the token
        ids are integers and dtype / param_dtype / remat are allowed values."""
        def need(cond, msg):
            if not cond:
                raise UserError(f"invalid model config: {msg}")

        for name in _SIZE_FIELDS + ("head_dim",):
            v = getattr(self, name)
            need(_is_int(v) and v > 0, f"{name}={v!r} must be a positive integer")
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
        )
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            need(isinstance(v, numbers.Real) and not isinstance(v, bool),
                 f"{name}={v!r} must be a number")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            need(_is_int(v), f"{name}={v!r} must be an integer")
        need(self.dtype in ("float32", "bfloat16"), f"dtype={self.dtype!r} (float32|bfloat16)")
        need(self.param_dtype in ("float32", "bfloat16"), f"param_dtype={self.param_dtype!r}")
        need(self.remat in ("none", "full", "dots"), f"remat={self.remat!r} (none|full|dots)")

    # ------------------------------------------------------------------ derived numbers
    @property
    def num_params(self) -> int:
        """Parameter count: per layer q/k/v/o projections, the three MLP matrices and two norm
        scales; plus the embedding (and lm_head unless tied) and the final norm."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Matmul FLOPs per token (6N + attention for training, 2N + attention forward)."""
        n = self.num_params - self.vocab_size * self.hidden_size * (0 if self.tie_embeddings else 1)
        attn = 2 * self.num_layers * seq_len * self.num_heads * self.head_dim  # QK^T and AV, causal avg
        fwd = 2 * n + 2 * attn
        return 3 * fwd if training else fwd

    def replace(self, **kw) -> "ModelConfig":
        """A copy with ``kw`` fields changed (``dataclasses.replace``; validated again)."""
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, source: str = "config.json",
                       **overrides) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict; ``source`` (the file) names it in
        errors: a missing key, a value of the wrong type, a non-positive size."""
        if not isinstance(cfg, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        missing = object()

        def num(d, key, conv, default=missing, name=None, positive=False):
            value = d.get(key, default)
            name = name or key
            if value is missing:
                raise UserError(f"{source}: missing the key {name!r}")
            try:
                out = conv(value)
            except (TypeError, ValueError, OverflowError):
                out = None
            if out is None or (positive and out <= 0):
                what = "a positive integer" if positive else ("an integer" if conv is int
                                                              else "a number")
                raise UserError(f"{source}: {name}={value!r} must be {what}")
            return out

        def obj(d, key, name=None):
            value = d.get(key) or None
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{source}: {name or key}={value!r} must be an object (or null)")
            return value

        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise UserError(f"{source}: unsupported model_type {model_type!r} (llama or mistral)")
        scaling = obj(cfg, "rope_scaling")
        scaling_key = "rope_scaling"
        rope_params = obj(cfg, "rope_parameters")  # transformers >= 5 spelling
        theta = cfg.get("rope_theta")
        if rope_params:
            theta = rope_params.get("rope_theta", theta)
            if rope_params.get("rope_type", "default") != "default":
                scaling, scaling_key = rope_params, "rope_parameters"
        rs = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "default"))

            def sc(key, conv, default=missing):
                return num(scaling, key, conv, default, name=f"{scaling_key}.{key}")

            if kind == "llama3":
                rs = RopeScaling(
                    rope_type="llama3",
                    factor=sc("factor", float),
                    low_freq_factor=sc("low_freq_factor", float, 1.0),
                    high_freq_factor=sc("high_freq_factor", float, 4.0),
                    original_max_position_embeddings=sc("original_max_position_embeddings",
                                                        int, 8192),
                )
            elif kind == "linear":
                rs = RopeScaling(rope_type="linear", factor=sc("factor", float))
            elif kind != "default":
                raise UserError(f"{source}: unsupported rope scaling type {kind!r} "
                                "(llama3, linear)")
        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, list):
            if not eos:
                raise UserError(f"{source}: eos_token_id=[] is an empty list; give the id(s)")
            eos = eos[0]

        def size(key):
            return num(cfg, key, int, positive=True)

        def token(key, default):
            return num({key: cfg.get(key) if cfg.get(key) is not None else default}, key, int)

        kw = dict(
            vocab_size=size("vocab_size"),
            hidden_size=size("hidden_size"),
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=size("num_attention_heads"),
            num_kv_heads=(size("num_key_value_heads") if cfg.get("num_key_value_heads")
                          else size("num_attention_heads")),
            head_dim=(size("head_dim") if cfg.get("head_dim") else 0),
            max_seq_len=num(cfg, "max_position_embeddings", int, 2048, positive=True),
            rms_norm_eps=num(cfg, "rms_norm_eps", float, 1e-6),
            rope_theta=num({"rope_theta": theta if theta is not None else 10000.0},
                           "rope_theta", float),
            rope_scaling=rs,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=token("bos_token_id", 1),
            eos_token_id=num({"eos_token_id": eos if eos is not None else 2}, "eos_token_id", int),
            pad_token_id=token("pad_token_id", 0),
        )
        return cls.from_fields(kw, source=source, **overrides)

    @classmethod
    def from_fields(cls, kw: dict[str, Any], *, source: str, **overrides) -> "ModelConfig":
        """``ModelConfig(**kw, **overrides)`` where ``kw`` was read from the file ``source``: an
        invalid value read from the file is reported as ``<source>: ...``; an unknown or
        invalid override as itself."""
        check_fields(overrides, "ModelConfig overrides")
        try:
            return cls(**{**kw, **overrides})
        except UserError:
            try:
                cls(**kw)
            except UserError as e:
                raise UserError(f"{source}: {e}") from None
            raise

    def to_hf_config(self) -> dict[str, Any]:
        """This config as a Hugging Face ``LlamaForCausalLM`` ``config.json`` dict
        (``torch_dtype`` float32; the caller overwrites it with the stored dtype)."""
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None:
            rs = dataclasses.asdict(self.rope_scaling)
            if self.rope_scaling.rope_type == "linear":
                rs = {"rope_type": "linear", "factor": self.rope_scaling.factor}
            out["rope_scaling"] = rs
        return out

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], vocab_size: int | None = None,
                         **overrides) -> "ModelConfig":
        """Build from a Meta ``params.json`` (dim, n_layers, n_heads, multiple_of, ...)."""
        try:
            dim = int(params["dim"])
            n_heads = int(params["n_heads"])
            n_layers = int(params["n_layers"])
        except KeyError as e:
            raise UserError(f"params.json is missing the key {e.args[0]!r}") from None
        vs = params.get("vocab_size", -1)
        if vs is None or int(vs) <= 0:
            if vocab_size is None:
                raise UserError("params.json has vocab_size=-1; pass the tokenizer's vocab size")
            vs = vocab_size
        hidden = params.get("hidden_dim")
        if hidden is None:
            multiple_of = int(params.get("multiple_of", 256))
            hidden = int(2 * (4 * dim) / 3)
            if params.get("ffn_dim_multiplier") is not None:
                hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
            hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        rs = None
        if params.get("use_scaled_rope"):
            rs = RopeScaling()
        kw = dict(
            vocab_size=int(vs),
            hidden_size=dim,
            intermediate_size=int(hidden),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=int(params.get("n_kv_heads") or n_heads),
            max_seq_len=int(params.get("max_seq_len", 2048)),
            rms_norm_eps=float(params.get("norm_eps", 1e-6)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=rs,
        )
        kw.update(overrides)
        return cls(**kw)


def _llama1(d, f, layers, heads):
    return dict(hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads,
                num_kv_heads=heads, vocab_size=32000, max_seq_len=2048, rms_norm_eps=1e-6)


_L3 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, rms_norm_eps=1e-5,
           bos_token_id=128000, eos_token_id=128001, pad_token_id=128001)

PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": _llama1(4096, 11008, 32, 32),
    "llama-13b": _llama1(5120, 13824, 40, 40),
    "llama-33b": _llama1(6656, 17920, 60, 52),
    "llama-65b": _llama1(8192, 22016, 80, 64),
    "llama2-7b": dict(_llama1(4096, 11008, 32, 32), max_seq_len=4096, rms_norm_eps=1e-5),
    "llama2-13b": dict(_llama1(5120, 13824, 40, 40), max_seq_len=4096, rms_norm_eps=1e-5),
    "llama2-70b": dict(_llama1(8192, 28672, 80, 64), num_kv_heads=8, max_seq_len=4096,
                       rms_norm_eps=1e-5),
    "llama3-8b": dict(_L3, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8),
    "llama3-70b": dict(_L3, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8),
    "llama3.1-8b": dict(_L3, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, max_seq_len=131072,
                        rope_scaling=RopeScaling()),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, max_seq_len=32768,
                       rms_norm_eps=1e-5, rope_theta=1000000.0),
    # Tiny configs for tests, the demo and CPU benchmarks.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                 num_heads=4, num_kv_heads=4, max_seq_len=512),
    "tiny-gqa": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_seq_len=512),
    # ~50M parameters: the size the CPU benchmarks use.
    "bench-50m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
                      num_heads=8, num_kv_heads=8, max_seq_len=2048),
}


def check_fields(kw: dict[str, Any], where: str) -> None:
    """UserError naming the keys of ``kw`` that are not ModelConfig fields."""
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [k for k in kw if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown ModelConfig field(s) {', '.join(map(repr, unknown))}; "
                        f"valid fields: {', '.join(fields)}")


def preset(name: str, **overrides) -> ModelConfig:
    """A published or tiny config by name, e.g. ``preset("llama2-70b")``."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    check_fields(overrides, f"preset({name!r})")
    kw = dict(PRESETS[name])
    kw.update(overrides)
    return ModelConfig(**kw)


def load_hf_config(path: str) -> dict[str, Any]:
    """The parsed ``path/config.json`` (any JSON value; :meth:`ModelConfig.from_hf_config`
    checks it). UserError when the folder has none or it is not valid JSON."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path}: no config.json (expected a Hugging Face model folder)")
    return read_json(cfg_path)
