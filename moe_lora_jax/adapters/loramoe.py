"""LoRAMoE (Dou et al. 2023): LoRA experts on the FFN linears in two groups, a dense softmax router, and
the localized balancing constraint that needs each example's task type (`task_types` in the batch)."""

from __future__ import annotations

from typing import Any

from moe_lora_jax.adapters import experts
from moe_lora_jax.adapters.config import FFN_MODULES, LINEAR_MODULES
from moe_lora_jax.adapters.registry import MethodSpec, register
from moe_lora_jax.errors import MoeLoraError


def validate(ac: Any) -> None:
    if ac.num_experts % 2:
        raise MoeLoraError(f"LoRAMoE splits its experts in two groups: num_experts={ac.num_experts} must be even")


SPEC = register(MethodSpec(
    name="loramoe",
    paper="LoRAMoE (Dou et al. 2023)",
    allowed_targets=LINEAR_MODULES,
    default_targets=FFN_MODULES,
    wraps="FFN linears: LoRA expert bank, two groups",
    adapt_linear=experts.expert_bank_adapt(experts.dense),
    defaults={"router_init": "kaiming", "lora_init": "kaiming"},
    presets=("loramoe",),
    objective_defaults={"loramoe_coef": 0.1},
    routed=True,
    router_stats="token",
    balance_terms=("importance_coef", "z_loss_coef", "loramoe_coef", "contrastive_coef"),
    uses_allocation=True,
    expert_bank=True,
    batch_needs=("task_types",),
    linear_kwargs=experts.expert_count_kwargs,
    validate=validate,
    validate_for=lambda ac, model_config: experts.check_expert_counts(ac, model_config, ac.targets, even=True),
    uniform_layer_params=experts.equal_counts,
))
