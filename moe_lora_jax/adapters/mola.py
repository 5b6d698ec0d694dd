"""MoLA (Gao et al. 2024) and AlphaLoRA (Qing et al. 2024): E_l LoRA experts per linear, E_l set per layer
by an Allocation, each token routed to the layer's top-k (renormalised).

AlphaLoRA is not a method of its own: its adapter is MoLA's, and only the Allocation's recipe differs
(per-layer counts from the frozen weights' PL_Alpha_Hill). The preset `alphalora` sets method mola with
that recipe, and the saved adapter records the Allocation (its `method` says alphalora).
"""

from __future__ import annotations

from typing import Any

from moe_lora_jax.adapters import experts
from moe_lora_jax.adapters.config import LINEAR_MODULES
from moe_lora_jax.adapters.registry import MethodSpec, register


def layer_top_k(linear: Any) -> int:
    """This layer's top-k: the Allocation's per-layer value, else top_k capped by the layer's experts."""
    return linear.adapter_config.layer_top_k(linear.target, linear.layer, linear.num_experts)


def validate_for(ac: Any, model_config: Any) -> None:
    # with an Allocation each layer routes min(top_k, its experts) (or the Allocation's own top-k)
    experts.check_expert_counts(ac, model_config, ac.targets, top_k_fits=ac.allocation is None)


SPEC = register(MethodSpec(
    name="mola",
    paper="MoLA (Gao et al. 2024); AlphaLoRA (Qing et al. 2024) with an alphalora Allocation",
    allowed_targets=LINEAR_MODULES,
    default_targets=LINEAR_MODULES,
    wraps="linears: LoRA expert bank, experts per layer",
    adapt_linear=experts.expert_bank_adapt(layer_top_k),
    defaults={"router_init": "kaiming", "lora_init": "kaiming"},
    presets=("mola", "alphalora"),
    objective_defaults={"switch_coef": 1e-3},  # MoLA's code (router_aux_loss_coef) when its balance loss is on
    routed=True,
    router_stats="token",
    balance_terms=("switch_coef", "importance_coef", "z_loss_coef", "contrastive_coef"),
    sparse_router=True,
    uses_allocation=True,
    expert_bank=True,
    linear_kwargs=experts.expert_count_kwargs,
    validate_for=validate_for,
    uniform_layer_params=experts.equal_counts,
))
