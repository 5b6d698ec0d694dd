"""MoLoRA (Zadouri et al. 2023): E LoRA experts per linear, mixed by a dense token-level softmax router."""

from __future__ import annotations

from moe_lora_jax.adapters import experts
from moe_lora_jax.adapters.config import LINEAR_MODULES
from moe_lora_jax.adapters.registry import MethodSpec, register

SPEC = register(MethodSpec(
    name="molora",
    paper="MoLoRA (Zadouri et al. 2023)",
    allowed_targets=LINEAR_MODULES,
    default_targets=LINEAR_MODULES,
    wraps="linears: LoRA expert bank",
    adapt_linear=experts.expert_bank_adapt(experts.dense),
    # for-ai/parameter-efficient-moe configs/molora.gin: router and A normal(stddev=2e-2) (src/molora.py), B zeros
    defaults={"router_init": "normal", "lora_init": "normal"},
    presets=("molora",),
    routed=True,
    router_stats="token",
    balance_terms=("importance_coef", "z_loss_coef", "contrastive_coef"),
    uses_allocation=True,
    expert_bank=True,
    linear_kwargs=experts.expert_count_kwargs,
    validate_for=lambda ac, model_config: experts.check_expert_counts(ac, model_config, ac.targets),
    uniform_layer_params=experts.equal_counts,
))
