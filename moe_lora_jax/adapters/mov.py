"""MoV (Zadouri et al. 2023): E IA3 scaling vectors soft-mixed by a token router, on k, v (per attention
head by default, as the reference's MoVAttention) and on the FFN activation silu(gate) * up."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from moe_lora_jax.adapters import experts, layers
from moe_lora_jax.adapters.config import MOV_MODULES
from moe_lora_jax.adapters.registry import MethodSpec, register


class IA3Mixture(nn.Module):
    """MoV on an activation that is not a linear's output (the FFN's): E IA3 vectors, soft-merged."""

    adapter_config: Any
    num_experts: int
    axis: str

    @nn.compact
    def __call__(self, y: jax.Array, ctx: Any) -> jax.Array:
        return layers.ia3_mixture(self, y, self.axis, self.num_experts, self.adapter_config, ctx)


def adapt_linear(linear: Any, x: Any, y: Any, ctx: Any) -> Any:
    """y scaled by the mixture of IA3 vectors: per KV head (num_heads set) or once per token."""
    ac = linear.adapter_config
    if linear.num_heads:
        return layers.ia3_head_mixture(linear, y, linear.num_heads, linear.num_experts, ac, ctx)
    return layers.ia3_mixture(linear, y, linear.kernel_axes[1], linear.num_experts, ac, ctx)


def linear_kwargs(ac: Any, model_config: Any, layer: int, target: str) -> dict[str, Any]:
    kw = experts.expert_count_kwargs(ac, model_config, layer, target)
    if ac.mov_routing == "head" and target in ("k", "v"):
        kw["num_heads"] = model_config.num_key_value_heads
    return kw


def ffn_activation(mlp: Any, act: Any, ctx: Any) -> Any:
    """The FFN activation scaled by its IA3 mixture (`mlp/ffn_ia3`) when "ffn" is a target."""
    ac = mlp.adapter_config
    if "ffn" not in ac.targets:
        return act
    E = ac.expert_counts("ffn", mlp.config.num_hidden_layers)[mlp.layer]
    return IA3Mixture(ac, E, "mlp", name="ffn_ia3")(act, ctx)


SPEC = register(MethodSpec(
    name="mov",
    paper="MoV (Zadouri et al. 2023)",
    allowed_targets=MOV_MODULES,
    default_targets=MOV_MODULES,
    wraps="k, v outputs and the FFN activation: IA3 vectors",
    adapt_linear=adapt_linear,
    defaults={"router_init": "normal", "lora_init": "kaiming"},
    presets=("mov",),
    legacy_defaults={"mov_routing": "token"},  # written before per-head routing: its vectors are [E, O]
    routed=True,
    router_stats="token",
    balance_terms=("importance_coef", "z_loss_coef"),
    uses_rank=False,
    uses_allocation=True,
    linear_kwargs=linear_kwargs,
    ffn_activation=ffn_activation,
    validate_for=lambda ac, model_config: experts.check_expert_counts(ac, model_config, ac.targets),
    uniform_layer_params=experts.equal_counts,
))
