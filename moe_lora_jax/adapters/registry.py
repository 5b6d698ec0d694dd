"""The method registry: every adapter method is one `MethodSpec`, declared in its own file.

A spec says what the method wraps (linear targets, the FFN, a per-layer router), its defaults
and paper presets, whether and how it routes (router statistics, balance terms that apply),
what the batch must carry, which export formats hold it, and the model hooks that compute it.
The model (`model/llama.py`), the objective, the train step and loop, adapter I/O and merge read
these facts instead of comparing method names. Adding a method: write `adapters/<name>.py` with
its hooks and `register(MethodSpec(...))`, add its module to `BUILTIN_MODULES` (or import it
before use), and test it; docs/architecture.md walks through one.

The built-in methods are imported on the first lookup (`get_method`, `REGISTRY`), not when
this module is imported: the method files import the adapter layers and config, which import this.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from moe_lora_jax.errors import MoeLoraError

# Router statistics a method's model sows, by kind: the prefix of the intermediates' names
# (`{prefix}_logits`, `{prefix}_gates`) that `losses.router_stats` reads.
STATS_PREFIX: dict[str, str] = {"token": "router", "prompt": "milora"}
ROUTER_STATS = ("none", *STATS_PREFIX)
# Where a per-layer router's decision is sown (and read back by generation through the KV cache).
LAYER_ROUTING_KEY = "milora_routing"
BALANCE_TERMS = ("switch_coef", "importance_coef", "z_loss_coef", "loramoe_coef", "milora_coef", "contrastive_coef")
EXPORT_FORMATS = ("native", "peft", "mixlora")
BUILTIN_MODULES = ("lora", "molora", "mov", "mola", "loramoe", "mixlora", "milora")  # files under adapters/


@dataclass(frozen=True)
class MethodSpec:
    """One adapter method: its declared facts and its model hooks.

    What it wraps:
      allowed_targets, default_targets: the linears (or "ffn" for MoV's FFN activation) it may adapt
        and adapts when `target_modules` is None.
      wraps: one line for the docs table ("q k v o gate up down", "FFN (replaced)", ...).
    Defaults and presets:
      defaults: AdapterConfig fields left at None -> this value (router_init, lora_init).
      presets: names in `adapters.presets.PRESETS` whose `method` is this one (the paper settings).
      legacy_defaults: fields absent from adapter files this method wrote before the field existed ->
        the value those files mean (MoV before per-head routing: mov_routing "token").
      objective_defaults: the objective's values for this method where the train config leaves them
        None (`switch_coef`, `switch_form`, `loramoe_coef`, `milora_coef`); every other weight defaults to 0.
    Routing:
      routed: it has a router (False: plain LoRA, no router statistics, no balance terms).
      router_stats: "token" (every routed linear / FFN sows router_logits, router_gates per token),
        "prompt" (one decision per prompt and layer: milora_logits, milora_gates), or "none".
      balance_terms: the objective weights that apply (objective.COEF_METHODS is derived from these).
      sparse_router: routes each token to a top-k selection (gates are 0 off it): the routing metrics
        count `top_k` experts per token and the contrastive loss reads the selection from the gates;
        a dense router's metrics count its argmax.
      uses_rank: has LoRA matrices (rank >= 1 is required, and fits the linear).
      uses_allocation: per-layer expert counts (and top-k) come from an `Allocation` when one is given.
      expert_bank: every adapted linear holds a LoRA expert bank `expert_bank_delta` (A [E, D, r],
        B [E, r, O], a token router): scanned layers may pad such banks to the largest count.
    Batch and exports:
      batch_needs: batch keys the method's objective or router reads beyond input_ids / attention_mask /
        loss_mask (task_types: LoRAMoE's constraint; prompt_mask: MiLoRA's pooling, derived from
        loss_mask when absent).
      export_formats: the adapter formats that hold it ("native" holds every method); mergeable: it is
        a token-independent delta that `merge_lora` can fold into the base kernels.
    Hooks (each reads its AdapterConfig from the module it is handed):
      adapt_linear(linear, x, y, ctx) -> y: the adapted output of a TargetLinear listed in the targets.
      linear_kwargs(ac, model_config, layer, target) -> dict: extra TargetLinear fields (num_experts, num_heads).
      ffn(mlp, x_BxLxD, ctx) -> y: replaces the whole FFN (MixLoRA); None keeps the SwiGLU FFN.
      ffn_activation(mlp, act, ctx) -> act: rescales silu(gate) * up before down_proj (MoV's "ffn" target).
      layer_router(layer, h_BxLxD, ctx) -> gates_BxM: one router per decoder layer (MiLoRA); the model
        puts the gates in `ctx.layer_gates_BxM` for the layer's linears and sows them under LAYER_ROUTING_KEY.
      validate(ac): method checks on the config alone; validate_for(ac, model_config): checks against a model.
      uniform_layer_params(ac, num_layers) -> bool: every layer has the same adapter parameter tree
        (shapes included) so layers can be stacked and scanned without padding.
    """

    name: str
    paper: str
    allowed_targets: tuple[str, ...]
    default_targets: tuple[str, ...]
    wraps: str
    adapt_linear: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    presets: tuple[str, ...] = ()
    legacy_defaults: Mapping[str, Any] = field(default_factory=dict)
    objective_defaults: Mapping[str, Any] = field(default_factory=dict)
    routed: bool = False
    router_stats: str = "none"
    balance_terms: tuple[str, ...] = ()
    sparse_router: bool = False
    uses_rank: bool = True
    uses_allocation: bool = False
    expert_bank: bool = False
    batch_needs: tuple[str, ...] = ()
    export_formats: tuple[str, ...] = ("native",)
    mergeable: bool = False
    linear_kwargs: Callable[..., dict[str, Any]] | None = None
    ffn: Callable[..., Any] | None = None
    ffn_activation: Callable[..., Any] | None = None
    layer_router: Callable[..., Any] | None = None
    validate: Callable[[Any], None] | None = None
    validate_for: Callable[[Any, Any], None] | None = None
    uniform_layer_params: Callable[[Any, int], bool] | None = None

    def __post_init__(self) -> None:
        def bad(what: str) -> AssertionError:  # a malformed spec is a bug in its method file
            return AssertionError(f"method spec {self.name!r}: {what}")

        if not self.name or not self.name.isidentifier():
            raise bad("the name must be a non-empty identifier")
        if not self.default_targets or not set(self.default_targets) <= set(self.allowed_targets):
            raise bad("default_targets must be a non-empty subset of allowed_targets")
        if self.router_stats not in ROUTER_STATS:
            raise bad(f"router_stats must be one of {ROUTER_STATS}")
        if self.routed != (self.router_stats != "none"):
            raise bad("a routed method sows router statistics, an unrouted one none")
        if set(self.balance_terms) - set(BALANCE_TERMS):
            raise bad(f"unknown balance terms {sorted(set(self.balance_terms) - set(BALANCE_TERMS))}")
        if self.balance_terms and not self.routed:
            raise bad("balance terms need a router")
        if "native" not in self.export_formats or set(self.export_formats) - set(EXPORT_FORMATS):
            raise bad(f"export_formats must include native and be some of {EXPORT_FORMATS}")
        if self.mergeable and self.routed:
            raise bad("a routed method's delta depends on the token: it cannot be merged")
        object.__setattr__(self, "defaults", dict(self.defaults))
        object.__setattr__(self, "objective_defaults", dict(self.objective_defaults))
        object.__setattr__(self, "legacy_defaults", dict(self.legacy_defaults))

    def __hash__(self) -> int:  # the mappings are not hashable; a spec is identified by its name
        return hash(self.name)

    def routing_top_k(self, ac: Any) -> int:
        """Experts per token the routing metrics count: top_k for a sparse router, the argmax (1) for a dense one."""
        return int(ac.top_k) if self.sparse_router else 1

    def layers_uniform(self, ac: Any, num_layers: int) -> bool:
        """`uniform_layer_params`, True when the method does not say (its layers never differ)."""
        return True if self.uniform_layer_params is None else bool(self.uniform_layer_params(ac, num_layers))

    def paper_presets(self) -> tuple[Any, ...]:
        """The `Preset`s this spec names (adapters/presets.py holds their values and sources)."""
        from moe_lora_jax.adapters.presets import get_preset

        return tuple(get_preset(p) for p in self.presets)

    def replace(self, **changes: Any) -> "MethodSpec":
        return dataclasses.replace(self, **changes)


_SPECS: dict[str, MethodSpec] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # before the imports: each method file calls register() while loading
    for module in BUILTIN_MODULES:
        importlib.import_module(f"moe_lora_jax.adapters.{module}")


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add `spec` to the registry (refused if its name is taken, unless `replace`). Returns it."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register() takes a MethodSpec, not {type(spec).__name__}")
    if spec.name in _SPECS and not replace and _SPECS[spec.name] is not spec:
        raise MoeLoraError(f"adapter method {spec.name!r} is already registered: choose another name")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with it)."""
    _SPECS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method, built-ins first, in registration order."""
    _load_builtins()
    return tuple(_SPECS)


def get_method(name: Any) -> MethodSpec:
    """The spec of method `name`; an unknown name is a one-line error listing the registered ones."""
    _load_builtins()
    if not isinstance(name, str) or name not in _SPECS:
        raise MoeLoraError(f"unknown adapter method {name!r}: use one of {', '.join(_SPECS)}")
    return _SPECS[name]


class _Registry(Mapping):
    """Read-only name -> MethodSpec view of the registry (loads the built-ins on first use)."""

    def __getitem__(self, name: str) -> MethodSpec:
        _load_builtins()
        return _SPECS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        return len(method_names())

    def __repr__(self) -> str:
        return f"REGISTRY({', '.join(method_names())})"


REGISTRY: Mapping[str, MethodSpec] = _Registry()


# ------------------------------------------------------------------ facts derived from every spec
def coef_methods() -> dict[str, tuple[str, ...]]:
    """objective weight -> the methods it applies to (objective.COEF_METHODS), from each spec's balance_terms."""
    return {term: tuple(n for n in method_names() if term in _SPECS[n].balance_terms) for term in BALANCE_TERMS}


def objective_defaults(name: str) -> dict[str, Any]:
    """The objective values method `name` defaults to (unknown names: none)."""
    _load_builtins()
    spec = _SPECS.get(name)
    return {} if spec is None else dict(spec.objective_defaults)


def registry_table() -> list[dict[str, str]]:
    """One row per method (docs and `moe-lora info`): wraps, router statistics, balance terms, batch needs, exports."""
    rows = []
    for name in method_names():
        s = _SPECS[name]
        rows.append({
            "method": name, "wraps": s.wraps, "router_stats": s.router_stats,
            "balance_terms": ", ".join(t.removesuffix("_coef") for t in s.balance_terms) or "-",
            "batch_needs": ", ".join(s.batch_needs) or "-",
            "exports": ", ".join(s.export_formats) + (", merge" if s.mergeable else ""),
        })
    return rows
