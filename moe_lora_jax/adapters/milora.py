"""MiLoRA (Zhang et al. 2024): the LoRA modules of a layer are its experts; one router per layer reads the
pooled prompt (attention pooling + a learnable rational activation), picks the top-k modules once per
prompt, and the decision is reused for every decoded token (the KV cache's `routing`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from moe_lora_jax.adapters import layers
from moe_lora_jax.adapters.config import LINEAR_MODULES
from moe_lora_jax.adapters.registry import MethodSpec, register
from moe_lora_jax.errors import MoeLoraError


class MiLoRARouter(nn.Module):
    """One router per layer over the layer's LoRA modules, from the pooled prompt."""

    adapter_config: Any
    activation: str = "rational"  # this layer's router activation (AdapterConfig.milora_activation_at)

    @nn.compact
    def __call__(self, h_BxLxD: jax.Array, pool_mask_BxL: jax.Array) -> jax.Array:
        ac = self.adapter_config
        return layers.milora_route(self, h_BxLxD, pool_mask_BxL, len(ac.targets), ac, self.activation)


def layer_router(layer: Any, h_BxLxD: Any, ctx: Any) -> Any:
    """This layer's gates [B, M]: reused from ctx.routing_BxNxM (decode steps), else the router's."""
    if ctx.routing_BxNxM is not None:
        return ctx.routing_BxNxM[:, layer.layer]
    ac = layer.adapter_config
    activation = ac.milora_activation_at(layer.layer, layer.config.num_hidden_layers)
    return MiLoRARouter(ac, activation, name="milora_router")(h_BxLxD, ctx.pool_mask_BxL)


def adapt_linear(linear: Any, x: Any, y: Any, ctx: Any) -> Any:
    """y + gate * LoRA delta, the gate this linear's share of the layer's routing decision."""
    ac = linear.adapter_config
    if ctx.layer_gates_BxM is None:
        raise ValueError("MiLoRA linears need the layer's routing gates in the adapter context")
    gate_B = ctx.layer_gates_BxM[:, ac.targets.index(linear.target)].astype(y.dtype)
    delta = layers.lora_delta(linear, x, linear.features, linear.kernel_axes, ac, ctx, linear.dtype).astype(y.dtype)
    return y + delta * gate_B.reshape((-1,) + (1,) * (y.ndim - 1))


def validate(ac: Any) -> None:
    if ac.top_k > len(ac.targets):
        raise MoeLoraError(
            f"top_k={ac.top_k} is larger than the {len(ac.targets)} LoRA modules per layer that MiLoRA routes between"
        )


def same_router_everywhere(ac: Any, num_layers: int) -> bool:
    """Layers differ only when the deep half's router activation differs (its rational weights)."""
    return ac.milora_activation_at(0, num_layers) == ac.milora_activation_at(num_layers - 1, num_layers)


SPEC = register(MethodSpec(
    name="milora",
    paper="MiLoRA (Zhang et al. 2024)",
    allowed_targets=LINEAR_MODULES,
    default_targets=LINEAR_MODULES,
    wraps="linears: LoRA; a per-layer prompt router over them",
    adapt_linear=adapt_linear,
    defaults={"router_init": "normal", "lora_init": "kaiming"},
    presets=("milora",),
    objective_defaults={"milora_coef": 1e-2},  # the paper's coefficient
    routed=True,
    router_stats="prompt",
    balance_terms=("switch_coef", "importance_coef", "z_loss_coef", "milora_coef"),
    sparse_router=True,
    batch_needs=("prompt_mask",),
    layer_router=layer_router,
    validate=validate,
    uniform_layer_params=same_router_everywhere,
))
