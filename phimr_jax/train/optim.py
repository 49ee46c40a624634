"""Optimizer from config: optax AdamW, warmup (a fraction of the steps) then decay, clipping."""

from __future__ import annotations

import jax
import optax
from ml_collections import ConfigDict


def schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then `decay` to end_lr_fraction * lr."""
    peak = float(cfg.learning_rate)
    warmup = int(round(cfg.warmup_fraction * total_steps))
    end = peak * float(cfg.end_lr_fraction)
    rest = max(total_steps - warmup, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, rest, alpha=end / peak if peak else 0.0)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, end, rest)
    elif cfg.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.decay must be cosine|linear|constant, got {cfg.decay!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
    # No weight decay on RMSNorm scales (stacked [layers, hidden], so not caught by ndim) nor
    # on a PPO critic's value head; parameters may be nested ({"policy": {...}, ...}).
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("norm") or name == "value_head")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
