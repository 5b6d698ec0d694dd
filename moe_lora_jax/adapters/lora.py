"""LoRA (Hu et al. 2021): one low-rank delta scale * x @ A @ B per adapted linear, no router."""

from __future__ import annotations

from typing import Any

from moe_lora_jax.adapters import layers
from moe_lora_jax.adapters.config import LINEAR_MODULES
from moe_lora_jax.adapters.registry import MethodSpec, register


def adapt_linear(linear: Any, x: Any, y: Any, ctx: Any) -> Any:
    """y + scale * dropout(x) @ A @ B (A [D, r], B [r, O] zeros)."""
    delta = layers.lora_delta(linear, x, linear.features, linear.kernel_axes, linear.adapter_config, ctx, linear.dtype)
    return y + delta.astype(y.dtype)


SPEC = register(MethodSpec(
    name="lora",
    paper="LoRA (Hu et al. 2021)",
    allowed_targets=LINEAR_MODULES,
    default_targets=LINEAR_MODULES,
    wraps="linears (q k v o gate up down)",
    adapt_linear=adapt_linear,
    defaults={"router_init": "kaiming", "lora_init": "kaiming"},  # PEFT's A init
    presets=("lora",),
    export_formats=("native", "peft"),
    mergeable=True,
))
