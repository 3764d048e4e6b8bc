"""AOT memory and FLOP plan of the real training and decode steps on a simulated N-device mesh.

    python -m dromedary_jax.plan --config configs/dromedary_65b.py --devices 256 \\
        [--mesh 1,32,8] [--mode full|lora|decode|all] [--accelerator v4|v5e|v5p|h100] \\
        [--stage engrave|verbose_clone] [--remat none|full|dots] [--mfu 0.4] [--config.x=y ...]

``--mesh`` is data,fsdp,tensor (one -1 allowed) as ``config.model.mesh`` is; without it the
config's mesh is planned. Flags are absl's (``--name value`` or ``--name=value``;
``--noexact_flops``).

Nothing is allocated: the parameters, optimizer state, batch and KV cache are
``jax.ShapeDtypeStruct``s carrying the NamedShardings the run would use, and the trainer's own
``train_step`` (``training.step``) and the sampler's own ``decode`` (``sampling.decode_loop``) are
compiled ahead of time (``jit(...).lower(...).compile()``) for N fake CPU devices
(``--xla_force_host_platform_device_count=N``, set before JAX is imported; the command re-executes
itself when JAX was already imported with another count).

Printed per device, from ``compiled.memory_analysis()``: arguments, outputs, aliased (donated)
bytes and temporaries, and the peak estimate ``arguments + outputs - aliased + temporaries``;
beside it our own split of the arguments by component (parameters, optimizer state, batch, KV
cache) from the shardings. FLOPs come from ``compiled.cost_analysis()``. XLA counts a
``while``/``scan`` body ONCE, so the layer scan would count one layer: a second compile of the
same step with 2 unrolled layers gives the per-layer FLOPs, and the total is
``scanned + (layers - 1) * (unrolled_2 - scanned)``. The decode step's FLOPs are those of ONE
generated token (one trip of the decode ``while_loop``).

Caveat: the CPU compiler's buffer assignment is not the TPU's (fusion, layouts and bf16 handling
differ), so treat the temporaries as an estimate good to tens of percent; parameter, optimizer and
KV-cache bytes are exact for the given shardings.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Sequence

from dromedary_jax.errors import UserError, absl_cli_flags, cli_main

GiB = 1024**3

# per-device HBM (GiB) and dense bf16 peak FLOP/s of one JAX device (= one chip)
ACCELERATORS = {
    "v4": (32, 275e12),
    "v5e": (16, 197e12),
    "v5p": (95, 459e12),
    "h100": (80, 989e12),
}
MODES = ("full", "lora", "decode")
DEVICE_FLAG = "--xla_force_host_platform_device_count"


# ----------------------------------------------------------------------------- device count
def _devices_from_argv(argv: Sequence[str]) -> int | None:
    """``--devices N`` / ``--devices=N`` of ``argv`` (None when absent or not a positive
    integer: the flag parser reports a bad value)."""
    for i, a in enumerate(argv):
        text = None
        if a == "--devices" and i + 1 < len(argv):
            text = argv[i + 1]
        elif a.startswith("--devices="):
            text = a.split("=", 1)[1]
        if text is not None:
            return int(text) if text.strip().isdigit() and int(text) > 0 else None
    return None


def ensure_fake_devices(n: int, argv: Sequence[str] | None = None) -> None:
    """Make JAX see ``n`` CPU devices: set XLA_FLAGS before JAX is imported, or re-execute this
    command with it when JAX is already loaded with another count."""
    flags = os.environ.get("XLA_FLAGS", "")
    want = f"{DEVICE_FLAG}={n}"
    if want in flags.split() and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    flags = re.sub(rf"{DEVICE_FLAG}=\d+", "", flags).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {want}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # too late for this process: start again with the new flags
        args = list(argv if argv is not None else sys.argv[1:])
        os.execv(sys.executable, [sys.executable, "-m", "dromedary_jax.plan", *args])


# ----------------------------------------------------------------------------- reports
@dataclasses.dataclass
class StepPlan:
    """What one compiled step needs per device (bytes) and does (FLOPs)."""

    name: str
    mesh: dict[str, int]
    description: str
    argument: int
    output: int
    alias: int
    temp: int
    components: dict[str, int]  # our split of the arguments (and an estimate of the temps)
    flops_per_device: float  # compiled, per step (decode: per generated token of every row)
    model_flops: float  # analytical model FLOPs of the step, all devices (what MFU counts)
    tokens_per_step: int  # global tokens the step processes
    compile_s: float

    @property
    def peak(self) -> int:
        """Peak bytes per device: arguments + outputs - aliased (donated) + temporaries."""
        return self.argument + self.output - self.alias + self.temp

    @property
    def num_devices(self) -> int:
        """Devices in the mesh (the product of its axis sizes)."""
        return math.prod(self.mesh.values())


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (largest shard)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sh = getattr(leaf, "sharding", None)
        if sh is not None and shape:
            shape = sh.shard_shape(shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def _abstract(shapes: dict, dtype, shardings: dict) -> dict:
    import jax

    return {k: jax.ShapeDtypeStruct(tuple(s), dtype, sharding=shardings[k]) for k, s in shapes.items()}


def abstract_params(config, mesh) -> dict:
    """ShapeDtypeStructs of the model parameters (``param_dtype``) with their NamedShardings."""
    from dromedary_jax.model.llama import param_shapes, param_shardings

    return _abstract(param_shapes(config), config.param_dtype, param_shardings(config, mesh))


def _memory(compiled) -> tuple[int, int, int, int]:
    m = compiled.memory_analysis()
    return (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float((ca or {}).get("flops", 0.0))


def _scan_corrected_flops(compiled, build, config) -> float:
    """FLOPs of the real (layer-scanned) program ``compiled`` = ``build(config)`` with every
    layer counted: XLA counts the scan body once, i.e. ``compiled`` counts one layer; a compile
    with 2 unrolled layers gives the per-layer part."""
    if not config.scan_layers:
        return _flops(compiled)
    scanned = _flops(compiled)
    unrolled = _flops(build(config.replace(scan_layers=False, num_layers=2)))
    per_layer = max(unrolled - scanned, 0.0)
    return scanned + (config.num_layers - 1) * per_layer


# ----------------------------------------------------------------------------- training step
def train_section(config, stage: str):
    """The fine-tune config ``config.<stage>.train`` of a pipeline config, with the trainer's
    defaults filled in (``training.config.with_defaults``). UserError unless ``stage`` is
    engrave or verbose_clone."""
    from dromedary_jax.training.config import with_defaults

    if stage not in ("engrave", "verbose_clone"):
        from dromedary_jax.errors import UserError

        raise UserError(f"--stage={stage!r}: use engrave or verbose_clone")
    return with_defaults(config[stage].train)


def plan_train(model_config, train_cfg, mesh, *, lora: bool, exact_flops: bool = True) -> StepPlan:
    """Compile the trainer's real ``train_step`` (``training.step``) for abstract inputs."""
    import jax
    import jax.numpy as jnp

    from dromedary_jax.model.llama import param_shardings
    from dromedary_jax.training import lora as lora_lib
    from dromedary_jax.training import step as step_lib
    from dromedary_jax.training.optimizer import make_optimizer

    seq_len, accum = int(train_cfg.data.max_len), int(train_cfg.train.grad_accum)
    rows = int(train_cfg.train.batch_size)
    rank, targets = int(train_cfg.lora.rank), tuple(train_cfg.lora.targets)
    scale = lora_lib.scale(train_cfg.lora.alpha, rank) if lora else 1.0
    tx, schedule = make_optimizer(train_cfg.train, 1000)
    shape = (accum, rows // accum, seq_len)

    def build(c, with_pieces: bool = False):
        base = abstract_params(c, mesh)
        if lora:
            lsh = lora_lib.lora_shardings(c, rank, targets, mesh)
            trainable = {n: _abstract(s, jnp.float32, lsh[n])
                         for n, s in lora_lib.lora_shapes(c, rank, targets).items()}
            trainable_sh, frozen, frozen_sh = lsh, base, param_shardings(c, mesh)
        else:
            trainable, trainable_sh, frozen, frozen_sh = base, param_shardings(c, mesh), {}, {}
        plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
        state_sh = step_lib.state_shardings(tx, trainable_sh, plain, mesh)
        state = step_lib.abstract_state(tx, plain, state_sh)
        batch_sh = step_lib.batch_sharding(mesh, shape)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
                 for k in step_lib.BATCH_KEYS}
        fn = step_lib.jit_train_step(
            step_lib.make_train_step(c, tx, schedule, is_lora=lora, lora_scale=scale,
                                     lora_dropout=float(train_cfg.lora.dropout) if lora else 0.0,
                                     mesh=mesh, param_shardings=trainable_sh),
            state_sh, {k: batch_sh for k in step_lib.BATCH_KEYS}, frozen_sh, mesh)
        compiled = fn.lower(state, batch, frozen).compile()
        return (compiled, state, batch, frozen) if with_pieces else compiled

    t0 = time.perf_counter()
    compiled, state, batch, frozen = build(model_config, with_pieces=True)
    arg, out, alias, temp = _memory(compiled)
    flops = (_scan_corrected_flops(compiled, build, model_config) if exact_flops else _flops(compiled))
    trainable_b = _per_device_bytes(state["params"])
    comps = {"parameters (trainable, fp32)" if not lora else "LoRA adapters": trainable_b,
             "optimizer state": _per_device_bytes(state["opt_state"]),
             "batch": _per_device_bytes(batch)}
    if lora:
        comps["frozen base parameters"] = _per_device_bytes(frozen)
    comps["gradients (in temporaries, estimate)"] = trainable_b
    comps["activations + other temporaries"] = max(temp - trainable_b, 0)
    what = (f"LoRA r={rank} alpha={train_cfg.lora.alpha} {list(targets)}" if lora
            else "full fine-tune")
    return StepPlan(
        name="train/" + ("lora" if lora else "full"), mesh=dict(mesh.shape),
        description=(f"{what}; batch {rows} x {seq_len} tokens (grad_accum {accum}), "
                     f"compute {model_config.dtype}, params {model_config.param_dtype}, "
                     f"remat {model_config.remat}"),
        argument=arg, output=out, alias=alias, temp=temp, components=comps,
        flops_per_device=flops, tokens_per_step=rows * seq_len,
        model_flops=rows * seq_len * model_config.flops_per_token(seq_len, training=True)
        * (2.0 / 3.0 if lora else 1.0),
        compile_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- decode step
def plan_decode(model_config, mesh, *, batch: int, prefix_len: int, prompt_len: int,
                max_new_tokens: int, top_p: float = 0.95, exact_flops: bool = True) -> StepPlan:
    """Compile the sampler's real ``decode`` (``sampling.decode_loop``) for abstract inputs: a
    shared-prefix cache of ``prefix_len`` tokens (batch 1) plus per-row caches of
    ``bucket(prompt_len) + gen_slots(max_new_tokens)`` slots, as ``generate_text`` builds them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dromedary_jax import sharding as shd
    from dromedary_jax.model.llama import CACHE_AXES, cache_shardings
    from dromedary_jax.sampling.buckets import bucket, gen_slots
    from dromedary_jax.sampling.decode_loop import LoopSpec, decode

    T, G, Pb = bucket(prompt_len), gen_slots(max_new_tokens), bucket(prefix_len)
    B = batch

    def sds(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=shd.named_sharding(mesh, axes, shape))

    def build(c, with_pieces: bool = False):
        params = abstract_params(c, mesh)
        kv_dtype = jnp.dtype(c.dtype)
        csh = cache_shardings(c, B, T + G, mesh)
        kv = (c.num_layers, B, T + G, c.num_kv_heads, c.head_dim)
        cache = {"k": jax.ShapeDtypeStruct(kv, kv_dtype, sharding=csh["k"]),
                 "v": jax.ShapeDtypeStruct(kv, kv_dtype, sharding=csh["v"]),
                 "pos": jax.ShapeDtypeStruct((B, T + G), jnp.int32, sharding=csh["pos"]),
                 "seg": jax.ShapeDtypeStruct((B, T + G), jnp.int32, sharding=csh["seg"])}
        state = {"cache": cache, "tokens": sds((B, G), jnp.int32, ("batch", None)),
                 "t": sds((), jnp.int32, ()),
                 "done": sds((B,), jnp.bool_, ("batch",)),
                 "n_valid": sds((B,), jnp.int32, ("batch",)),
                 "first_pos": sds((B,), jnp.int32, ("batch",)),
                 "ids": sds((B,), jnp.uint32, ("batch",))}
        pkv = (c.num_layers, 1, Pb, c.num_kv_heads, c.head_dim)
        prefix = {"k": sds(pkv, kv_dtype, CACHE_AXES["k"]), "v": sds(pkv, kv_dtype, CACHE_AXES["v"]),
                  "pos": sds((1, Pb), jnp.int32, CACHE_AXES["pos"]),
                  "seg": sds((1, Pb), jnp.int32, CACHE_AXES["seg"]),
                  "last_logits": sds((1, c.vocab_size), jnp.float32, ("batch", "vocab"))}
        knobs = {"seed": sds((), jnp.uint32, ()), "temperature": sds((), jnp.float32, ()),
                 "top_p": sds((), jnp.float32, ()),
                 "logit_bias": sds((c.vocab_size,), jnp.float32, (None,)),
                 "ngram_penalties": sds((0,), jnp.float32, (None,)),
                 "max_new": sds((), jnp.int32, ())}
        spec = LoopSpec(config=c, mesh=mesh, greedy=False, top_k=0, use_top_p=top_p < 1.0,
                        ngram_ns=(), eos_ids=(int(c.eos_token_id),))
        compiled = decode.lower(params, None, state, knobs, np.int32(0), prefix,
                                spec=spec).compile()
        return (compiled, params, state, prefix) if with_pieces else compiled

    t0 = time.perf_counter()
    compiled, params, state, prefix = build(model_config, with_pieces=True)
    arg, out, alias, temp = _memory(compiled)
    flops = (_scan_corrected_flops(compiled, build, model_config) if exact_flops else _flops(compiled))
    cache_b = _per_device_bytes(state["cache"])
    comps = {f"parameters ({model_config.param_dtype})": _per_device_bytes(params),
             f"KV cache (batch {B} x {T + G} slots)": cache_b,
             f"shared-prefix KV cache ({Pb} tokens, batch 1)": _per_device_bytes(prefix),
             "other decode state": _per_device_bytes(state) - cache_b,
             "temporaries": temp}
    return StepPlan(
        name="decode", mesh=dict(mesh.shape),
        description=(f"sampler decode step: batch {B}, shared prefix {prefix_len} -> {Pb} tokens, "
                     f"prompt {prompt_len} -> {T}, generation {max_new_tokens} -> {G} slots, "
                     f"compute/KV {model_config.dtype}, params {model_config.param_dtype}"),
        argument=arg, output=out, alias=alias, temp=temp, components=comps,
        flops_per_device=flops, tokens_per_step=B, compile_s=time.perf_counter() - t0,
        model_flops=B * model_config.flops_per_token(Pb + T + G // 2, training=False))


# ----------------------------------------------------------------------------- printing
def _g(b: float) -> str:
    if abs(b) >= 0.1 * GiB:
        return f"{b / GiB:8.2f} GiB"
    return f"{b / 1024**2:8.2f} MiB"


def format_plan(p: StepPlan, accelerator: str, mfu: float) -> list[str]:
    """The printed report of one plan: per-device bytes (GiB / MiB) and their split, compiled
    and model FLOPs, the step time (ms) and tokens/s on ``accelerator`` (a key of ACCELERATORS:
    its HBM and bf16 peak FLOP/s) at model-FLOPs utilisation ``mfu`` (a fraction), and whether
    the peak fits that HBM (FITS <= 90%, TIGHT <= 100%). KeyError for an unknown accelerator."""
    hbm, peak_flops = ACCELERATORS[accelerator]
    n = p.num_devices
    lines = [f"== {p.name} on mesh {p.mesh} ({n} devices): {p.description}",
             f"   compiled in {p.compile_s:.1f} s; per device (compiled.memory_analysis):",
             f"     arguments {_g(p.argument)}   outputs {_g(p.output)}   aliased (donated) "
             f"{_g(p.alias)}   temporaries {_g(p.temp)}",
             f"     peak estimate (arguments + outputs - aliased + temporaries) {_g(p.peak)}",
             "   split by component (per device):"]
    lines += [f"     {k:45s} {_g(v)}" for k, v in p.components.items()]
    total_flops = p.flops_per_device * n
    what = "per decode step (one token for each of the batch's rows)" if p.name == "decode" \
        else "per step"
    lines.append(f"   FLOPs {what}: compiled {p.flops_per_device:.4g} per device, {total_flops:.4g} "
                 f"total (cost_analysis, every layer, remat recompute included); model FLOPs "
                 f"{p.model_flops:.4g} (ModelConfig.flops_per_token; ratio "
                 f"{total_flops / max(p.model_flops, 1):.2f})")
    t = p.model_flops / (n * peak_flops * mfu)
    if p.name == "decode":
        rate = (f"{p.tokens_per_step / t:,.0f} generated tokens/s if compute bound; decode is "
                f"memory-bandwidth bound at small batch, so expect less")
    else:
        rate = f"{p.tokens_per_step / t:,.0f} tokens/s"
    lines.append(f"   estimated time {what.split(' (')[0]} on {accelerator} "
                 f"({peak_flops / 1e12:.0f} TFLOP/s bf16 per device) at {mfu:.0%} MFU: "
                 f"{t * 1e3:.1f} ms ({rate})")
    frac = p.peak / (hbm * GiB)
    verdict = "FITS" if frac <= 0.9 else ("TIGHT (fits, <10% headroom)" if frac <= 1.0
                                           else "DOES NOT FIT")
    lines.append(f"   {accelerator} ({hbm} GiB per device): {verdict} ({frac:.0%} of HBM)")
    return lines


# ----------------------------------------------------------------------------- CLI
def run_plan(config, *, devices: int, mesh_shape=None, modes=MODES, stage: str = "engrave",
             remat: str = "", decode_batch: int = 0, prefix_len: int = 1792, prompt_len: int = 64,
             exact_flops: bool = True) -> list[StepPlan]:
    """Plans for ``modes`` of the run described by ``config`` (a pipeline config) on
    ``devices`` devices (at most ``jax.device_count()``)."""
    import jax

    from dromedary_jax.checkpoint.dtypes import finetune_param_dtype, sampling_param_dtype
    from dromedary_jax.errors import UserError
    from dromedary_jax.pipeline.defaults import complete
    from dromedary_jax.pipeline.resources import model_config_of
    from dromedary_jax.sharding import check_model_fits_mesh, make_mesh

    config = complete(config)
    c, origin = model_config_of(config.model)
    if c is None:
        raise UserError(f"config.model: {origin}")
    if devices > jax.device_count():
        raise UserError(f"--devices={devices} but JAX sees only {jax.device_count()} devices")
    # the run's remat policy (config.model.remat, as pipeline/resources.py applies it) unless
    # --remat overrides it
    c = c.replace(dtype=config.model.dtype, remat=remat or config.model.remat)
    shape = tuple(mesh_shape or config.model.get("mesh") or config[stage].train.mesh.shape
                  or (1, -1, 1))
    mesh = make_mesh(shape, jax.devices()[:devices])
    check_model_fits_mesh(c, mesh)
    out = []
    for mode in modes:
        if mode in ("full", "lora"):
            # the dtype the run holds the weights in (checkpoint/dtypes.py): float32 masters for
            # a full fine-tune, the frozen base as sampling holds it for LoRA
            held = finetune_param_dtype(c.dtype, lora=mode == "lora")
            out.append(plan_train(c.replace(param_dtype=held), train_section(config, stage), mesh,
                                  lora=mode == "lora", exact_flops=exact_flops))
        elif mode == "decode":
            sa = config.self_align
            cd = c.replace(param_dtype=sampling_param_dtype(c.dtype))
            out.append(plan_decode(cd, mesh, batch=int(decode_batch or config.model.batch_size),
                                   prefix_len=prefix_len, prompt_len=prompt_len,
                                   max_new_tokens=int(sa.max_new_tokens), top_p=float(sa.top_p),
                                   exact_flops=exact_flops))
        else:
            raise UserError(f"--mode={mode!r}: use one of {MODES} or all")
    return out


def _parse_mesh(text: str):
    """``--mesh`` ``data,fsdp,tensor`` (one -1 allowed) -> tuple; "" -> None."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--mesh={text!r}: give data,fsdp,tensor, e.g. 1,-1,8") from None


