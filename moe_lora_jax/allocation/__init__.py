"""Training-free expert allocation: spectral (HT-SR) analysis of the frozen weights and per-layer expert counts."""

from moe_lora_jax.allocation.allocate import (
    ALPHALORA_DEFAULT_BETA,
    METHODS,
    MOLA_SHAPES,
    ROUNDINGS,
    allocate_alphalora,
    allocate_shape,
    mola_shape,
    scale_to_total,
    uniform_counts,
)
from moe_lora_jax.allocation.allocation import ALL_MODULES, Allocation
from moe_lora_jax.allocation.spectral import (
    ESTIMATORS,
    HillOptions,
    MatrixFit,
    analyze_matrices,
    analyze_params,
    esd,
    fit_esds,
    hill_estimate,
    layer_metric,
    module_metric,
    target_matrices,
)

__all__ = [
    "ALL_MODULES",
    "ALPHALORA_DEFAULT_BETA",
    "Allocation",
    "ESTIMATORS",
    "HillOptions",
    "METHODS",
    "MOLA_SHAPES",
    "MatrixFit",
    "ROUNDINGS",
    "allocate_alphalora",
    "allocate_shape",
    "analyze_matrices",
    "analyze_params",
    "esd",
    "fit_esds",
    "hill_estimate",
    "layer_metric",
    "module_metric",
    "mola_shape",
    "scale_to_total",
    "target_matrices",
    "uniform_counts",
]
