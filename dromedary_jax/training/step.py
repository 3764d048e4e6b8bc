"""Pure train / eval steps and their jit wrappers (in/out shardings, donation).

Train state (a dict, the unit Orbax saves):

    {"step": int32 [], "params": trainable tree, "opt_state": optax state, "rng": uint32 [2]}

``params`` is the full parameter dict for a full fine-tune, or the LoRA adapters; the frozen
base parameters then travel as the separate ``frozen`` argument, never donated or updated
(``frozen`` is ``{}`` for a full fine-tune).

A train batch holds int32 arrays ``tokens, targets, loss_mask, segment_ids, positions`` of shape
``[grad_accum, micro_batch, seq_len]``. The micro-batches run under ``lax.scan`` (no loop when
``grad_accum == 1``); gradients and NLL are summed and divided once by the total number of target
tokens of the whole step, so the step is the exact gradient of the mean NLL over all its target
tokens (not a mean of per-micro-batch means).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dromedary_jax import sharding as shd
from dromedary_jax.model.config import ModelConfig
from dromedary_jax.model.llama import forward

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def loss_sums(params, lora, batch: Mapping[str, jax.Array], *, config: ModelConfig,
              lora_scale: float = 1.0, lora_dropout: float = 0.0, dropout_rng=None, mesh=None):
    """(sum of target-token NLL, number of target tokens) for a [B, T] batch."""
    logits, _ = forward(params, config, batch["tokens"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"], lora=lora, lora_scale=lora_scale,
                        lora_dropout=lora_dropout, dropout_rng=dropout_rng, mesh=mesh)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((lse - tgt) * mask), jnp.sum(mask)


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation,
                    schedule: Callable, *, is_lora: bool, lora_scale: float = 1.0,
                    lora_dropout: float = 0.0, mesh=None, param_shardings=None) -> Callable:
    """The pure ``train_step(state, batch, frozen) -> (state, metrics)``."""

    def split(trainable, frozen):
        return (frozen, trainable) if is_lora else (trainable, None)

    def train_step(state, batch, frozen):
        trainable = state["params"]
        step_key = jax.random.fold_in(state["rng"], state["step"])

        def micro(carry, xs):
            g_acc, nll_acc, n_acc = carry
            mb, i = xs

            def f(t):
                params, lora = split(t, frozen)
                return loss_sums(params, lora, mb, config=config, lora_scale=lora_scale,
                                 lora_dropout=lora_dropout,
                                 dropout_rng=jax.random.fold_in(step_key, i), mesh=mesh)

            (nll, n), g = jax.value_and_grad(f, has_aux=True)(trainable)
            g_acc = g if g_acc is None else jax.tree.map(jnp.add, g_acc, g)
            if param_shardings is not None:
                g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
            return (g_acc, nll_acc + nll, n_acc + n), None

        accum = batch["tokens"].shape[0]
        if accum == 1:  # no loop: nothing to accumulate
            (g_sum, nll_sum, n), _ = micro(
                (None, jnp.float32(0), jnp.float32(0)),
                (jax.tree.map(lambda x: x[0], batch), jnp.int32(0)))
        else:
            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (g_sum, nll_sum, n), _ = jax.lax.scan(
                micro, (zeros, jnp.float32(0), jnp.float32(0)),
                (batch, jnp.arange(accum, dtype=jnp.int32)))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(trainable, updates),
                     "opt_state": opt_state, "rng": state["rng"]}
        metrics = {"loss": nll_sum / denom, "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"]), "target_tokens": n}
        return new_state, metrics

    return train_step


def make_eval_step(config: ModelConfig, *, is_lora: bool, lora_scale: float = 1.0,
                   mesh=None) -> Callable:
    """The pure ``eval_step(trainable, frozen, batch [B, T]) -> (nll_sum, target_tokens)``."""

    def eval_step(trainable, frozen, batch):
        params, lora = (frozen, trainable) if is_lora else (trainable, None)
        return loss_sums(params, lora, batch, config=config, lora_scale=lora_scale, mesh=mesh)

    return eval_step


# ----------------------------------------------------------------------------- shardings
def replicated(mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh`` (``PartitionSpec()``)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh, shape) -> NamedSharding:
    """[accum, micro, T] (or [B, T]): rows over the logical 'batch' axis."""
    axes = (None, "batch", "length") if len(shape) == 3 else ("batch", "length")
    return shd.named_sharding(mesh, axes, shape)


def state_shardings(tx, trainable_shardings, abstract_trainable, mesh) -> dict[str, Any]:
    """Shardings of the train state: optimizer moments follow their parameters."""
    rep = replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    opt = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract_opt, trainable_shardings,
        transform_non_params=lambda _: rep)
    return {"step": rep, "params": trainable_shardings, "opt_state": opt, "rng": rep}


def _fresh_state(tx, trainable, seed):
    t = jax.tree.map(jnp.copy, trainable)  # a copy: the caller's arrays are never donated
    return {"step": jnp.int32(0), "params": t, "opt_state": tx.init(t),
            "rng": jax.random.PRNGKey(seed)}


def init_state(tx, trainable, seed: int, shardings) -> dict[str, Any]:
    """A fresh state holding a COPY of ``trainable``, placed with ``shardings``."""
    return jax.jit(lambda t: _fresh_state(tx, t, seed), out_shardings=shardings)(trainable)


def abstract_state(tx, abstract_trainable, shardings) -> dict[str, Any]:
    """ShapeDtypeStructs (with shardings) of the state: the target of a restore."""
    shapes = jax.eval_shape(lambda t: _fresh_state(tx, t, 0), abstract_trainable)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def jit_train_step(train_step, state_sh, batch_sh, frozen_sh, mesh):
    """``jax.jit`` of ``train_step(state, batch, frozen)`` with these input shardings; the state
    keeps ``state_sh``, the metrics come back replicated, and the state argument is donated
    (its buffers are reused: do not read the old state after the call)."""
    rep = replicated(mesh)
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh, frozen_sh),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))


def jit_eval_step(eval_step, trainable_sh, frozen_sh, batch_sh, mesh):
    """``jax.jit`` of ``eval_step(trainable, frozen, batch)`` with these input shardings and
    replicated outputs ``(nll_sum, target_tokens)``; nothing is donated."""
    rep = replicated(mesh)
    return jax.jit(eval_step, in_shardings=(trainable_sh, frozen_sh, batch_sh),
                   out_shardings=(rep, rep))
