"""Recipes: the one dispatch from a named method ("alphalora", "uniform", "mola-8642", ...) to an
`Allocation`, used by the train config's `adapter.allocation` and by `moe-lora allocate`.

    alloc = allocate_recipe("alphalora", num_layers, total=48, params=base)       # analyses the weights
    alloc = allocate_recipe("mola-8642", num_layers, total=48)                    # a MoLA shape
    alloc = resolve_allocation({"method": "alphalora", "total": 48}, base, num_layers)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from moe_lora_jax.allocation.allocate import (
    ALPHALORA_DEFAULT_BETA, ALPHALORA_DEFAULT_ROUNDING, ALPHALORA_DEFAULT_TOP_K, allocate_alphalora, allocate_shape,
)
from moe_lora_jax.allocation.allocation import LEGACY_SHAPE_NAMES, Allocation, legacy_shape_error
from moe_lora_jax.allocation.spectral import HillOptions, MatrixFit, analyze_params, layer_metric
from moe_lora_jax.errors import MoeLoraError


def allocate_recipe(
    method: str,
    num_layers: int,
    total: int,
    *,
    params: Any = None,
    fits: Sequence[MatrixFit] | None = None,
    beta: float = ALPHALORA_DEFAULT_BETA,
    estimator: str = "fix-finger",
    rounding: str = ALPHALORA_DEFAULT_ROUNDING,
    top_k: int | None = ALPHALORA_DEFAULT_TOP_K,
    min_experts: int = 1,
    max_experts: int | None = None,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = False,
    where: str = "allocation method ",
) -> Allocation:
    """The Allocation of `method` over `num_layers` layers with `total` experts per target module.

    alphalora reads the per-layer mean PL_Alpha_Hill of `fits` (computed from the base `params`
    with `estimator` when not given) and records the estimator in the provenance; the other
    methods are shapes and need neither. `where` prefixes the error for an old shape name.
    """
    if method in LEGACY_SHAPE_NAMES:
        raise legacy_shape_error(method, where)
    limits = dict(min_experts=min_experts, max_experts=max_experts)
    if method != "alphalora":
        return allocate_shape(method, num_layers, total, **limits, provenance=provenance)
    if fits is None:
        if params is None:
            raise MoeLoraError("an alphalora allocation needs the base model's weights to analyse")
        fits = analyze_params(params, HillOptions(estimator), progress=progress)
    return allocate_alphalora(layer_metric(fits, num_layers), total, beta, rounding=rounding, top_k=top_k, **limits,
                              provenance={**dict(provenance or {}), "estimator": estimator})


def resolve_allocation(spec: Any, params: Any, num_layers: int, *, progress: bool = False, top_k: int | None = None) -> Any:
    """An `Allocation` from the config's `adapter.allocation`: a JSON path, a dict of counts
    ({"experts_per_layer": [...]} or {"modules": {...}}, optionally "top_k_per_layer"), or a recipe
    {"method": alphalora|uniform|mola-8642|mola-2468|mola-5555|mola-8228, "total": T, "beta": B,
    "estimator": ..., "rounding": alphalora|largest-remainder, "top_k": k}. An alphalora recipe gives
    each layer top-min(k, n_l) with k = the recipe's top_k, else `top_k` (the adapter's), else 2."""
    if spec is None or isinstance(spec, Allocation):
        return spec
    if isinstance(spec, (str, Path)):
        alloc = Allocation.from_json(spec)
    elif isinstance(spec, Mapping) and "method" in spec and "total" in spec:
        limits = {k: spec[k] for k in ("min_experts", "max_experts") if k in spec}
        alloc = allocate_recipe(
            str(spec["method"]), num_layers, int(spec["total"]), params=params, progress=progress,
            beta=float(spec.get("beta", ALPHALORA_DEFAULT_BETA)), estimator=str(spec.get("estimator", "fix-finger")),
            rounding=str(spec.get("rounding", ALPHALORA_DEFAULT_ROUNDING)),
            top_k=spec.get("top_k", top_k if top_k is not None else ALPHALORA_DEFAULT_TOP_K),
            where="adapter.allocation.method ", **limits,
        )
    elif isinstance(spec, Mapping):
        alloc = Allocation.from_dict(spec, source="adapter.allocation")
    else:
        raise MoeLoraError(f"adapter.allocation={spec!r}: give a JSON file, counts, or {{method: alphalora, total: T}}")
    alloc.check_num_layers(num_layers)
    return alloc
