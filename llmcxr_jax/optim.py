"""Optimizer and learning-rate schedules: the original's DeepSpeed recipe, plus linear and cosine alternatives."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import optax

from llmcxr_jax.model import resolve_dtype

SCHEDULES = ("log_warmup", "linear", "cosine", "constant")


def log_warmup_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
    """DeepSpeed 0.8.3 `WarmupLR` (warmup_type log) as LLM-CXR ran it (SPEC §9).

    lr(u) = peak · min(1, ln(u)/ln(warmup)) for u ≥ 1; lr(0) = peak, because that DeepSpeed left the initial lr in
    place for the first update and stepped the scheduler after it.
    """
    log_w = math.log(max(warmup_steps, 2))

    def schedule(step):
        u = jnp.asarray(step, jnp.float32)
        ramp = jnp.minimum(1.0, jnp.log(jnp.maximum(u, 1.0)) / log_w)
        return peak * jnp.where(u == 0, 1.0, ramp)

    return schedule


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """`cfg` has lr, schedule, warmup_steps (and end_lr_fraction for linear/cosine decay)."""
    if cfg.schedule == "log_warmup":
        return log_warmup_schedule(cfg.lr, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.end_lr_fraction
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_fraction)
    else:
        raise ValueError(f"optim.schedule {cfg.schedule!r} is unknown; expected one of {SCHEDULES}")
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; the first moment's dtype is a config field (the second follows the params)."""
    schedule = make_schedule(cfg, total_steps)
    mu_dtype = resolve_dtype(cfg.mu_dtype) if cfg.mu_dtype else None
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mu_dtype=mu_dtype),
    )
    return tx, schedule
