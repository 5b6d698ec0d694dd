"""The optimizer: AdamW with warmup + cosine/linear decay, clipping, decay masks, per-group learning rates.

    tx = make_optimizer(config.optim, total_steps=config.loop.steps)
    opt_state = tx.init(adapter_params)

Parameters fall into three groups by their path (keys joined with "/"), tested in this order:

    rational  a `rational_patterns` regex matches (default "rational": MiLoRA's rational activation)  lr = rational_lr or lr
    router    a `router_patterns` regex matches (default "router")                                   lr = router_lr or lr
    default   everything else                                                                          lr = lr

Weight decay applies only where no pattern of `no_decay_patterns` matches the
path (by default biases, norms, `scale` vectors, IA3 vectors and rational
coefficients) and the leaf has at least two dimensions. Everything here is a pure function of the
config and the parameter tree.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from moe_lora_jax.errors import MoeLoraError

GROUPS = ("default", "router", "rational")


def path_str(path: tuple) -> str:
    """'layers_0/mlp/router/bias' for a jax key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def group_of(path: str, router_patterns: tuple[str, ...] = ("router",), rational_patterns: tuple[str, ...] = ("rational",)) -> str:
    if any(re.search(p, path) for p in rational_patterns):
        return "rational"
    if any(re.search(p, path) for p in router_patterns):
        return "router"
    return "default"


def param_groups(params: Any, router_patterns: tuple[str, ...] = ("router",), rational_patterns: tuple[str, ...] = ("rational",)) -> Any:
    """Tree of group names ('default', 'router', 'rational') matching `params`."""
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(path_str(p), router_patterns, rational_patterns), params)


def decay_mask(params: Any, no_decay_patterns: tuple[str, ...]) -> Any:
    """Tree of bools: True where weight decay applies."""
    compiled = [re.compile(p) for p in no_decay_patterns]

    def decays(path, leaf) -> bool:
        s = path_str(path)
        ndim = getattr(leaf, "ndim", 0) - any(getattr(k, "key", None) == "layers" for k in path)  # stacked over layers
        return ndim >= 2 and not any(p.search(s) for p in compiled)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(optim: Any, total_steps: int, peak_lr: float | None = None) -> optax.Schedule:
    """Learning rate at each step.

    Steps 0..warmup-1 rise linearly as peak * (step + 1) / warmup; from step `warmup`
    the rate decays (cosine or linear) from peak to end_lr_ratio * peak at `total_steps`
    and stays there.
    """
    peak = optim.lr if peak_lr is None else peak_lr
    if total_steps <= 0:
        raise MoeLoraError(f"total_steps={total_steps} must be positive")
    warmup = min(optim.warmup_steps, total_steps)
    end = peak * optim.end_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_lr_ratio)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise MoeLoraError(f"unknown schedule {optim.schedule!r}: use cosine, linear or constant")
    if warmup == 0:
        return decay

    def warmup_schedule(step):  # peak/warmup at step 0 (never a wasted zero step), peak at step warmup-1
        return peak * jnp.minimum(step + 1, warmup) / warmup

    return optax.join_schedules([warmup_schedule, decay], [warmup])


def make_schedules(optim: Any, total_steps: int) -> dict[str, optax.Schedule]:
    """One schedule per group (for the optimizer and for logging the current rates)."""
    peaks = {
        "default": optim.lr,
        "router": optim.router_lr if optim.router_lr is not None else optim.lr,
        "rational": optim.rational_lr if optim.rational_lr is not None else optim.lr,
    }
    return {g: make_schedule(optim, total_steps, peak) for g, peak in peaks.items()}


def make_optimizer(optim: Any, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm) -> per-group AdamW with masked weight decay."""
    schedules = make_schedules(optim, total_steps)
    patterns = tuple(optim.no_decay_patterns)

    def adamw(schedule: Callable) -> optax.GradientTransformation:
        return optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=lambda params: decay_mask(params, patterns),
        )

    parts = []
    if optim.clip_norm is not None and not optim.clip_norm > 0:  # optax would flip (< 0) or zero the update
        raise MoeLoraError(f"optim.clip_norm={optim.clip_norm} must be positive: use null (None) for no clipping")
    if optim.clip_norm:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    groups = functools.partial(
        param_groups, router_patterns=tuple(optim.router_patterns), rational_patterns=tuple(optim.rational_patterns)
    )
    parts.append(optax.multi_transform({g: adamw(schedules[g]) for g in GROUPS}, groups))
    return optax.chain(*parts)


def learning_rates(optim: Any, total_steps: int, step: int) -> dict[str, float]:
    """Current learning rate of each group, for logging."""
    return {f"lr/{g}": float(s(step)) for g, s in make_schedules(optim, total_steps).items()}
