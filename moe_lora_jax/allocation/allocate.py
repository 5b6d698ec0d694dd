"""Turning per-layer metrics into per-layer expert counts.

* AlphaLoRA (Qing et al. 2024): n_i proportional to v_i ** beta, scaled to a total
  T, rounded, then adjusted so the counts add up to T exactly. v_i is the layer's
  mean PL_Alpha_Hill: a larger alpha (a less well-trained layer) gets more experts.
  By default the rounding is the authors' (`exponential_scaling` in expert_number.py),
  and each layer routes top-min(2, n_i), as that script prints.
* MoLA (Gao et al. 2024) shapes, named by their digits: the layers are cut into four
  contiguous groups, lowest layers first, and the groups get experts in the ratio of
  the digits: 2468 (MoLA's "inverted triangle": more experts in higher layers), 8642
  (MoLA's "triangle"), 8228 (hourglass), 5555 (uniform). With 32 layers and T = 160
  this gives MoLA's own lists exactly (2468: layers 1-8 two experts, ..., 25-32 eight).
  The old names (mola-triangle, ...) are refused: AlphaLoRA's explainer calls 2468
  the triangle, MoLA calls it the inverted one.

All functions return plain tuples of ints; `allocate_*` wrap them in an
`Allocation` with their provenance.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from moe_lora_jax.allocation.allocation import ALL_MODULES, LEGACY_SHAPE_NAMES, Allocation, legacy_shape_error
from moe_lora_jax.errors import MoeLoraError

ROUNDINGS = ("alphalora", "largest-remainder")
ALPHALORA_DEFAULT_ROUNDING = "alphalora"  # the authors' exponential_scaling
MOLA_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "5555": (5, 5, 5, 5),
    "8642": (8, 6, 4, 2),
    "2468": (2, 4, 6, 8),
    "8228": (8, 2, 2, 8),
}
ALPHALORA_DEFAULT_BETA = 2.5  # expert_number.py's --beta default
ALPHALORA_DEFAULT_TOP_K = 2  # expert_number.py: top_k = 2 if n > 1 else 1
METHODS = ("alphalora", "uniform", "mola-8642", "mola-2468", "mola-5555", "mola-8228")


# ----------------------------------------------------------------------------- checks
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MoeLoraError(f"{name} is {value!r}: give a whole number")
    value = int(value)
    if value < minimum:
        raise MoeLoraError(f"{name} is {value}: it must be at least {minimum}")
    return value


def _check_bounds(num_layers: int, total: int, min_experts: int, max_experts: int | None) -> tuple[int, int, int | None]:
    min_experts = _check_int(min_experts, "min_experts", 1)
    if max_experts is not None:
        max_experts = _check_int(max_experts, "max_experts", 1)
        if max_experts < min_experts:
            raise MoeLoraError(f"max_experts={max_experts} is below min_experts={min_experts}: raise max_experts")
    if isinstance(total, bool) or not isinstance(total, numbers.Integral):
        raise MoeLoraError(f"total is {total!r}: give a whole number of experts")
    total = int(total)
    if total < num_layers * min_experts:
        raise MoeLoraError(
            f"total={total} experts cannot give {num_layers} layers at least {min_experts} each: "
            f"use --total {num_layers * min_experts} or more"
        )
    if max_experts is not None and total > num_layers * max_experts:
        raise MoeLoraError(
            f"total={total} experts exceeds {num_layers} layers x max {max_experts}: "
            f"use --total {num_layers * max_experts} or less, or raise max_experts"
        )
    return total, min_experts, max_experts


def _check_values(values: Sequence[float], what: str = "metric") -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise MoeLoraError(f"the per-layer {what} must be a non-empty list of numbers, got shape {v.shape}")
    bad = [i for i, x in enumerate(v) if not math.isfinite(x)]
    if bad:
        raise MoeLoraError(
            f"the {what} of layer(s) {bad} is not finite (no usable fit): analyse with another --estimator or check those weights"
        )
    nonpos = [i for i, x in enumerate(v) if x <= 0]
    if nonpos:
        raise MoeLoraError(f"the {what} of layer(s) {nonpos} is <= 0: v ** beta needs positive values")
    return v


def _check_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(float(beta)) or float(beta) <= 0:
        raise MoeLoraError(f"beta is {beta!r}: give a finite number > 0 (AlphaLoRA uses {ALPHALORA_DEFAULT_BETA})")
    return float(beta)


# ----------------------------------------------------------------------------- quotas
def _bounded_quotas(weights: np.ndarray, total: int, lo: int, hi: int | None) -> np.ndarray:
    """Real quotas q_i = clip(c * w_i, lo, hi) with sum q = total (c found by bisection).

    Without binding bounds this is exactly w / sum(w) * total, AlphaLoRA's formula.
    """
    q = weights / weights.sum() * total
    if q.min() >= lo and (hi is None or q.max() <= hi):
        return q
    upper = float(hi) if hi is not None else math.inf
    w = weights / weights.max()
    c_lo, c_hi = 0.0, 1.0
    while np.clip(c_hi * w, lo, upper).sum() < total:
        c_hi *= 2.0
    for _ in range(200):
        c = 0.5 * (c_lo + c_hi)
        if np.clip(c * w, lo, upper).sum() < total:
            c_lo = c
        else:
            c_hi = c
    return np.clip(c_hi * w, lo, upper)


def _largest_remainder(q: np.ndarray, values: np.ndarray, total: int, lo: int, hi: int | None) -> np.ndarray:
    """floor(q), then +1 to the largest fractional parts until the sum is `total`.

    Ties go to the larger metric, then to the lower layer, so a layer never gets
    more experts than one with a larger metric.
    """
    base = np.floor(q + 1e-9).astype(np.int64)  # 1e-9 absorbs bisection round-off on whole quotas
    base = np.maximum(base, lo)
    if hi is not None:
        base = np.minimum(base, hi)
    deficit = total - int(base.sum())
    frac = q - base
    order = sorted(range(len(q)), key=lambda i: (-frac[i], -values[i], i))
    if deficit >= 0:
        for i in order:
            if deficit == 0:
                break
            if hi is None or base[i] < hi:
                base[i] += 1
                deficit -= 1
    else:  # only possible through the 1e-9 guard: take back from the smallest fractions
        for i in reversed(order):
            if deficit == 0:
                break
            if base[i] > lo:
                base[i] -= 1
                deficit += 1
    if int(base.sum()) != total:  # unreachable when the bounds were checked
        raise MoeLoraError(f"could not reach total={total} within the per-layer bounds: widen min/max experts")
    return base


def _alphalora_unbounded(powers: np.ndarray, total: int) -> np.ndarray:
    """AlphaLoRA's `exponential_scaling` (expert_number.py) exactly: no bounds, counts may be 0."""
    n = np.round(powers / powers.sum() * total).astype(np.int64)
    while int(n.sum()) != total:  # each step moves the sum one towards total
        if total > n.sum():
            n[int(np.argmin(powers - n))] += 1
        else:
            n[int(np.argmax(powers - n))] -= 1
    return n


