"""The LoRA expert bank shared by MoLoRA, MoLA and LoRAMoE, and the expert-count checks of every expert method.

Each adapted linear holds E LoRA experts (A [E, D, r], B [E, r, O]) and a token router; the
methods differ in the router's selection (dense softmax, or a per-layer top-k) and in their
balance terms. The math is `adapters.layers.expert_bank_delta`.
"""

from __future__ import annotations

from typing import Any, Callable

from moe_lora_jax.adapters import layers
from moe_lora_jax.errors import MoeLoraError


def expert_bank_adapt(top_k: Callable[[Any], int | None]) -> Callable[..., Any]:
    """An `adapt_linear` hook: y + the expert bank's delta, routing the top `top_k(linear)` experts (None: all, dense)."""

    def adapt_linear(linear: Any, x: Any, y: Any, ctx: Any) -> Any:
        ac = linear.adapter_config
        delta = layers.expert_bank_delta(linear, x, linear.features, linear.kernel_axes, linear.num_experts, ac, ctx,
                                         linear.dtype, top_k(linear))
        return y + delta.astype(y.dtype)

    return adapt_linear


def dense(linear: Any) -> None:
    """Every expert, softmax-weighted (MoLoRA, LoRAMoE)."""
    return None


def expert_count_kwargs(ac: Any, model_config: Any, layer: int, target: str) -> dict[str, Any]:
    """`linear_kwargs` of an expert method: this linear's expert count in this layer."""
    return {"num_experts": ac.expert_counts(target, model_config.num_hidden_layers)[layer]}


def check_expert_counts(ac: Any, model_config: Any, modules: tuple[str, ...], *, top_k_fits: bool = False,
                        even: bool = False) -> None:
    """Every layer of every module in `modules` has one count, >= 1; with `top_k_fits`, >= top_k;
    with `even`, an even count (LoRAMoE's two groups)."""
    L = model_config.num_hidden_layers
    for m in modules:
        counts = ac.expert_counts(m, L)
        if len(counts) != L:
            raise MoeLoraError(
                f"the Allocation gives {len(counts)} counts for {m} but the model has {L} layers: give one count per layer"
            )
        for i, c in enumerate(counts):
            if c <= 0:
                raise MoeLoraError(
                    f"the Allocation gives layer {i} of {m} {c} experts: every layer needs at least one expert"
                )
            if top_k_fits and ac.top_k > c:
                raise MoeLoraError(
                    f"top_k={ac.top_k} is larger than the {c} experts of {m} in layer {i}: lower top_k or give that layer more experts"
                )
            if even and c % 2:
                raise MoeLoraError(
                    f"LoRAMoE splits experts in two groups but {m} in layer {i} has {c}: use even counts"
                )


def equal_counts(ac: Any, num_layers: int) -> bool:
    """`uniform_layer_params` of an expert method: every target has the same expert count in every layer."""
    return all(len(set(ac.expert_counts(t, num_layers))) == 1 for t in ac.targets)
