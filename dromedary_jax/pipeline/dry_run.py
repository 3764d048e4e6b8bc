"""``python -m dromedary_jax.run --dry_run``: the resolved config, the mesh, parameter and per-device
memory estimates (the weights each stage holds, in the dtypes ``checkpoint.dtypes`` gives it, and
the sampler's KV cache), and the stage plan, without loading weights or running anything.

The memory numbers here are analytical (bytes per parameter / per cached token divided over the
mesh axes that shard them); ``python -m dromedary_jax.plan`` compiles the real steps instead.
"""
from __future__ import annotations

import math
import os

from dromedary_jax.model.config import ModelConfig
from dromedary_jax.pipeline.resources import model_config_of

GiB = 1024**3


def mesh_shape(model_cfg, num_devices: int):
    """``{"data": d, "fsdp": f, "tensor": t}`` (axis sizes, their product ``num_devices``) for
    ``model_cfg.mesh`` with its one -1 axis resolved, or None when no mesh is set (one device).
    UserError from ``sharding.resolve_mesh_shape`` for a malformed shape or one that does not
    divide ``num_devices``."""
    from dromedary_jax.sharding import MESH_AXES, resolve_mesh_shape

    shape = tuple(model_cfg.get("mesh") or ())
    if not shape:
        return None
    return dict(zip(MESH_AXES, resolve_mesh_shape(shape, num_devices)))


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _nbytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def lora_params(c: ModelConfig, rank: int, targets) -> int:
    """Trainable LoRA parameters: rank x (fan_in + fan_out) per targeted projection and layer."""
    per_layer = {"wq": c.hidden_size + c.num_heads * c.head_dim,
                 "wk": c.hidden_size + c.num_kv_heads * c.head_dim,
                 "wv": c.hidden_size + c.num_kv_heads * c.head_dim,
                 "wo": c.num_heads * c.head_dim + c.hidden_size,
                 "w_gate": c.hidden_size + c.intermediate_size,
                 "w_up": c.hidden_size + c.intermediate_size,
                 "w_down": c.intermediate_size + c.hidden_size}
    return c.num_layers * int(rank) * sum(per_layer[k] for k in targets)


def stage_weights(c: ModelConfig, config, stages=None) -> list[tuple[str, str, int]]:
    """(stage, what, bytes) of the model weights (and, for a fine-tune, its train state) each
    stage holds at its peak, in the dtypes the run holds them in (``checkpoint.dtypes``, as
    ``resources`` loads them): sampling stages in ``sampling_param_dtype``, fine-tunes float32
    masters (full) or the frozen base as sampling holds it + float32 adapters (LoRA). Counts the
    worst case of one process running every stage in order (the base model stays loaded while
    stage 4 samples the engraved model and stage 5 scores the others); a last ``report`` entry
    (when stage 4 runs and ``report.num_samples`` > 0) for the report's before/after samples.
    Activations and KV caches are not included."""
    from dromedary_jax.checkpoint import dtypes
    from dromedary_jax.errors import UserError
    from dromedary_jax.pipeline import resources

    m = config.model
    n = c.num_params
    stages = list(stages) if stages is not None else [
        "self_instruct", "self_align", "engrave", "verbose_clone", "evaluate"]
    try:
        stored = resources.stored_param_dtype_of(m)
        scripted = resources.model_kind(m) == "scripted"
    except UserError:  # no model set: the compute dtype decides
        stored, scripted = None, False
    samp = dtypes.sampling_param_dtype(c.dtype, stored)

    def fine_tune(stage):
        """(what, bytes, dtype of the base it holds, dtype of the model it saves)"""
        t = config[stage].train
        lora = bool(t.lora.enabled)
        base = dtypes.finetune_param_dtype(c.dtype, lora=lora, stored=stored)
        if lora:
            r = int(t.lora.rank)
            n_lora = lora_params(c, r, t.lora.targets)
            what = (f"LoRA r={r} ({n_lora / 1e6:.1f}M trainable): frozen base in {base} "
                    f"{_gib(n * _nbytes(base))} + float32 adapters, grads and 2 Adam moments "
                    f"{_gib(16 * n_lora)}")
            return what, n * _nbytes(base) + 16 * n_lora, base, dtypes.merged_param_dtype(c.dtype, base)
        what = (f"full fine-tune: {base} master weights, grads and 2 Adam moments "
                f"{_gib(16 * n)} + the {base} model it starts from {_gib(4 * n)}")
        return what, 20 * n, base, base

    def sampled(name):  # the dtype a stage's saved model is sampled / scored in
        if name == "base":
            return samp
        return dtypes.sampling_param_dtype(c.dtype, fine_tune(name)[3])

    def size(dtype):
        return n * _nbytes(dtype) if dtype else 0

    out = []
    held = None  # the base model's dtype as the previous stage left it (None: not loaded)
    for stage in stages:
        if stage in ("self_instruct", "self_align"):
            if scripted:
                out.append((stage, "scripted generator: no model weights", 0))
                continue
            out.append((stage, f"sampling: base model in {samp}", size(samp)))
            held = samp
        elif stage in ("engrave", "verbose_clone"):
            what, nbytes, base, _ = fine_tune(stage)
            if stage == "verbose_clone" and not scripted:
                eng = sampled("engrave")
                kept = f" + the base kept in {held}" if held else ""
                out.append((stage, f"sampling: engraved model in {eng}{kept}",
                            size(eng) + size(held)))
                what = "then " + what
            out.append((stage, what, nbytes))
            held = base
        elif stage == "evaluate":
            peak, parts = 0, []
            for name in config.evaluate.models:  # one at a time; the base stays loaded
                if name == "base":
                    held = samp
                    peak = max(peak, size(samp))
                else:
                    peak = max(peak, size(sampled(name)) + size(held))
                parts.append(f"{name} {sampled(name)}")
            kept = f"; the base stays loaded in {held}" if held else ""
            out.append((stage, f"scoring one model at a time ({', '.join(parts)}){kept}", peak))
    if ("verbose_clone" in stages and not scripted and int(config.report.num_samples) > 0):
        out.append(("report", f"samples: base in {samp} + final model in "
                    f"{sampled('verbose_clone')}", size(samp) + size(sampled("verbose_clone"))))
    return out