def _alphalora_greedy(q: np.ndarray, powers: np.ndarray, total: int, lo: int, hi: int | None) -> np.ndarray:
    """AlphaLoRA's own adjustment (expert_number.py, `exponential_scaling`), kept within [lo, hi].

    It rounds half to even (np.round), then while the sum is off by d it adds one
    expert at argmin(v**beta - n) (d > 0) or removes one at argmax(v**beta - n)
    (d < 0). Note that it compares the *unnormalised* powers v**beta with the
    counts, not the quotas, so the extra expert tends to go to the layer with the
    smallest metric: this rule is reproduced as is, it is not monotone. The caller
    uses this only where the authors' unbounded result breaks a bound; here the
    quotas are the bounded ones and the steps are restricted to layers that stay
    within [min, max].
    """
    n = np.round(q).astype(np.int64)
    n = np.maximum(n, lo)
    if hi is not None:
        n = np.minimum(n, hi)
    upper = hi if hi is not None else np.iinfo(np.int64).max
    while int(n.sum()) != total:
        gap = powers - n
        if total > n.sum():
            i = int(np.argmin(np.where(n < upper, gap, np.inf)))
            n[i] += 1
        else:
            i = int(np.argmax(np.where(n > lo, gap, -np.inf)))
            n[i] -= 1
    return n


def scale_to_total(
    values: Sequence[float],
    total: int,
    beta: float = 1.0,
    *,
    rounding: str = "largest-remainder",
    min_experts: int = 1,
    max_experts: int | None = None,
) -> tuple[int, ...]:
    """Integer counts n_i ~ values_i ** beta adding up to `total`, each in [min_experts, max_experts].

    rounding: "largest-remainder" (default here; exact total, monotone in the values)
    or "alphalora" (AlphaLoRA's round-then-greedy rule: the authors' `exponential_scaling`
    result whenever every count lies in [min_experts, max_experts]; where it does not, e.g.
    a layer it would give 0 experts, the quotas are re-scaled within the bounds and the
    same rule is applied to them, see `_alphalora_greedy`). `allocate_alphalora` defaults
    to "alphalora".
    """
    v = _check_values(values)
    beta = _check_beta(beta)
    total, lo, hi = _check_bounds(len(v), total, min_experts, max_experts)
    if rounding not in ROUNDINGS:
        raise MoeLoraError(f"unknown rounding {rounding!r}: choose from {', '.join(ROUNDINGS)}")
    with np.errstate(over="raise"):
        try:
            powers = np.power(v, beta)
        except FloatingPointError:
            powers = None
    if powers is None or not np.all(np.isfinite(powers)) or powers.min() <= 0:
        # overflow or underflow of v ** beta: the same proportions, computed in log space
        powers = np.exp(beta * (np.log(v) - np.log(v).max()))
    if rounding == "alphalora":
        counts = _alphalora_unbounded(powers, total)
        if counts.min() >= lo and (hi is None or counts.max() <= hi):
            return tuple(int(c) for c in counts)
    q = _bounded_quotas(powers, total, lo, hi)
    if rounding == "alphalora":
        counts = _alphalora_greedy(q, powers, total, lo, hi)
    else:
        counts = _largest_remainder(q, v, total, lo, hi)
    return tuple(int(c) for c in counts)