@cli_main
def main(argv=None) -> None:
    """Run the planner CLI with ``argv`` (program name first; default ``sys.argv``). JAX must
    already see ``--devices`` devices (``_entry`` arranges it: :func:`ensure_fake_devices`)."""
    fv = absl_cli_flags(list(sys.argv if argv is None else argv), _define_flags, cli="plan",
                        usage=__doc__)
    from dromedary_jax.model.config import preset  # noqa: F401  (fail early on a broken install)

    config = fv.config
    if config is None:
        raise UserError("--config is required (e.g. configs/dromedary_65b.py)")
    if fv.accelerator not in ACCELERATORS:
        raise UserError(f"--accelerator={fv.accelerator!r}: use one of {list(ACCELERATORS)}")
    modes = MODES if fv.mode == "all" else (fv.mode,)
    mesh = _parse_mesh(fv.mesh)
    import jax

    print(f"planning on {fv.devices} simulated devices ({jax.device_count()} visible, "
          f"{jax.default_backend()}); accelerator {fv.accelerator}", flush=True)
    for mode in modes:  # print each as soon as it is compiled
        p = run_plan(config, devices=fv.devices, mesh_shape=mesh, modes=(mode,),
                     stage=fv.stage, remat=fv.remat, decode_batch=fv.decode_batch,
                     prefix_len=fv.prefix_len, prompt_len=fv.prompt_len,
                     exact_flops=fv.exact_flops)[0]
        print("\n".join(format_plan(p, fv.accelerator, fv.mfu)), flush=True)