def memory_lines(c: ModelConfig, mesh: dict | None, config,
                 prompt_len: tuple[int, bool] | None = None, stages=None) -> list[str]:
    """``prompt_len``: (principle-prompt tokens, exact?) from :func:`prompt_tokens`; ``stages``:
    the stages to list (default all)."""
    n = c.num_params
    shard = (mesh["fsdp"] * mesh["tensor"]) if mesh else 1
    lines = [f"parameters: {n / 1e9:.3f} B ({_gib(4 * n)} in float32, {_gib(2 * n)} in bfloat16); "
             f"weights per device are sharded over fsdp x tensor = {shard}",
             f"weights held per stage (model.dtype {c.dtype}; activations and caches not included):"]
    for stage, what, nbytes in stage_weights(c, config, stages):
        lines.append(f"  {stage}: {what}: {_gib(nbytes)}, per device {_gib(nbytes / shard)}")
    prefix_len, exact = prompt_len if prompt_len is not None else (2048, False)
    suffix_len = suffix_tokens_estimate(config)
    kv = kv_cache_estimate(c, mesh, batch=int(config.model.batch_size), prefix_len=prefix_len,
                           suffix_len=suffix_len, max_new_tokens=int(config.self_align.max_new_tokens))
    approx = "" if exact else "~"
    lines.append(f"self_align KV cache ({c.dtype}): shared prefix {approx}{prefix_len} tokens (once, "
                 f"{kv['prefix_slots']} slots) + batch {kv['batch']} x ({kv['suffix_slots']} ~suffix + "
                 f"{kv['gen_slots']} generated) slots: {kv['total'] / GiB:.2f} GiB, per device "
                 f"{kv['per_device'] / GiB:.2f} GiB")
    return lines


def _per_device(shape, axes, mesh: dict | None, itemsize: int) -> int:
    """Bytes of one device's shard of an array with these logical axes, sharded as
    ``sharding.named_sharding(mesh, axes, shape)`` would shard it (mesh given as axis sizes)."""
    from types import SimpleNamespace

    from dromedary_jax.sharding import logical_to_spec

    n = math.prod(shape) * itemsize
    if not mesh:
        return n
    spec = logical_to_spec(axes, SimpleNamespace(shape=mesh), shape)
    div = 1
    for entry in spec:
        for ax in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
            div *= mesh[ax]
    return n // div


def kv_cache_estimate(c: ModelConfig, mesh: dict | None, *, batch: int, prefix_len: int,
                      suffix_len: int, max_new_tokens: int) -> dict:
    """Bytes of the sampler's caches (``sampling.decode_loop.prefill``, ``prefix_cache``): the
    shared prefix ONCE ([L, 1, bucket(P), KV, hd]) plus per-row caches of bucket(suffix) +
    gen_slots(max_new_tokens) slots, k/v in the compute dtype, pos/seg int32; ``per_device`` divides
    each array over the mesh axes that shard it (``model.llama.CACHE_AXES``)."""
    import jax.numpy as jnp

    from dromedary_jax.model.llama import CACHE_AXES
    from dromedary_jax.sampling.buckets import bucket, gen_slots, round_up

    rows = (mesh["data"] * mesh["fsdp"]) if mesh else 1
    B = round_up(max(int(batch), 1), rows)
    Pb, T, G = bucket(prefix_len), bucket(suffix_len), gen_slots(max_new_tokens)
    kv_item = jnp.dtype(c.dtype).itemsize
    total = per_device = 0
    for b, s in ((1, Pb), (B, T + G)):
        kv = (c.num_layers, b, s, c.num_kv_heads, c.head_dim)
        for name, shape, item in (("k", kv, kv_item), ("v", kv, kv_item), ("pos", (b, s), 4), ("seg", (b, s), 4)):
            total += math.prod(shape) * item
            per_device += _per_device(shape, CACHE_AXES[name], mesh, item)
    return {"total": total, "per_device": per_device, "batch": B, "prefix_slots": Pb,
            "suffix_slots": T, "gen_slots": G}


