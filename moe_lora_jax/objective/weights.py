"""`Objective`: the weight of every balance term and the options of each term.

A field left at None takes the method's default (the papers' values, below) or the adapter
preset's value; `resolve_objective` fills them in and checks that every non-zero weight applies
to the adapter's method (a weight for a router the method does not have is a one-line error).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from moe_lora_jax.errors import MoeLoraError

SWITCH_FORMS = ("mola", "mixtral")  # mola: per layer, summed over layers; mixtral: one global term
LORAMOE_FORMS = ("code", "paper")  # code: CV^2 = var/mean^2 (the authors' code); paper: var/mean (the paper's equation)
COEF_NAMES = ("switch_coef", "importance_coef", "z_loss_coef", "loramoe_coef", "milora_coef", "contrastive_coef")


class _Derived(Mapping):
    """A read-only mapping computed from the method registry on every access (so it lists methods
    registered later): each method's file declares its balance terms and objective defaults once."""

    def __init__(self, compute):
        self._compute = compute

    def __getitem__(self, key):
        return self._compute()[key]

    def __iter__(self):
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __repr__(self) -> str:
        return repr(self._compute())


def _coef_methods() -> dict[str, tuple[str, ...]]:
    from moe_lora_jax.adapters import registry

    return registry.coef_methods()


def _coef_defaults() -> dict[str, dict[str, float]]:
    from moe_lora_jax.adapters import registry

    out: dict[str, dict[str, float]] = {}
    for method in registry.method_names():
        for name, value in registry.objective_defaults(method).items():
            if name in COEF_NAMES:
                out.setdefault(name, {})[method] = value
    return out


# The methods whose routers define each weight (from each MethodSpec's balance_terms). Switch needs a
# top-k selection (mola, mixlora, milora); importance and z-loss need a router (every method but lora);
# LoRAMoE's constraint needs its two expert groups; MiLoRA's term its prompt routers; the contrastive
# loss LoRA experts.
COEF_METHODS: Mapping[str, tuple[str, ...]] = _Derived(_coef_methods)
# Defaults of weights left at None, per method (0 for every method not named): each spec's objective_defaults
# (MoLA's code and MixLoRA's router_aux_loss_coef: switch 1e-3; LoRAMoE 0.1; MiLoRA 1e-2).
COEF_DEFAULTS: Mapping[str, dict[str, float]] = _Derived(_coef_defaults)


