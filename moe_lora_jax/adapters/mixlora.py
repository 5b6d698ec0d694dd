"""MixLoRA (Li et al. 2024): the FFN becomes E experts (the frozen FFN with per-expert LoRA on gate/up/down)
under one top-k router per FFN; attention linears get plain LoRA. Exports to the `mixlora` package's format."""

from __future__ import annotations

from typing import Any

from moe_lora_jax.adapters import experts, layers, lora
from moe_lora_jax.adapters.config import LINEAR_MODULES
from moe_lora_jax.adapters.registry import MethodSpec, register


def ffn(mlp: Any, x_BxLxD: Any, ctx: Any) -> Any:
    """The mixture of FFN experts in place of the SwiGLU FFN (declares gate/up/down_proj kernels itself)."""
    cfg = mlp.config
    return layers.mixlora_ffn(mlp, x_BxLxD, cfg, mlp.adapter_config, ctx, cfg.dtype, cfg.param_dtype)


SPEC = register(MethodSpec(
    name="mixlora",
    paper="MixLoRA (Li et al. 2024)",
    allowed_targets=LINEAR_MODULES,
    default_targets=LINEAR_MODULES,
    wraps="FFN (replaced by E FFN experts); attention linears: LoRA",
    adapt_linear=lora.adapt_linear,  # attention linears; the FFN's go through `ffn`
    defaults={"router_init": "normal", "lora_init": "kaiming"},
    presets=("mixlora",),
    objective_defaults={"switch_coef": 1e-3, "switch_form": "mixtral"},  # MixLoRA's router_aux_loss_coef
    routed=True,
    router_stats="token",
    balance_terms=("switch_coef", "importance_coef", "z_loss_coef", "contrastive_coef"),
    sparse_router=True,
    export_formats=("native", "mixlora"),
    ffn=ffn,
    validate_for=lambda ac, model_config: experts.check_expert_counts(ac, model_config, ("ffn",), top_k_fits=True),
))
