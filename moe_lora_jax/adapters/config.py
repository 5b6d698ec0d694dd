"""`AdapterConfig`: one frozen, hashable description of every adapter method.

Every method (lora, molora, mov, mola, loramoe, mixlora, milora) is a
configuration of the same `LlamaForCausalLM`; the model reads this config to
decide which adapter weights to create and how to route. Fields left at `None`
take the method's default (its `MethodSpec` in `adapters/registry.py`), resolved by the properties
below, so the same config object round-trips through JSON unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from moe_lora_jax import layout
from moe_lora_jax.allocation.allocation import Allocation
from moe_lora_jax.errors import MoeLoraError

# The adapted linears and their groups come from the one table (moe_lora_jax.layout).
LINEAR_MODULES = layout.ALL
ATTENTION_MODULES = layout.ATTENTION
FFN_MODULES = layout.FFN
MOV_MODULES = ("k", "v", "ffn")  # "ffn": the SwiGLU activation silu(gate) * up that feeds down_proj
POOLINGS = ("attention", "mean", "last", "max")
ROUTER_INITS = ("kaiming", "normal")
LORA_INITS = ("kaiming", "normal")  # LoRA A: torch nn.Linear's kaiming-uniform (PEFT) or normal(0.02) (MoV paper's code)
MOV_ROUTINGS = ("head", "token")  # MoV on k/v: per attention head (reference MoVAttention) or once per token
RENORMALIZE = (True, False, "always")  # True: when k > 1; "always": also at top-1 (gate 1, the references' code)
MILORA_ACTIVATIONS = ("rational", "gelu", "relu")

# Loss weights and term options live in the train config's objective section (moe_lora_jax.objective).
from moe_lora_jax.objective.weights import (  # noqa: E402, F401  (re-exported for older imports)
    COEF_DEFAULTS, LORAMOE_FORMS, OBJECTIVE_FIELDS, SWITCH_FORMS,
)
from moe_lora_jax.adapters import registry  # noqa: E402  (method facts: adapters/<method>.py)

# Fields that change neither a parameter's shape nor the routing structure: training-time
# regularisers and what the model sows for the objective. A checkpoint's identity leaves them out.
NON_IDENTITY_FIELDS = ("dropout", "router_jitter", "sow_expert_outputs")


def __getattr__(name: str) -> Any:
    """METHODS, METHOD_DEFAULTS (and the objective's COEF_METHODS, CONTRASTIVE_METHODS) read the
    method registry when asked, so a method registered later is listed too."""
    if name == "METHODS":
        return registry.method_names()
    if name == "METHOD_DEFAULTS":  # the values of fields left at None, per method
        return {n: {"target_modules": s.default_targets, **s.defaults} for n, s in registry.REGISTRY.items()}
    if name in ("COEF_METHODS", "CONTRASTIVE_METHODS"):
        from moe_lora_jax.objective import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter, where, and how it routes. Frozen and hashable (a static jit argument).

    Fields:
      method: a registered method (adapters.registry: lora, molora, mov, mola, loramoe, mixlora, milora).
      rank, alpha, dropout: LoRA rank r, scale alpha/r (alpha/sqrt(r) with `use_rslora`), dropout on the LoRA input.
      target_modules: linears that get adapters (q k v o gate up down; for mov: k, v, ffn). None: method default.
      num_experts: experts per target (molora, mov, loramoe, mixlora) when `allocation` is None.
      top_k: experts selected per token (mola, mixlora) or LoRA modules per prompt (milora). With an
        Allocation, a layer routes the Allocation's per-layer top-k where it has one, else min(top_k, its experts).
      allocation: per-layer expert counts per module (mola / AlphaLoRA); None means `num_experts` everywhere.
      renormalize: renormalise the top-k probabilities to sum to 1 when k > 1 (True). At k = 1 the gate is the
        router probability (Switch): a gate of exactly 1 would give the router no gradient from the task loss.
        "always": renormalise at k = 1 too (gate 1), as the reference code of MoLA and the mixlora package does;
        False: never renormalise.
      router_init: "kaiming" (uniform, bound 1/sqrt(fan_in), like torch's nn.Linear) or "normal" (std router_init_range).
      router_jitter: multiplicative uniform noise on router inputs while training (Switch/MixLoRA jitter).
      milora_pooling: how MiLoRA pools the prompt's hidden states: attention, mean, last or max.
      milora_router_dim: width of MiLoRA's router hidden layer (before the rational activation).
      milora_activation: MiLoRA's router activation (rational | gelu | relu) in every layer, or in the
        first half of the layers (index < L // 2) when `milora_activation_deep` is set.
      milora_activation_deep: the activation of the second half of the layers; None: as milora_activation.
      mov_routing: MoV on k/v: "head" (a router [head_dim, E] shared by the heads, applied to each head's
        slice, vectors [heads, E, head_dim], as the reference's MoVAttention) or "token" (one route per token).
      lora_init: LoRA A initialiser, "kaiming" (uniform +-1/sqrt(fan_in)) or "normal" (std 0.02). None: method default.
      sow_expert_outputs: sow every expert's output (`expert_gram`) for the contrastive expert loss
        (molora, mola, loramoe, mixlora). The training loop sets it from objective.contrastive_coef > 0;
        False (default) computes nothing extra. For the dense routers (molora, loramoe) the loss counts a
        token's `top_k` largest gates as its routed experts.
    Loss weights (Switch, importance, z-loss, LoRAMoE, MiLoRA, contrastive) are not adapter fields: they are
    the train config's `objective` section (moe_lora_jax.objective.Objective). dropout, router_jitter and
    sow_expert_outputs are not part of a checkpoint's identity (NON_IDENTITY_FIELDS): a run may resume with others.
    """

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    num_experts: int = 4
    top_k: int = 2
    allocation: Any = None
    use_rslora: bool = False
    renormalize: bool | str = True
    router_init: str | None = None
    router_init_range: float = 0.02
    router_jitter: float = 0.0
    milora_pooling: str = "attention"
    milora_router_dim: int = 64
    milora_activation: str = "rational"
    milora_activation_deep: str | None = None
    mov_routing: str = "head"
    lora_init: str | None = None
    sow_expert_outputs: bool = False

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.target_modules is not None and not isinstance(self.target_modules, tuple):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        spec = registry.get_method(self.method)  # unknown: one line listing the registered methods
        allowed = spec.allowed_targets
        for m in self.targets:
            if m not in allowed:
                raise MoeLoraError(
                    f"unknown target module {m!r} for method {self.method}: use some of {', '.join(allowed)}"
                )
        if not self.targets:
            raise MoeLoraError("target_modules is empty: name at least one of " + ", ".join(allowed))
        if spec.uses_rank and self.rank <= 0:
            raise MoeLoraError(f"rank={self.rank} must be a positive integer: LoRA needs rank >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise MoeLoraError(f"dropout={self.dropout} must be in [0, 1)")
        if self.num_experts <= 0:
            raise MoeLoraError(f"num_experts={self.num_experts} must be positive")
        if self.top_k <= 0:
            raise MoeLoraError(f"top_k={self.top_k} must be positive")
        if self.renormalize not in RENORMALIZE or isinstance(self.renormalize, int) and not isinstance(self.renormalize, bool):
            raise MoeLoraError(f"renormalize={self.renormalize!r}: use true (when k > 1), false or 'always' (also at top-1)")
        if self.renormalize != "always":  # numpy bools become plain ones: the gates test `is True`
            object.__setattr__(self, "renormalize", bool(self.renormalize))
        if self.milora_pooling not in POOLINGS:
            raise MoeLoraError(f"milora_pooling={self.milora_pooling!r}: use one of {', '.join(POOLINGS)}")
        if self.router_init is not None and self.router_init not in ROUTER_INITS:
            raise MoeLoraError(f"router_init={self.router_init!r}: use one of {', '.join(ROUTER_INITS)}")
        if not 0.0 <= self.router_jitter < 1.0:  # noise is uniform in [1 - j, 1 + j]: j >= 1 can zero or flip inputs
            raise MoeLoraError(f"router_jitter={self.router_jitter} must be in [0, 1): 0 turns jitter off")
        if spec.validate is not None:  # the method's own checks (LoRAMoE's even experts, ...)
            spec.validate(self)
        if self.mov_routing not in MOV_ROUTINGS:
            raise MoeLoraError(f"mov_routing={self.mov_routing!r}: use one of {', '.join(MOV_ROUTINGS)}")
        if self.lora_init is not None and self.lora_init not in LORA_INITS:
            raise MoeLoraError(f"lora_init={self.lora_init!r}: use one of {', '.join(LORA_INITS)}")
        for name in ("milora_activation", "milora_activation_deep"):
            value = getattr(self, name)
            if value is not None and value not in MILORA_ACTIVATIONS:
                raise MoeLoraError(f"{name}={value!r}: use one of {', '.join(MILORA_ACTIVATIONS)}")
        if self.sow_expert_outputs and "contrastive_coef" not in spec.balance_terms:
            contrastive = registry.coef_methods()["contrastive_coef"]
            raise MoeLoraError(
                f"sow_expert_outputs does not apply to method {self.method}: the contrastive expert loss needs "
                f"LoRA experts ({', '.join(contrastive)}); set objective.contrastive_coef=0"
            )

    # ------------------------------------------------------------ resolved values
    @property
    def spec(self) -> "registry.MethodSpec":
        """This method's registry entry."""
        return registry.get_method(self.method)

    @property
    def targets(self) -> tuple[str, ...]:
        t = self.target_modules if self.target_modules is not None else self.spec.default_targets
        return tuple(t)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    @property
    def resolved_router_init(self) -> str:
        return self.router_init or self.spec.defaults["router_init"]

    @property
    def resolved_lora_init(self) -> str:
        return self.lora_init or self.spec.defaults.get("lora_init", "kaiming")

    def milora_activation_at(self, layer: int, num_layers: int) -> str:
        """MiLoRA's router activation in `layer`: the deep one for layer >= num_layers // 2 when set."""
        if self.milora_activation_deep is not None and layer >= num_layers // 2:
            return self.milora_activation_deep
        return self.milora_activation

    @property
    def routed(self) -> bool:
        return self.spec.routed

    def expert_counts(self, module: str, num_layers: int) -> tuple[int, ...]:
        """Experts of `module` in every layer: from the Allocation, else `num_experts` everywhere."""
        if self.allocation is None or not self.spec.uses_allocation:
            return (self.num_experts,) * num_layers
        return tuple(int(c) for c in self.allocation.counts(module))

    def layer_top_k(self, module: str, layer: int, num_experts: int) -> int:
        """Experts each token is routed to in `layer` of `module`: the Allocation's per-layer top-k where it
        has one, else top_k capped by the layer's expert count (AlphaLoRA's rule: one expert routes top-1)."""
        if self.allocation is not None and self.spec.uses_allocation:
            per_module = getattr(self.allocation, "top_k", None)
            per_layer = per_module(module) if callable(per_module) else None
            if per_layer is not None:
                return int(per_layer[layer])
        return min(self.top_k, num_experts)

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ model checks
    def validate_for(self, model_config: Any) -> None:
        """Raise MoeLoraError where this adapter cannot be built on `model_config` (a LlamaConfig)."""
        L = model_config.num_hidden_layers
        spec = self.spec
        dims = linear_dims(model_config)
        if spec.uses_rank:
            for m in self.targets:
                d_in, d_out = dims[m]
                if self.rank > min(d_in, d_out):
                    raise MoeLoraError(
                        f"rank={self.rank} is larger than the {m}_proj linear ({d_in} -> {d_out}): choose rank <= {min(d_in, d_out)}"
                    )
        if self.allocation is not None:
            if not spec.uses_allocation:
                raise MoeLoraError(f"an Allocation is only used by expert methods, not by {self.method}: drop it")
            n = int(getattr(self.allocation, "num_layers", L))
            if n != L:
                raise MoeLoraError(
                    f"the Allocation covers {n} layers but the model has {L}: build it with num_layers={L}"
                )
        if spec.validate_for is not None:  # the method's own checks (expert counts per layer, top-k, groups)
            spec.validate_for(self, model_config)

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        out["allocation"] = None if self.allocation is None else allocation_to_dict(self.allocation)
        return out

    def identity_dict(self) -> dict[str, Any]:
        """`to_dict` without NON_IDENTITY_FIELDS: what fixes parameter shapes and routing (a checkpoint's identity)."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_IDENTITY_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(OBJECTIVE_FIELDS))
        if unknown:
            raise MoeLoraError(f"adapter config has unknown fields {unknown}: it was written by another version")
        kw = dict(d)
        spec = registry.REGISTRY.get(str(kw.get("method", "lora")))
        for name, value in ({} if spec is None else spec.legacy_defaults).items():
            kw.setdefault(name, value)  # a field the method's files were written without (MoV: mov_routing)
        # Adapters written before the objective section carry the loss weights (and their options):
        # they are the training run's, not the adapter's (see moe_lora_jax.objective.legacy_objective).
        for name in OBJECTIVE_FIELDS:
            kw.pop(name, None)
        if kw.get("target_modules") is not None:
            kw["target_modules"] = tuple(kw["target_modules"])
        if kw.get("allocation") is not None:
            kw["allocation"] = allocation_from_dict(kw["allocation"])
        return cls(**kw)


def _check_field_types(ac: "AdapterConfig") -> None:
    """Refuse values of the wrong type (rank=abc, top_k=null) with one line, before any arithmetic on them.

    Fields typed int / float / bool / str (or those | None) are checked; an int is a float, a numeric
    string is converted for a float field (YAML reads 1e-3 as a string), and floats must be finite.
    Fields of other types are left to their own checks.
    """
    import math
    import numbers

    def show(v: Any) -> str:
        return "null" if v is None else repr(v)

    scalars = {"int": int, "float": float, "bool": bool, "str": str}
    for f in dataclasses.fields(ac):
        # annotations are strings here (from __future__ import annotations): read them without evaluating
        parts = [p.strip() for p in str(f.type).split("|")] if isinstance(f.type, str) else [getattr(f.type, "__name__", "")]
        optional = "None" in parts
        kinds = [p for p in parts if p != "None"]
        if len(kinds) != 1 or kinds[0] not in scalars:
            continue
        name, base, value = f.name, scalars[kinds[0]], getattr(ac, f.name)
        if value is None:
            if optional:
                continue
            what = {int: "whole number", float: "number", bool: "true or false", str: "string"}[base]
            raise MoeLoraError(f"{name}=null is not allowed: give a {what} (or drop the key for the default)")
        if base is bool:
            if not isinstance(value, bool):
                raise MoeLoraError(f"{name}={show(value)} is not a boolean: use true or false")
        elif base is int:  # numpy integers count; 8.0 is 8
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
                raise MoeLoraError(f"{name}={show(value)} is not an integer: give a whole number")
            object.__setattr__(ac, name, int(value))
        elif base is float:
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise MoeLoraError(f"{name}={show(value)} is not a number") from None
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise MoeLoraError(f"{name}={show(value)} is not a number")
            if not math.isfinite(value):
                raise MoeLoraError(f"{name}={value} is not a finite number")
            object.__setattr__(ac, name, value if isinstance(value, int) else float(value))
        elif not isinstance(value, str):
            raise MoeLoraError(f"{name}={show(value)} is not a string")


def linear_dims(model_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of the seven target linears of a LlamaConfig (read from moe_lora_jax.layout)."""
    return layout.all_dims(model_config)


# ---------------------------------------------------------------- Allocation JSON
def allocation_to_dict(alloc: Any) -> dict[str, Any]:
    """{"num_layers": L, "counts": {module: [c_0, ..., c_{L-1}]}} (uses the Allocation's own to_dict when it has one)."""
    if hasattr(alloc, "to_dict"):
        return {"allocation": alloc.to_dict()}
    return {
        "num_layers": int(alloc.num_layers),
        "counts": {m: [int(c) for c in alloc.counts(m)] for m in alloc.modules},
    }


def allocation_from_dict(d: Mapping[str, Any]) -> Any:
    """The Allocation saved by `allocation_to_dict` (or the older {"num_layers", "counts"} form)."""
    if "allocation" in d:
        return Allocation.from_dict(d["allocation"])
    return Allocation.from_counts({m: tuple(c) for m, c in d["counts"].items()})