def __getattr__(name: str) -> Any:
    if name == "CONTRASTIVE_METHODS":  # methods whose experts are LoRA experts
        return COEF_METHODS["contrastive_coef"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _switch_form_default(method: str) -> str:
    from moe_lora_jax.adapters import registry

    return registry.objective_defaults(method).get("switch_form", "mola")  # mixlora: "mixtral"


OPTION_DEFAULTS: dict[str, Any] = {"loramoe_delta": 0.1, "loramoe_form": "code", "contrastive_temperature": 0.07}


@dataclass(frozen=True)
class Objective:
    """Weights and term options (None: the method's default, or the adapter preset's value).

    switch_coef, switch_form: Switch aux (N * sum f_i P_i) weight and form ("mola": per layer, summed;
      "mixtral": one global term). Default 1e-3 for mola and mixlora (mixtral form for mixlora), else 0.
    importance_coef: Shazeer importance CV^2 (default 0). z_loss_coef: ST-MoE router z-loss (default 0).
    loramoe_coef, loramoe_delta, loramoe_form: LoRAMoE's localized balancing constraint (default 0.1 for
      loramoe), its delta (LoRAMoE's blc_alpha, 0.1) and form ("code": var/mean^2, the authors' code;
      "paper": var/mean, the paper's equation; they differ by mean(I * Q): each needs its own weight).
    milora_coef: MiLoRA's prompt-level balance (default 1e-2 for milora).
    contrastive_coef, contrastive_temperature: the contrastive expert loss (molora, mola, loramoe,
      mixlora; 0 = off, and then the model computes no expert outputs) and its InfoNCE temperature (0.07).
    """

    switch_coef: float | None = None
    switch_form: str | None = None
    importance_coef: float | None = None
    z_loss_coef: float | None = None
    loramoe_coef: float | None = None
    loramoe_delta: float | None = None
    loramoe_form: str | None = None
    milora_coef: float | None = None
    contrastive_coef: float | None = None
    contrastive_temperature: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name.endswith("_form"):
                if not isinstance(value, str):
                    raise MoeLoraError(f"objective.{f.name}={value!r} is not a string")
                continue
            if isinstance(value, str):  # YAML reads 1e-3 as a string
                try:
                    value = float(value)
                except ValueError:
                    raise MoeLoraError(f"objective.{f.name}={value!r} is not a number") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MoeLoraError(f"objective.{f.name}={value!r} is not a finite number")
            object.__setattr__(self, f.name, float(value))
        for name in COEF_NAMES:
            if (getattr(self, name) or 0.0) < 0:
                raise MoeLoraError(f"objective.{name}={getattr(self, name)} is negative: a loss weight is >= 0 (0 turns it off)")
        if self.switch_form is not None and self.switch_form not in SWITCH_FORMS:
            raise MoeLoraError(f"objective.switch_form={self.switch_form!r}: use one of {', '.join(SWITCH_FORMS)}")
        if self.loramoe_form is not None and self.loramoe_form not in LORAMOE_FORMS:
            raise MoeLoraError(f"objective.loramoe_form={self.loramoe_form!r}: use one of {', '.join(LORAMOE_FORMS)}")
        if self.contrastive_temperature is not None and not self.contrastive_temperature > 0:
            raise MoeLoraError(f"objective.contrastive_temperature={self.contrastive_temperature} must be positive (e.g. 0.07)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Objective":
        d = dict(d or {})
        unknown = sorted(set(d) - set(OBJECTIVE_FIELDS))
        if unknown:
            raise MoeLoraError(f"unknown objective key(s) {unknown}: valid keys are {', '.join(OBJECTIVE_FIELDS)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "Objective":
        return dataclasses.replace(self, **changes)

    # weights as the loss reads them (resolve_objective has filled every None)
    def weight(self, name: str) -> float:
        return float(getattr(self, name) or 0.0)


OBJECTIVE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Objective))


def resolve_objective(objective: "Objective | Mapping[str, Any] | None", method: str,
                      preset: Mapping[str, Any] | None = None) -> Objective:
    """Every field filled: the objective's own value, else the preset's, else the method's default.

    A non-zero weight whose term `method` does not define is refused, naming `objective.NAME` and the method.
    """
    obj = objective if isinstance(objective, Objective) else Objective.from_dict(objective)
    pre = Objective.from_dict(preset)
    out: dict[str, Any] = {}
    for name in OBJECTIVE_FIELDS:
        value = getattr(obj, name)
        if value is None:
            value = getattr(pre, name)
        if value is None:
            if name in COEF_NAMES:
                value = COEF_DEFAULTS.get(name, {}).get(method, 0.0)
            elif name == "switch_form":
                value = _switch_form_default(method)
            else:
                value = OPTION_DEFAULTS[name]
        out[name] = value
    resolved = Objective(**out)
    for name, methods in dict(COEF_METHODS).items():
        value = getattr(resolved, name)
        if value and method not in methods:
            raise MoeLoraError(
                f"objective.{name}={value} does not apply to method {method} (only to {', '.join(methods)}): "
                f"drop it or set it to 0"
            )
    return resolved


def legacy_objective(adapter_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The objective fields an adapter_config.json written before the objective section carries
    (weights then lived in the adapter config); {} for a current one. Weights the method never used
    (old files wrote loramoe_coef=0.1 and milora_coef=0.01 for every method: no-ops then) are left out."""
    method = str(adapter_dict.get("method", "lora"))
    applies = dict(COEF_METHODS)
    return {k: adapter_dict[k] for k in OBJECTIVE_FIELDS
            if k in adapter_dict and not (k in applies and method not in applies[k])}