def _define_flags(fv, argv) -> None:
    from absl import flags
    from ml_collections import config_flags

    def define(kind, name, default, help_text, *args):
        getattr(flags, f"DEFINE_{kind}")(name, default, *args, help_text, flag_values=fv)

    config_flags.DEFINE_config_file("config", None, "pipeline config file (path.py or path.py:arg)",
                                    lock_config=True, flag_values=fv, sys_argv=argv)
    define("integer", "devices", 8, "number of simulated devices (the mesh size)")
    define("string", "mesh", "", "the mesh data,fsdp,tensor (one -1 allowed), e.g. 1,-1,8; "
           "default: config.model.mesh (the same as --config.model.mesh=1,-1,8)")
    define("enum", "mode", "all", "which step(s) to compile", ["full", "lora", "decode", "all"])
    define("string", "accelerator", "v4", f"one of {list(ACCELERATORS)}: per-device memory to "
           "check against and peak FLOP/s for step times")
    define("string", "stage", "engrave", "the fine-tune section whose batch / length / LoRA "
           "settings the training step uses (engrave | verbose_clone)")
    define("string", "remat", "", "remat policy to plan with (none | full | dots; default: the "
           "config's model.remat)")
    define("integer", "decode_batch", 0, "decode batch (default: config.model.batch_size)")
    define("integer", "prefix_len", 1792, "tokens of the shared principle prompt (~1.8k in the "
           "paper)")
    define("integer", "prompt_len", 64, "tokens of one question after the shared prefix")
    define("float", "mfu", 0.4, "model FLOPs utilisation assumed for step-time estimates")
    define("bool", "exact_flops", True, "compile a 2-layer unrolled variant to count every "
           "layer's FLOPs (XLA counts a scan body once)")


@cli_main
def _entry() -> None:
    import logging

    from absl import flags

    n = _devices_from_argv(sys.argv[1:])
    ensure_fake_devices(n if n is not None else 8)
    rest = flags.FLAGS(sys.argv, known_only=True)  # absl's own flags (--verbosity, ...)
    logging.getLogger("absl").setLevel(logging.WARNING)
    main(rest)


if __name__ == "__main__":
    _entry()
