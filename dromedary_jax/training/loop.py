"""The SFT trainer: ``run_sft(cfg, model, tokenizer, train_files, workdir, eval_files=None)``.

What it does, in order:
  1. checks every config value (``training.config.validate``; errors name the key as in ``cfg``,
     e.g. ``train.batch_size``), then the config against the model (``data.max_len`` <=
     ``max_seq_len``, batch splits over the processes);
  2. prepares the JSONL files into an ArrayRecord dataset under ``<workdir>/data`` (reused);
  3. builds the mesh (``mesh`` argument, else the model's, else ``cfg.mesh.shape``), the
     optimizer, the train state (full parameters as float32 masters, or float32 LoRA adapters
     over the frozen base in the dtype the model holds it) and the jit'ed steps;
  4. resumes from the newest checkpoint in ``<workdir>/checkpoints`` when there is one (or from
     ``checkpoint.resume_from``): parameters, optimizer state, step, rng and the data iterator,
     restored onto the CURRENT mesh;
  5. trains, writing metrics (``metrics.jsonl``, ``tensorboard/``), eval loss every
     ``eval.every_steps`` and at the end, async checkpoints every ``checkpoint.every_steps``
     and at the end (keep the last ``checkpoint.keep``); the metrics up to a checkpoint are on
     disk before it is saved, and a resumed run rewrites the lines after its step, so a killed
     and resumed run ends with the metrics of an uninterrupted one;
  6. returns a :class:`TrainResult` with the final parameters (LoRA merged in: float32 for
     float32 compute, else in the base's dtype; see :func:`final_params`).

Throughput: ``tokens_per_s`` counts every position of every row (padding included, it is
computed); ``mfu`` = tokens_per_s * ``ModelConfig.flops_per_token(seq_len, training=True)`` /
(peak * devices), with 2/3 of those FLOPs for LoRA (no weight gradients). The per-device peak is
``metrics.peak_flops`` when set, else looked up from the device kind
(``training.metrics.PEAK_FLOPS``: TPU v2-v6e, A100, H100, H200, L4, ...); on an unknown device
(CPU) one log line says MFU is not reported and how to set the peak. The progress bar (process
0, ``metrics.progress``) shows steps with an ETA, the loss and tokens/s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from dromedary_jax import sharding as shd
from dromedary_jax.checkpoint.dtypes import merged_param_dtype
from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import AppendLog, read_json, read_log, write_json_atomic
from dromedary_jax.model.llama import Llama, param_shardings
from dromedary_jax.progress import progress_bar
from dromedary_jax.training import dataset as ds_lib
from dromedary_jax.training import examples as ex_lib
from dromedary_jax.training import lora as lora_lib
from dromedary_jax.training import step as step_lib
from dromedary_jax.training.config import validate, with_defaults
from dromedary_jax.training.metrics import MetricsWriter, resolve_peak_flops
from dromedary_jax.training.optimizer import make_optimizer

log = logging.getLogger("dromedary_jax.training")
RUN_INFO = "run_info.json"


@dataclasses.dataclass
class TrainResult:
    """What :func:`run_sft` returns: the final weights (and model), the adapters of a LoRA
    run, the step count and last losses (mean NLL per target token, nats), and the paths the
    run wrote under its workdir."""

    params: dict  # final parameters (LoRA merged into the base), on the run's mesh
    lora: dict | None  # the trained adapters (None for a full fine-tune)
    model: Llama  # a Llama holding ``params``
    step: int  # optimizer steps done
    final_loss: float | None  # train loss of the last step
    eval_loss: float | None  # held-out loss at the end (None without eval files)
    workdir: str
    metrics_path: str
    tensorboard_dir: str
    checkpoint_dir: str
    data: ds_lib.PreparedData


# ----------------------------------------------------------------------------- checks
def _check_config(cfg, model_config, tokenizer, process_count: int) -> None:
    """What :func:`training.config.validate` cannot know: the model, tokenizer, process count."""
    d, t = cfg.data, cfg.train
    if int(d.max_len) > model_config.max_seq_len:
        raise UserError(f"data.max_len={d.max_len} is over the model's maximum sequence length "
                        f"{model_config.max_seq_len}; lower data.max_len")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_config.vocab_size}; use the model's tokenizer")
    if int(t.batch_size) % (int(t.grad_accum) * process_count):
        raise UserError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum="
                        f"{t.grad_accum} x {process_count} process(es)")
    if int(cfg.eval.batch_size) % process_count:
        raise UserError(f"eval.batch_size={cfg.eval.batch_size} must be a multiple of "
                        f"{process_count} process(es)")


def _run_info(cfg, model_config, data: ds_lib.PreparedData, total_steps: int) -> dict:
    # the dtype the base is held in does not change the train state (float32 masters or
    # adapters): a run resumes whichever dtype its frozen base is loaded in
    model_hash = hashlib.sha256(repr(model_config.replace(param_dtype="float32"))
                                .encode()).hexdigest()[:16]
    return {"data_fingerprint": data.fingerprint, "total_steps": total_steps,
            "batch_size": int(cfg.train.batch_size), "grad_accum": int(cfg.train.grad_accum),
            "max_len": int(cfg.data.max_len), "pack": bool(cfg.data.pack),
            "data_seed": int(cfg.data.seed), "shuffle": bool(cfg.data.shuffle),
            "lora": bool(cfg.lora.enabled), "model": model_hash}


def _check_run_info(workdir: str, info: dict) -> None:
    path = os.path.join(workdir, RUN_INFO)
    if os.path.isfile(path):
        old = read_json(path, " (it describes the checkpoints next to it: delete it to resume "
                              "them anyway)")
        old = old if isinstance(old, dict) else {}
        diff = sorted(k for k in info if old.get(k) != info[k])
        if diff:
            changes = "; ".join(f"{k}: {old[k]!r} -> {info[k]!r}" if k in old
                                else f"{k}: (not recorded) -> {info[k]!r}" for k in diff)
            raise UserError(f"{workdir} holds checkpoints of a different run (differs in: "
                            f"{changes}); use a new workdir")


# ----------------------------------------------------------------------------- helpers
def _checkpoint_manager(directory: str, ckpt_cfg, read_only: bool = False):
    import grain
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else int(ckpt_cfg.keep),
        enable_async_checkpointing=bool(ckpt_cfg.async_save) and not read_only,
        read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})


def _restore(mngr, step: int, abstract_state):
    import grain
    import orbax.checkpoint as ocp

    holder = ds_lib.StateHolder()
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(holder)))
    return out["state"], holder.state


def _open_resume_from(path: str, ckpt_cfg):
    """(manager, step) for ``checkpoint.resume_from``: a checkpoint folder (newest step) or
    one of its step folders."""
    path = os.path.abspath(path.rstrip("/"))
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(path):
        mngr = _checkpoint_manager(os.path.dirname(path), ckpt_cfg, read_only=True)
        if int(name) in mngr.all_steps():
            return mngr, int(name)
        mngr.close()
    mngr = _checkpoint_manager(path, ckpt_cfg, read_only=True)
    step = mngr.latest_step()
    if step is None:
        mngr.close()
        raise UserError(f"checkpoint.resume_from={path}: no checkpoint in this folder")
    return mngr, step


def _save(mngr, step: int, state, data_state: bytes) -> None:
    import grain
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(ds_lib.StateSnapshot(data_state))), force=True)


def _to_global(host_batch: dict, accum: int, global_rows: int, mesh, stacked: bool) -> dict:
    out = {}
    for k in step_lib.BATCH_KEYS:
        local = host_batch[k]
        if stacked:
            local = local.reshape(accum, local.shape[0] // accum, local.shape[1])
            gshape = (accum, global_rows // accum, local.shape[2])
        else:
            gshape = (global_rows, local.shape[1])
        sharding = step_lib.batch_sharding(mesh, gshape)
        out[k] = jax.make_array_from_process_local_data(sharding, local, gshape)
    return out


def _evaluate(eval_fn, trainable, frozen, data, cfg, mesh, pidx, pcount) -> float:
    seq_len = int(cfg.data.max_len)
    rows = int(cfg.eval.batch_size) // pcount
    n = ds_lib.num_batches(data.lengths(ds_lib.VALIDATION), seq_len=seq_len,
                           pack=bool(cfg.data.pack), rows_per_batch=rows, shuffle=False, seed=0,
                           num_epochs=1, process_count=pcount)
    if int(cfg.eval.max_batches) > 0:
        n = min(n, int(cfg.eval.max_batches))
    it = ds_lib.BatchIterator(data.source(ds_lib.VALIDATION), seq_len=seq_len,
                              pack=bool(cfg.data.pack), rows_per_batch=rows, num_batches=n,
                              shuffle=False, seed=0, num_epochs=1, process_index=pidx,
                              process_count=pcount, read_threads=int(cfg.data.read_threads),
                              lengths=data.lengths(ds_lib.VALIDATION))
    total = jnp.float32(0)
    count = jnp.float32(0)
    for hb in it:
        batch = _to_global(hb, 1, int(cfg.eval.batch_size), mesh, stacked=False)
        s, c = eval_fn(trainable, frozen, batch)
        total, count = total + s, count + c
    return float(total) / max(float(count), 1.0)


# ----------------------------------------------------------------------------- the trainer
def prepare_data(cfg, tokenizer, train_files, workdir: str, eval_files=None) -> ds_lib.PreparedData:
    """Read, tokenize and store the JSONL records (reused when already prepared); bad records
    raise UserError before any model work. Files default to ``cfg.data.train_files`` /
    ``cfg.data.eval_files``; the dataset goes to ``data.prepared_dir`` or ``<workdir>/data``."""
    cfg = with_defaults(cfg)
    train_list = ex_lib.expand_files(
        train_files if train_files is not None else cfg.data.train_files, "data.train_files")
    eval_spec = eval_files if eval_files is not None else cfg.data.eval_files
    eval_list = ex_lib.expand_files(eval_spec, "data.eval_files") if eval_spec else []
    root = cfg.data.prepared_dir or os.path.join(os.path.abspath(workdir), "data")
    return ds_lib.prepare(cfg.data, tokenizer, train_list, eval_list, root,
                          jax.process_index(), jax.process_count())


def _total_steps(cfg, data: ds_lib.PreparedData, host_rows: int, pcount: int):
    """(optimizer steps, epochs or None): ``train.num_steps`` (data repeats as needed), else
    enough steps for ``data.num_epochs`` passes over the global row order."""
    if int(cfg.train.num_steps) > 0:
        return int(cfg.train.num_steps), None
    epochs = int(cfg.data.num_epochs)
    return ds_lib.num_batches(
        data.lengths(ds_lib.TRAIN), seq_len=int(cfg.data.max_len), pack=bool(cfg.data.pack),
        rows_per_batch=host_rows, shuffle=bool(cfg.data.shuffle), seed=int(cfg.data.seed),
        num_epochs=epochs, process_count=pcount), epochs


def _trainables(cfg, model: Llama, mesh):
    """(trainable, its shardings, frozen, its shardings, lora scale) on ``mesh``: the full
    parameters as float32 masters (frozen = {}; a bfloat16-held model is upcast, exactly), or
    fresh float32 LoRA adapters (frozen = the base parameters, in the dtype the model holds
    them: ``checkpoint.dtypes.finetune_param_dtype`` says which the callers load)."""
    mc = model.config
    base_sh = param_shardings(mc, mesh)
    base = {k: jax.device_put(v, base_sh[k]) for k, v in model.params.items()}
    if not cfg.lora.enabled:
        base = {k: v if v.dtype == jnp.float32 else v.astype(jnp.float32)
                for k, v in base.items()}
        return base, base_sh, {}, {}, 1.0
    rank, targets = int(cfg.lora.rank), tuple(cfg.lora.targets)
    adapters = lora_lib.init_lora(mc, rank, targets, int(cfg.train.seed), mesh)
    return (adapters, lora_lib.lora_shardings(mc, rank, targets, mesh), base, base_sh,
            lora_lib.scale(cfg.lora.alpha, rank))


def _resume_source(cfg, mngr, workdir: str, info: dict):
    """(manager, step) to restore from: this workdir's newest checkpoint, else
    ``checkpoint.resume_from``, else (None, None)."""
    latest = mngr.latest_step()
    if latest is not None:
        _check_run_info(workdir, info)
        return mngr, latest
    if cfg.checkpoint.resume_from:
        return _open_resume_from(str(cfg.checkpoint.resume_from), cfg.checkpoint)
    return None, None


def run_sft(cfg, model: Llama, tokenizer, train_files: Sequence[str] | str | None, workdir: str,
            eval_files: Sequence[str] | str | None = None, *, mesh=None) -> TrainResult:
    """Fine-tune ``model`` on (prompt, response) JSONL records; see the module docstring.

    ``cfg``: a fine-tune ConfigDict (``training.config.default_config()`` layout; missing keys
    take the defaults). ``train_files`` / ``eval_files``: JSONL paths or globs (None: take
    ``cfg.data.train_files`` / ``cfg.data.eval_files``). ``mesh``: default the model's mesh,
    else ``cfg.mesh.shape`` over all devices. ``model`` is never modified.
    """
    cfg = with_defaults(cfg)
    validate(cfg)  # every value's type and range, named as in cfg (train.batch_size, ...)
    mc = model.config
    pidx, pcount = jax.process_index(), jax.process_count()
    _check_config(cfg, mc, tokenizer, pcount)
    workdir = os.path.abspath(workdir)
    resume_from = str(cfg.checkpoint.resume_from or "")
    if resume_from and not os.path.isdir(resume_from):
        raise UserError(f"checkpoint.resume_from={resume_from}: no such checkpoint directory")
    if mesh is None:
        mesh = model.mesh if model.mesh is not None else shd.make_mesh(tuple(cfg.mesh.shape))
    shd.check_model_fits_mesh(mc, mesh)

    data = prepare_data(cfg, tokenizer, train_files, workdir, eval_files)
    seq_len, accum = int(cfg.data.max_len), int(cfg.train.grad_accum)
    global_rows = int(cfg.train.batch_size)
    host_rows = global_rows // pcount
    total_steps, epochs = _total_steps(cfg, data, host_rows, pcount)

    # ---- optimizer, state shardings, jit'ed steps
    tx, schedule = make_optimizer(cfg.train, total_steps)
    trainable, trainable_sh, frozen, frozen_sh, scale = _trainables(cfg, model, mesh)
    is_lora = bool(cfg.lora.enabled)
    abstract_trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    state_sh = step_lib.state_shardings(tx, trainable_sh, abstract_trainable, mesh)
    micro_shape = (accum, global_rows // accum, seq_len)
    train_fn = step_lib.jit_train_step(
        step_lib.make_train_step(mc, tx, schedule, is_lora=is_lora, lora_scale=scale,
                                 lora_dropout=float(cfg.lora.dropout) if is_lora else 0.0,
                                 mesh=mesh, param_shardings=trainable_sh),
        state_sh, {k: step_lib.batch_sharding(mesh, micro_shape) for k in step_lib.BATCH_KEYS},
        frozen_sh, mesh)
    eval_fn = None
    if ds_lib.VALIDATION in data.counts:
        eval_shape = (int(cfg.eval.batch_size), seq_len)
        eval_fn = step_lib.jit_eval_step(
            step_lib.make_eval_step(mc, is_lora=is_lora, lora_scale=scale, mesh=mesh),
            trainable_sh, frozen_sh,
            {k: step_lib.batch_sharding(mesh, eval_shape) for k in step_lib.BATCH_KEYS}, mesh)

    # ---- resume or start
    info = _run_info(cfg, mc, data, total_steps)
    mngr = _checkpoint_manager(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    source, source_step = _resume_source(cfg, mngr, workdir, info)
    if pidx == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomic(os.path.join(workdir, RUN_INFO), info, indent=1)
    it = ds_lib.BatchIterator(
        data.source(ds_lib.TRAIN), seq_len=seq_len, pack=bool(cfg.data.pack),
        rows_per_batch=host_rows, num_batches=total_steps, shuffle=bool(cfg.data.shuffle),
        seed=int(cfg.data.seed), num_epochs=epochs, process_index=pidx, process_count=pcount,
        read_threads=int(cfg.data.read_threads), lengths=data.lengths(ds_lib.TRAIN))
    if source is not None:
        state, data_state = _restore(source, source_step,
                                     step_lib.abstract_state(tx, abstract_trainable, state_sh))
        it.set_state(data_state)
        if source is not mngr:
            source.close()
        if pidx == 0:
            log.info("resumed from step %d", source_step)
    else:
        state = step_lib.init_state(tx, trainable, int(cfg.train.seed), state_sh)
    del trainable

    # ---- train
    flops = mc.flops_per_token(seq_len, training=True) * (2.0 / 3.0 if is_lora else 1.0)
    evaluate = None
    if eval_fn is not None:
        def evaluate(trainable):
            return _evaluate(eval_fn, trainable, frozen, data, cfg, mesh, pidx, pcount)
    try:
        state, last_loss, eval_loss = _train_loop(
            cfg, state, it, train_fn, frozen, evaluate, mngr, workdir, mesh=mesh,
            total_steps=total_steps, resumed_here=source is mngr, flops_per_token=flops)
    finally:
        mngr.close()

    adapters = state["params"] if is_lora else None
    mc, final = final_params(mc, frozen if is_lora else state["params"], adapters, scale)
    return TrainResult(
        params=final, lora=adapters, model=Llama(mc, params=final, mesh=mesh), step=total_steps,
        final_loss=last_loss, eval_loss=eval_loss, workdir=workdir,
        metrics_path=os.path.join(workdir, "metrics.jsonl"),
        tensorboard_dir=os.path.join(workdir, "tensorboard"),
        checkpoint_dir=os.path.join(workdir, "checkpoints"), data=data)


def final_params(config, params, lora=None, lora_scale: float = 1.0):
    """(config, parameters) a fine-tune returns: ``params`` (a full fine-tune's float32 masters),
    or for LoRA the adapters merged into the frozen base ``params`` in
    ``checkpoint.dtypes.merged_param_dtype`` (float32 for float32 compute, else the base's
    dtype); the config's ``param_dtype`` says the dtype they are held in (a saved checkpoint
    records it)."""
    if lora is not None:
        merged = merged_param_dtype(config.dtype, str(jnp.dtype(params["embed"].dtype)))
        if any(v.dtype != jnp.dtype(merged) for v in params.values()):
            params = {k: v.astype(merged) for k, v in params.items()}
        params = lora_lib.merge_lora(params, lora, lora_scale)
    return config.replace(param_dtype=str(jnp.dtype(params["embed"].dtype))), params


def _train_loop(cfg, state, it, train_fn, frozen, evaluate, mngr, workdir: str, *, mesh,
                total_steps: int, resumed_here: bool, flops_per_token: float):
    """Steps from ``state["step"]`` to ``total_steps`` with metrics, eval and checkpoints.
    Returns (final state, last train loss or None, final eval loss or None).

    Every metric of the steps up to a checkpoint (train lines, then that step's eval line) is on
    disk before the checkpoint is saved; a resumed run drops the lines after the step it restored
    and writes them again, so the finished ``metrics.jsonl`` (and ``examples_seen-*.jsonl``)
    equal an uninterrupted run's, timing fields aside."""
    pidx = jax.process_index()
    seq_len, accum = int(cfg.data.max_len), int(cfg.train.grad_accum)
    global_rows = int(cfg.train.batch_size)
    start = int(jax.device_get(state["step"]))
    writer = MetricsWriter(workdir, enabled=pidx == 0, tensorboard=bool(cfg.metrics.tensorboard),
                           resume_step=start, writers=tuple(cfg.metrics.writers),
                           run_config=cfg.to_dict())
    ids_log = None
    if cfg.metrics.log_example_ids:
        ids_log = AppendLog(os.path.join(workdir, f"examples_seen-{pidx}.jsonl"),
                            keep=lambda r: int(r.get("step", 0)) <= start)
    peak_per_device, peak_note = resolve_peak_flops(float(cfg.metrics.peak_flops),
                                                    jax.devices()[0].device_kind)
    if pidx == 0:
        log.info("%s", peak_note)
    peak = (peak_per_device or 0.0) * jax.device_count()
    every_ckpt, every_eval = int(cfg.checkpoint.every_steps), int(cfg.eval.every_steps)
    log_every = max(1, int(cfg.metrics.log_every))
    # process 0: steps done / total (the ETA), loss and tokens/s of the last logged steps
    pbar = progress_bar(total_steps, initial=start, desc="sft", unit="step",
                        show=bool(cfg.metrics.progress))
    pending: list = []
    shown: dict = {}  # the bar's postfix: loss, tok/s
    timing = {"mark": None, "steps": start}
    last_loss = eval_loss = None
    last_saved = start if resumed_here else None

    def flush(rates: bool) -> None:
        """Write the pending steps' metrics (``rates``: add tokens/s and MFU over the steps
        since the previous rated flush: at the ``metrics.log_every`` steps)."""
        nonlocal pending, last_loss
        if not pending:
            return
        fetched = jax.device_get([mm for _, mm in pending])
        done = pending[-1][0]
        if rates and timing["mark"] is not None and done > timing["steps"]:
            now = time.perf_counter()
            tps = (done - timing["steps"]) * global_rows * seq_len / (now - timing["mark"])
            fetched[-1]["tokens_per_s"] = tps
            if peak > 0:
                fetched[-1]["mfu"] = tps * flops_per_token / peak
            timing["mark"], timing["steps"] = now, done
        writer.write_many([(s, vals) for (s, _), vals in zip(pending, fetched)])
        last_loss = float(fetched[-1]["loss"])
        pending = []
        if pbar is not None:
            shown["loss"] = f"{last_loss:.4f}"
            if "tokens_per_s" in fetched[-1]:
                shown["tok/s"] = f"{fetched[-1]['tokens_per_s']:,.0f}"
            pbar.set_postfix(shown, refresh=False)

    def save(done: int) -> None:
        writer.sync()
        if ids_log is not None:
            ids_log.sync()
        _save(mngr, done, state, it.get_state())

    try:
        for step in range(start, total_steps):
            hb = next(it)
            batch = _to_global(hb, accum, global_rows, mesh, stacked=True)
            state, m = train_fn(state, batch, frozen)
            done = step + 1
            pending.append((done, m))
            if ids_log is not None:
                ids_log.write({"step": done, "ids": hb["example_ids"]})
            if timing["mark"] is None:  # the first step compiles: time from its end
                jax.block_until_ready(m)
                timing["mark"], timing["steps"] = time.perf_counter(), done
            final = done == total_steps
            log_due = done % log_every == 0 or final
            ckpt_due = final or (every_ckpt > 0 and done % every_ckpt == 0)
            eval_due = evaluate is not None and (
                final or (every_eval > 0 and done % every_eval == 0))
            if log_due or ckpt_due or eval_due:
                flush(rates=log_due)
            if pbar is not None:
                pbar.update(1)
            if eval_due:
                value = evaluate(state["params"])
                writer.write(done, {"eval_loss": value})
                eval_loss = value if final else eval_loss
            if ckpt_due:
                save(done)
                last_saved = done
            if float(cfg.debug.step_sleep_s) > 0:
                time.sleep(float(cfg.debug.step_sleep_s))
        if last_saved != total_steps:  # restored at the last step of another run: nothing ran
            if evaluate is not None:
                eval_loss = evaluate(state["params"])
                writer.write(total_steps, {"eval_loss": eval_loss})
            save(total_steps)
        elif start == total_steps:  # restored this workdir's final checkpoint: read what was logged
            last_loss, logged_eval = _logged_losses(writer.jsonl_path, total_steps)
            eval_loss = logged_eval if evaluate is not None else None
        mngr.wait_until_finished()
    except KeyboardInterrupt:
        try:  # the steps computed so far reach metrics.jsonl (a resume rewrites them)
            flush(rates=False)
        except Exception:  # noqa: BLE001 - interrupted anyway; never hide the interrupt
            pass
        raise
    finally:
        if pbar is not None:
            pbar.close()
        writer.close()
        if ids_log is not None:
            ids_log.close()
    return state, last_loss, eval_loss


def _logged_losses(path: str, step: int) -> tuple[float | None, float | None]:
    """(last train loss at or before ``step``, eval loss at ``step``) from a metrics.jsonl."""
    loss = ev = None
    for row in read_log(path):
        if int(row.get("step", 0)) <= step and isinstance(row.get("loss"), float):
            loss = row["loss"]
        if int(row.get("step", 0)) == step and isinstance(row.get("eval_loss"), float):
            ev = row["eval_loss"]
    return loss, ev