def _shape_digits(shape: str) -> tuple[int, int, int, int]:
    if shape == "uniform":
        return MOLA_SHAPES["5555"]
    if shape in LEGACY_SHAPE_NAMES:
        raise legacy_shape_error(shape, "MoLA shape ")
    if shape not in MOLA_SHAPES:
        raise MoeLoraError(f"unknown MoLA shape {shape!r}: choose from {', '.join(MOLA_SHAPES)}")
    return MOLA_SHAPES[shape]


def mola_shape(
    shape: str, num_layers: int, total: int | None = None, *, min_experts: int = 1, max_experts: int | None = None
) -> tuple[int, ...]:
    """MoLA's per-layer counts for `shape`, named by its digits: "8642", "2468", "5555", "8228".

    The layers are cut into four contiguous groups whose sizes differ by at most
    one (the lower groups get the extra layers, like numpy.array_split); every
    layer gets its group's digit as weight, and the weights are scaled to `total`
    (default: 5 per layer, MoLA's budget) with largest-remainder rounding, extra
    experts going to lower layers first within a group.
    """
    digits = _shape_digits(shape)
    num_layers = _check_int(num_layers, "num_layers", 1)
    if total is None:
        total = 5 * num_layers
    groups = np.array_split(np.arange(num_layers), 4)
    weights = np.empty(num_layers, dtype=np.float64)
    for digit, layers in zip(digits, groups):
        weights[layers] = digit
    # rank ties by layer only: pass a constant "metric" so lower layers win ties
    return scale_to_total(weights, total, 1.0, min_experts=min_experts, max_experts=max_experts)


def uniform_counts(num_layers: int, total: int, *, min_experts: int = 1, max_experts: int | None = None) -> tuple[int, ...]:
    """total // L experts per layer, the remainder one each to the lowest layers."""
    return mola_shape("5555", num_layers, total, min_experts=min_experts, max_experts=max_experts)


# ----------------------------------------------------------------------------- Allocations
def allocate_alphalora(
    layer_metric: Sequence[float],
    total: int,
    beta: float = ALPHALORA_DEFAULT_BETA,
    *,
    rounding: str = ALPHALORA_DEFAULT_ROUNDING,
    min_experts: int = 1,
    max_experts: int | None = None,
    top_k: int | None = ALPHALORA_DEFAULT_TOP_K,
    modules: Sequence[str] = ALL_MODULES,
    provenance: Mapping[str, Any] | None = None,
) -> Allocation:
    """AlphaLoRA's allocation from per-layer metric values (mean PL_Alpha_Hill per layer).

    rounding: "alphalora" (default: the authors' exponential_scaling) or "largest-remainder".
    top_k: each layer routes top-min(top_k, n_i), as expert_number.py prints for top_k = 2
    (a layer with one expert routes top-1); None leaves it to the adapter's top_k.
    """
    counts = scale_to_total(
        layer_metric, total, beta, rounding=rounding, min_experts=min_experts, max_experts=max_experts
    )
    top_k_per_layer = None
    if top_k is not None:
        k = _check_int(top_k, "top_k", 1)
        top_k_per_layer = tuple(min(k, n) for n in counts)
    prov = {
        "total": int(total),
        "beta": float(beta),
        "rounding": rounding,
        "min_experts": int(min_experts),
        "max_experts": max_experts,
        "layer_metric": [float(x) for x in layer_metric],
        **dict(provenance or {}),
    }
    return Allocation.from_experts_per_layer(counts, modules, method="alphalora", provenance=prov,
                                             top_k_per_layer=top_k_per_layer)


def allocate_shape(
    method: str,
    num_layers: int,
    total: int,
    *,
    min_experts: int = 1,
    max_experts: int | None = None,
    modules: Sequence[str] = ALL_MODULES,
    provenance: Mapping[str, Any] | None = None,
) -> Allocation:
    """"uniform" or a MoLA shape named by its digits ("mola-8642", "mola-2468", "mola-5555", "mola-8228")."""
    if method in LEGACY_SHAPE_NAMES:
        raise legacy_shape_error(method, "allocation method ")
    shape = "5555" if method == "uniform" else method.removeprefix("mola-")
    if not method.startswith(("mola-", "uniform")) or shape not in MOLA_SHAPES:
        raise MoeLoraError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    counts = mola_shape(shape, num_layers, total, min_experts=min_experts, max_experts=max_experts)
    prov = {
        "total": int(total),
        "shape": shape,
        "min_experts": int(min_experts),
        "max_experts": max_experts,
        **dict(provenance or {}),
    }
    return Allocation.from_experts_per_layer(counts, modules, method=method, provenance=prov)
