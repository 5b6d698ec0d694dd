"""Which routing analysis applies to which adapter method, and what each one needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_lora_jax.errors import MoeLoraError


@dataclass(frozen=True)
class AnalysisSpec:
    """name: the analysis (and its output stem); methods: adapter methods it applies to;
    needs_data: it runs the model over examples (else it reads only the adapter weights)."""

    name: str
    methods: tuple[str, ...]
    needs_data: bool
    summary: str


ANALYSES: dict[str, AnalysisSpec] = {
    spec.name: spec
    for spec in (
        AnalysisSpec("expert_load", ("molora", "mov", "mola", "loramoe", "mixlora"), True,
                     "per-task expert load of every token router (MoV's specialisation figure)"),
        AnalysisSpec("milora_modules", ("milora",), True,
                     "per-task, per-layer share of prompts that select each LoRA module (MiLoRA's Figure 2)"),
        AnalysisSpec("loramoe_groups", ("loramoe",), True,
                     "gate mass on the world-knowledge expert group by task type (LoRAMoE)"),
        AnalysisSpec("expert_redundancy", ("molora", "mola", "loramoe", "mixlora"), False,
                     "pairwise distance of the experts' delta W = scale * A @ B per layer (MoLA)"),
    )
}


def _method(adapter_config: Any) -> str:
    return adapter_config if isinstance(adapter_config, str) else adapter_config.method


def applicable_analyses(adapter_config: Any) -> list[str]:
    """Names of the analyses that apply to `adapter_config` (an AdapterConfig or a method name), in table order."""
    method = _method(adapter_config)
    return [name for name, spec in ANALYSES.items() if method in spec.methods]


def check_analyses(names: Any, adapter_config: Any) -> list[str]:
    """`names` (None: every applicable one) checked against the method; raise one line for an unknown
    name or one that does not apply, naming those that do."""
    method = _method(adapter_config)
    usable = applicable_analyses(method)
    if names is None:
        if not usable:
            raise MoeLoraError(f"no routing analysis applies to method {method}: it has no routers or experts "
                               f"(analyses: {', '.join(ANALYSES)})")
        return usable
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in ANALYSES:
            raise MoeLoraError(f"unknown routing analysis {name!r}: use some of {', '.join(ANALYSES)}")
        if method not in ANALYSES[name].methods:
            hint = f"for {method} use {', '.join(usable)}" if usable else f"none applies to {method}"
            raise MoeLoraError(
                f"analysis {name} applies to {', '.join(ANALYSES[name].methods)}, not to method {method}: {hint}"
            )
    return list(dict.fromkeys(names))
