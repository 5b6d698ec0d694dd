"""Fold a plain LoRA adapter into the base kernels for serving.

    merged = merge_lora(base, adapter, adapter_config)
    LlamaForCausalLM(config).apply({"params": merged}, ids)   # no adapter, no overhead

Each target kernel W [in, out] becomes W + scale * A @ B (A [in, r], B [r, out]),
computed in float32 and cast back to the kernel's dtype. Only plain LoRA has a
token-independent delta; routed methods cannot be merged.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from moe_lora_jax import layout
from moe_lora_jax.adapters.config import AdapterConfig
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.stacking import unstack_layers


def _layer_names(params: Mapping[str, Any]) -> list[str]:
    return sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))


def _lora_leaf(adapter: Mapping[str, Any], layer: str, target: str) -> Mapping[str, Any]:
    lin = layout.linear(target)
    try:
        leaf = adapter[layer][lin.block][lin.proj]
        leaf["lora_A"], leaf["lora_B"]
    except (KeyError, TypeError):
        raise MoeLoraError(
            f"the adapter lacks {layer}/{lin.block}/{lin.proj}/lora_A or lora_B: "
            "it does not match its AdapterConfig or this base model"
        ) from None
    return leaf


def merge_lora(params: Mapping[str, Any], adapter: Mapping[str, Any], adapter_config: AdapterConfig) -> dict[str, Any]:
    """Base params with scale * A @ B added to every LoRA target kernel (a new tree; inputs are not changed)."""
    if not adapter_config.spec.mergeable:
        raise MoeLoraError(
            f"only plain LoRA can be merged into the base weights, not {adapter_config.method}: "
            "its adapter output depends on the router, so serve it unmerged"
        )
    import flax.linen as nn
    from flax.core import unfreeze

    merged = unstack_layers(unfreeze(nn.unbox(params)))  # new nested dicts sharing the (immutable) leaves
    adapter = nn.unbox(adapter)
    scale = adapter_config.scale
    for layer in _layer_names(merged):
        for target in adapter_config.targets:
            leaf = _lora_leaf(adapter, layer, target)
            lin = layout.linear(target)
            linear = merged[layer][lin.block][lin.proj]
            kernel = linear["kernel"]
            delta_IxO = jnp.dot(jnp.asarray(leaf["lora_A"], jnp.float32), jnp.asarray(leaf["lora_B"], jnp.float32),
                                precision=jax.lax.Precision.HIGHEST) * scale
            if delta_IxO.shape != kernel.shape:
                raise MoeLoraError(
                    f"{layer}/{lin.proj}: the LoRA delta has shape {delta_IxO.shape} but the kernel is {kernel.shape}: "
                    "the adapter was trained on a different base model"
                )
            linear["kernel"] = (kernel.astype(jnp.float32) + delta_IxO).astype(kernel.dtype)
    return merged
