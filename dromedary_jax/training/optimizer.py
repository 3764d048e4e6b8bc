"""optax AdamW with linear warmup, cosine / linear / constant decay and global-norm clipping."""
from __future__ import annotations

import jax
import optax

from dromedary_jax.errors import UserError


def warmup_steps(train_cfg, total_steps: int) -> int:
    """Warmup length in optimizer steps: ``train.warmup_steps`` when > 0, else
    ``round(train.warmup_ratio * total_steps)`` (0 when no ratio is set)."""
    if int(train_cfg.warmup_steps) > 0:
        return int(train_cfg.warmup_steps)
    return int(round(float(train_cfg.get("warmup_ratio", 0.0)) * total_steps))


def make_schedule(train_cfg, total_steps: int) -> optax.Schedule:
    """lr(step): 0 -> learning_rate over the warmup steps, then decay to
    learning_rate * end_lr_ratio at ``total_steps`` (cosine or linear) or stay (constant)."""
    lr = float(train_cfg.learning_rate)
    end = lr * float(train_cfg.get("end_lr_ratio", 0.0))
    warm = min(warmup_steps(train_cfg, total_steps), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warm, 1)
    kind = train_cfg.get("schedule", "cosine")
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise UserError(f"train.schedule={kind!r}: use cosine, linear or constant")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def _decay_mask(params):
    """Weight decay on matrices only (not on norm scales)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)``: global-norm clipping at ``train.clip_norm`` (when > 0), then
    ``optax.adamw`` (decoupled weight decay, Loshchilov & Hutter, arXiv 1711.05101) with
    ``b1`` / ``b2`` / ``eps`` / ``weight_decay`` on the :func:`make_schedule` learning rate;
    weight decay applies to arrays of rank >= 2 only (not norm scales). UserError for an unknown
    ``train.schedule``."""
    schedule = make_schedule(train_cfg, total_steps)
    parts = []
    if float(train_cfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                             eps=float(train_cfg.eps),
                             weight_decay=float(train_cfg.weight_decay), mask=_decay_mask))
    return optax.chain(*parts), schedule