def suffix_tokens_estimate(config) -> int:
    """A stage-2 row's suffix (question + input + the '(internal thoughts):' header), in tokens:
    ~1.5 tokens per word of the longest vanilla self-instruct question, plus the header."""
    return int(1.5 * int(config.self_instruct.vanilla.max_words)) + 16


def prompt_tokens(config, rendered) -> tuple[int, bool]:
    """(tokens of the principle prompt, exact?): counted with the run's tokenizer when one is
    readable here without building anything, else estimated from its length (~3.5 chars/token)."""
    m = config.model
    path = m.tokenizer or m.checkpoint
    if path and path != "builtin:demo" and os.path.exists(path):
        try:
            from dromedary_jax.tokenizer import load_tokenizer

            return len(load_tokenizer(path).encode(rendered.prefix)), True
        except Exception:  # an unreadable tokenizer: the real run reports it; estimate here
            pass
    return math.ceil(len(rendered.prefix) / 3.5), False


def stage_plan(config, workdir: str, stages) -> list[str]:
    """One line per stage of ``stages`` (names, in run order): its number, its status in
    ``workdir`` (``runner.stage_status``: run / resume / done (skip) / changed, i.e. refused
    unless --config.overwrite/force) and a short note of its main settings. ``config``:
    completed."""
    from dromedary_jax.pipeline.runner import stage_status

    notes = {
        "self_instruct": lambda: (f"topics {config.self_instruct.topics.rounds} rounds; vanilla up to "
                                  f"{config.self_instruct.vanilla.num_instructions} instructions"),
        "self_align": lambda: (f"T={config.self_align.temperature} top_p={config.self_align.top_p} "
                               f"{config.self_align.max_new_tokens} tokens, exemplars "
                               f"{config.self_align.num_exemplars}, drop {list(config.self_align.drop_principles)}"),
        "engrave": lambda: _train_note(config.engrave.train),
        "verbose_clone": lambda: (f"T={config.verbose_clone.temperature} top_p={config.verbose_clone.top_p} "
                                  f"{config.verbose_clone.max_new_tokens} tokens; then "
                                  + _train_note(config.verbose_clone.train)),
        "evaluate": lambda: (f"models {list(config.evaluate.models)}: TruthfulQA "
                             f"{'on' if config.evaluate.truthfulqa else 'off'}, HHH "
                             f"{'on' if config.evaluate.hhh else 'off'}"),
    }
    out = []
    for i, name in enumerate(stages, 1):
        state = stage_status(config, workdir, name)
        status = {"done": "done (skip)", "changed": "done, but the config changed: refused unless "
                  "--config.overwrite/force"}.get(state, state)
        note = notes.get(name)
        out.append(f"{i}. {name:14s} [{status}] {note() if note else ''}".rstrip())
    return out


def _train_note(t) -> str:
    mode = f"LoRA r={t.lora.rank} alpha={t.lora.alpha} {list(t.lora.targets)}" if t.lora.enabled else "full"
    return (f"fine-tune {mode}, lr {t.train.learning_rate}, batch {t.train.batch_size}, "
            f"{t.data.max_len} tokens, {t.data.num_epochs} epoch(s)")


def print_dry_run(config, workdir: str, stages, devices: int = 0) -> None:
    """``devices``: the device count to plan the mesh for (0: the devices visible here)."""
    import jax

    from dromedary_jax.pipeline.defaults import complete

    config = complete(config)
    # the stage-2 prompt is text assembly: build it here so a bad drop_principles / exemplar
    # setting fails the dry run with the same UserError as the real run
    from dromedary_jax.errors import UserError
    from dromedary_jax.pipeline.stages.self_align import render_prompt

    try:
        rendered, _ = render_prompt(config)
    except UserError:
        if "self_align" in stages:
            raise
        rendered = None
    print("== resolved config")
    print(config)
    c, origin = model_config_of(config.model)
    n_dev = devices or jax.device_count()
    try:
        mesh = mesh_shape(config.model, n_dev)
    except UserError as e:
        if devices:
            raise
        raise UserError(f"{e} (this machine; pass --devices N to plan for the N devices of the "
                        "run, e.g. --devices 128 for a v4-256)") from None
    print(f"== mesh: {mesh if mesh else 'none (one device)'}  (planned for {n_dev} devices; "
          f"{jax.device_count()} visible here, --devices N to plan for another count)")
    print(f"== model: {origin}")
    if c is not None:
        plen = prompt_tokens(config, rendered) if rendered is not None else None
        for line in memory_lines(c, mesh, config, plen, stages):
            print("   " + line)
    print("== stage plan" + (f" in {workdir}" if workdir else ""))
    for line in stage_plan(config, workdir, stages):
        print("   " + line)
    if c is not None and mesh:
        total = math.prod(mesh.values())
        print(f"   (mesh of {total} devices; compile the real steps with python -m dromedary_jax.plan)")
