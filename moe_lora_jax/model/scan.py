"""Scanned decoder layers: one `jax.lax.scan` over the layer body instead of a Python loop.

The scan reads the base and the adapter stacked over a leading `layers` axis
(`moe_lora_jax.stacking`): the train loop and the inference loader store the base that way and
the train step stacks the adapter once per step. Per-layer trees (`layers_{i}/...`) given to the
forward are stacked here instead (the adapter padded to the largest per-layer shape), and
gradients flow back through the pad and the stack to each layer's exact shapes.

Layers whose expert counts differ (MoLA / AlphaLoRA allocations) run as E_max experts:
the padded experts' A, B and router columns are zeros, their router logits are masked to
-inf (so their probability and gate are exactly 0), and each layer's own top-k is a
scanned value that masks the ranks past it. Router statistics are cropped back to each
layer's own expert count before they are stored under `intermediates/layers_{i}`, so the
losses see exactly what the unrolled model gives them.

Configurations the scan does not cover fall back to the unrolled loop (`scan_plan` returns
None): MoV with per-layer expert counts, and MiLoRA with a different router activation in
the deep layers (their parameter trees differ between layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_lora_jax.adapters.config import AdapterConfig
from moe_lora_jax.adapters.registry import get_method
from moe_lora_jax.model.remat import remat_policy
from moe_lora_jax.stacking import LAYERS, stack_layers

def _scan_kind(ac: AdapterConfig) -> str:
    """How a method's layers scan, from its registry facts: "uniform_check" (a per-layer router such as
    MiLoRA's, or per-layer parameter trees that scan only when every layer's tree is the same: the
    method's `uniform_layer_params`), "shared" (the same tree in every layer), "expert_bank"
    (per-layer expert counts padded to the largest)."""
    spec = get_method(ac.method)
    if spec.layer_router is not None:
        return "uniform_check"
    if not spec.uses_allocation or ac.allocation is None:
        return "shared"
    return "expert_bank" if spec.expert_bank else "uniform_check"


class _PaddedAllocation:
    """Every layer gets the largest count of its module and the largest top-k (the scan body's static shapes)."""

    def __init__(self, counts: dict[str, tuple[int, ...]], top_k: dict[str, tuple[int, ...]]):
        self._counts = {m: tuple(c) for m, c in counts.items()}
        self._top_k = {m: tuple(k) for m, k in top_k.items()}

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self._counts)

    @property
    def num_layers(self) -> int:
        return len(next(iter(self._counts.values())))

    def counts(self, module: str) -> tuple[int, ...]:
        return self._counts[module]

    def top_k(self, module: str) -> tuple[int, ...] | None:
        return self._top_k.get(module)

    def _key(self):
        return (tuple(sorted(self._counts.items())), tuple(sorted(self._top_k.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PaddedAllocation) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@dataclasses.dataclass(frozen=True)
class ScanPlan:
    """What the scan body needs: its adapter config (padded where counts differ) and, per padded
    target, every layer's real expert count and top-k (scanned as int32 values)."""

    body_adapter_config: AdapterConfig | None
    valid: tuple[tuple[str, tuple[int, ...]], ...] = ()
    top_k: tuple[tuple[str, tuple[int, ...]], ...] = ()


def scan_plan(num_layers: int, ac: AdapterConfig | None) -> ScanPlan | None:
    """How the layers scan under `ac`, or None when they must stay unrolled (see the module doc)."""
    if ac is None:
        return ScanPlan(None)
    kind = _scan_kind(ac)
    if kind == "shared":
        return ScanPlan(ac)
    if kind == "uniform_check":
        return ScanPlan(ac) if get_method(ac.method).layers_uniform(ac, num_layers) else None
    targets = list(ac.targets)  # AdapterConfig admits only the table's linears (moe_lora_jax.layout) and MoV's "ffn"
    counts = {t: ac.expert_counts(t, num_layers) for t in targets}
    top_k = {t: tuple(ac.layer_top_k(t, i, counts[t][i]) for i in range(num_layers)) for t in targets}
    padded = _PaddedAllocation(
        {t: (max(c),) * num_layers for t, c in counts.items()},
        {t: (max(k),) * num_layers for t, k in top_k.items()},
    )
    return ScanPlan(ac.replace(allocation=padded), tuple(counts.items()), tuple(top_k.items()))


def scans(config: Any, ac: AdapterConfig | None) -> bool:
    """Whether a model of `config` (a LlamaConfig) with adapter `ac` runs its layers as one scan."""
    return bool(config.scan_layers) and scan_plan(config.num_hidden_layers, ac) is not None



def _crop_stats(tree: Any, counts: dict[str, int]) -> Any:
    """Crop one layer's router statistics from E_max back to its own expert count per target."""

    def crop(path, leaf):
        names = [str(getattr(p, "key", "")) for p in path]
        target = next((n[: -len("_proj")] for n in names if n.endswith("_proj")), None)
        if target not in counts:
            return leaf
        E = counts[target]
        if "expert_gram" in names:
            return leaf[..., :E, :E]
        if "router_logits" in names or "router_gates" in names:
            return leaf[..., :E]
        return leaf

    return jax.tree_util.tree_map_with_path(crop, tree)


def run_scanned_layers(mdl: nn.Module, plan: ScanPlan, layer_cls: Any, x_BxLxD: jax.Array, cos_sin: Any,
                       mask_Bx1xLxS: jax.Array, cache: Any, start: jax.Array, ctx: Any, deterministic: bool):
    """Run the decoder layers of `mdl` (a LlamaForCausalLM in apply mode) as one scan.

    Returns (x_BxLxD, new_k tuple, new_v tuple, milora gates per layer or None), like the unrolled loop,
    and stores the layers' router statistics under `intermediates/layers_{i}` when that collection
    is mutable. Dropout keys are split per layer from the module's `dropout` stream, so dropout
    draws differ from the unrolled loop's (the deterministic forward is the same).
    """
    cfg = mdl.config
    N = cfg.num_hidden_layers
    variables = nn.meta.unbox(mdl.variables)
    params = variables["params"]
    base_N = stack_layers(params)[LAYERS]  # stored stacked (build_run), or stacked here once per forward
    reused = ctx is not None and ctx.routing_BxNxM is not None  # MiLoRA decode steps: the routers are not run
    drop = lambda layer: {k: v for k, v in layer.items() if not (reused and k == "milora_router")}  # noqa: E731
    adapter = {k: drop(v) if k == LAYERS or k.startswith("layers_") else v for k, v in variables.get("adapter", {}).items()}
    adapter = stack_layers(adapter)  # per-layer expert counts: zero-padded to the largest
    adapter_N = adapter.get(LAYERS)
    valid = dict(plan.valid)
    xs: dict[str, Any] = {"base": base_N}
    if adapter_N is not None:
        xs["adapter"] = adapter_N
    if valid:
        xs["valid"] = {t: jnp.asarray(c, jnp.int32) for t, c in valid.items()}
        xs["top_k"] = {t: jnp.asarray(k, jnp.int32) for t, k in plan.top_k}
    if cache is not None:
        xs["k"], xs["v"] = jnp.stack(cache.k), jnp.stack(cache.v)
    if ctx is not None and ctx.routing_BxNxM is not None:
        xs["routing"] = jnp.moveaxis(ctx.routing_BxNxM, 1, 0)[:, :, None, :]  # [N, B, 1, M]: the body is layer 0
    if not deterministic:
        xs["rng"] = jax.random.split(mdl.make_rng("dropout"), N)
    keep_stats = mdl.is_mutable_collection("intermediates")
    body_layer = layer_cls(cfg, 0, plan.body_adapter_config)

    def body(x, s):
        variables = {"params": s["base"]}
        if "adapter" in s:
            variables["adapter"] = s["adapter"]
        layer_ctx = ctx
        if layer_ctx is not None:
            if "routing" in s:
                layer_ctx = layer_ctx.replace(routing_BxNxM=s["routing"])
            if "valid" in s:
                layer_ctx = layer_ctx.replace(expert_valid=s["valid"], expert_top_k=s["top_k"])
        kv = (s["k"], s["v"], start) if "k" in s else None
        rngs = {"dropout": s["rng"]} if "rng" in s else None
        out = body_layer.apply(variables, x, cos_sin, mask_Bx1xLxS, kv, layer_ctx, rngs=rngs,
                               mutable=["intermediates"] if keep_stats else False)
        (x, layer_kv, gates), stats = out if keep_stats else (out, {})
        return x, (layer_kv, gates, stats.get("intermediates", {}))

    if cfg.remat:
        body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(cfg.remat))
    x_BxLxD, (kv_N, gates_N, stats_N) = jax.lax.scan(body, x_BxLxD, xs)
    new_k = new_v = ()
    if kv_N is not None:
        new_k = tuple(kv_N[0][i] for i in range(N))
        new_v = tuple(kv_N[1][i] for i in range(N))
    if keep_stats and stats_N:
        for i in range(N):
            layer_stats = jax.tree_util.tree_map(lambda a: a[i], stats_N)
            if valid:
                layer_stats = _crop_stats(layer_stats, {t: c[i] for t, c in valid.items()})
            mdl.put_variable("intermediates", f"layers_{i}", layer_stats)
    gates = None if gates_N is None else [gates_N[i] for i in range(N)]
    return x_BxLxD, new_k, new_v, gates
