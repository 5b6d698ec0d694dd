"""The training objective's weights: the train config's `objective` section.

Loss weights and the options of each balance term are training settings, not part of an
adapter: they fix neither a parameter's shape nor how a router routes, so a run may resume
with other weights (the change is logged). The pure loss functions stay in `moe_lora_jax.losses`;
`losses.total_loss(logits, batch, intermediates, adapter_config, objective)` adds them.
"""

from moe_lora_jax.objective.weights import (
    COEF_DEFAULTS,
    COEF_METHODS,
    LORAMOE_FORMS,
    OBJECTIVE_FIELDS,
    SWITCH_FORMS,
    Objective,
    legacy_objective,
    resolve_objective,
)



def __getattr__(name: str):
    if name == "CONTRASTIVE_METHODS":  # derived from the method registry when asked
        from moe_lora_jax.objective import weights

        return weights.CONTRASTIVE_METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COEF_DEFAULTS", "COEF_METHODS", "CONTRASTIVE_METHODS", "LORAMOE_FORMS", "OBJECTIVE_FIELDS", "SWITCH_FORMS",
    "Objective", "legacy_objective", "resolve_objective",
]
