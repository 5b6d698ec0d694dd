"""The JSON documents of the data-driven analyses, from the per-task totals of a pass over the data.

`RoutingTotals` holds what `collect.collect_routing` summed over batches; each `*_result` is a pure
function of it (and the AdapterConfig) returning a JSON-ready dict (NaN written as null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from moe_lora_jax.analysis.stats import group_mass, loads, parse_router_key, router_top_k, task_separation
from moe_lora_jax.errors import MoeLoraError

WORLD_KNOWLEDGE, OTHER = "world_knowledge", "other"


@dataclass
class RoutingTotals:
    """Per-task sums over a data pass. routers: "layer/module" -> (sums [T, E], tokens [T]);
    milora: (counts [T, N, M], prompts [T]) or None; examples [T]: examples read per task."""

    task_names: tuple[str, ...]
    examples: np.ndarray
    routers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    milora: tuple[np.ndarray, np.ndarray] | None = None
    tokens: str = "all"


def clean(x: Any) -> Any:
    """numpy arrays and scalars as lists and floats, NaN / inf as None (JSON has neither)."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _header(name: str, totals: RoutingTotals, ac: Any) -> dict[str, Any]:
    return {
        "analysis": name,
        "method": ac.method,
        "tokens": totals.tokens,
        "tasks": list(totals.task_names),
        "examples_per_task": dict(zip(totals.task_names, totals.examples.tolist())),
    }


def _ordered_routers(totals: RoutingTotals) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    rows = [(*parse_router_key(k), np.asarray(s), np.asarray(t)) for k, (s, t) in totals.routers.items()]
    return sorted(rows, key=lambda r: (r[0], r[1]))


# ------------------------------------------------------------------ (a) per-task expert load
def expert_load_result(totals: RoutingTotals, ac: Any) -> dict[str, Any]:
    """Per router: load[t][e] = the share of task t's routing that goes to expert e (top-k routers: the
    fraction of its tokens' k selections; dense routers: the mean gate probability), and the routers'
    task separation (`stats.task_separation`). Per layer: the mean separation over its routers, and the
    mean load over them where they all have the same expert count."""
    if not totals.routers:
        raise MoeLoraError("the model sowed no token router statistics: is the adapter a routed one?")
    routers, by_layer = [], {}
    for layer, module, sums, tokens in _ordered_routers(totals):
        E = sums.shape[-1]
        load = loads(sums, tokens)
        k = router_top_k(ac, layer, module, E)
        row = {"layer": layer, "module": module, "num_experts": E, "top_k": k,
               "tokens_per_task": tokens.tolist(), "load": load, "task_separation": task_separation(load)}
        routers.append(row)
        by_layer.setdefault(layer, []).append(row)
    layers = []
    for layer, rows in sorted(by_layer.items()):
        same = len({r["num_experts"] for r in rows}) == 1
        mean_load = np.mean(np.stack([r["load"] for r in rows]), axis=0) if same else None
        layers.append({"layer": layer, "modules": [r["module"] for r in rows], "load": mean_load,
                       "task_separation": mean_defined([r["task_separation"] for r in rows])})
    dense = ac.method not in ("mola", "mixlora")  # the sparse routers (stats.router_top_k)
    out = _header("expert_load", totals, ac)
    out.update({
        "weighting": "mean gate probability (dense router)" if dense else "fraction of the top-k selections",
        "task_separation": mean_defined([r["task_separation"] for r in routers]),
        "layers": layers,
        "routers": routers,
    })
    return clean(out)


# ------------------------------------------------------------------ (b) MiLoRA's module selection
def milora_modules_result(totals: RoutingTotals, ac: Any) -> dict[str, Any]:
    """selection_rate[task][layer][m] = the share of the task's prompts whose routing selects LoRA module m
    in that layer (sums to top_k over m); all_tasks: the same over every prompt; per layer the task
    separation of the selection distributions (rates / top_k)."""
    if totals.milora is None:
        raise MoeLoraError("the model sowed no milora_routing: the adapter is not MiLoRA")
    counts, prompts = (np.asarray(x, np.float64) for x in totals.milora)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates_TxNxM = np.where(prompts[:, None, None] > 0, counts / prompts[:, None, None], np.nan)
        overall_NxM = counts.sum(0) / max(prompts.sum(), 1.0)
    k = min(ac.top_k, counts.shape[-1])
    out = _header("milora_modules", totals, ac)
    out.update({
        "modules": list(ac.targets),
        "top_k": k,
        "prompts_per_task": dict(zip(totals.task_names, prompts.tolist())),
        "selection_rate": {t: rates_TxNxM[i] for i, t in enumerate(totals.task_names)},
        "all_tasks": overall_NxM,
        "task_separation": [task_separation(rates_TxNxM[:, n] / k) for n in range(counts.shape[1])],
    })
    return clean(out)


# ------------------------------------------------------------------ (c) LoRAMoE's groups
def task_types(task_names: Sequence[str], world_knowledge_tasks: Sequence[str] | None) -> list[int | None]:
    """1 for a world-knowledge task, 0 for another, None for every task when the list is unknown."""
    if world_knowledge_tasks is None:
        return [None] * len(task_names)
    unknown = sorted(set(world_knowledge_tasks) - set(task_names))
    if unknown:
        raise MoeLoraError(f"world-knowledge tasks {unknown} are not in the data: use some of {list(task_names)}")
    return [1 if t in set(world_knowledge_tasks) else 0 for t in task_names]


def _by_type(sums: np.ndarray, tokens: np.ndarray, types: list[int | None]) -> dict[str, float | None]:
    """Token-weighted world-knowledge-group mass over the tasks of each type."""
    out = {}
    for name, want in ((WORLD_KNOWLEDGE, 1), (OTHER, 0)):
        rows = [i for i, t in enumerate(types) if t == want]
        n = float(tokens[rows].sum()) if rows else 0.0
        out[name] = float(group_mass(sums[rows].sum(0) / n)[0]) if n > 0 else None
    return out


def loramoe_groups_result(totals: RoutingTotals, ac: Any, world_knowledge_tasks: Sequence[str] | None) -> dict[str, Any]:
    """The gate mass on LoRAMoE's world-knowledge group (the first E/2 experts of every router; the rest
    is the other group's), per task and per task type, per router and per layer (mean over its routers)."""
    types = task_types(totals.task_names, world_knowledge_tasks)
    routers, by_layer = [], {}
    for layer, module, sums, tokens in _ordered_routers(totals):
        wk, _ = group_mass(loads(sums, tokens))
        row = {"layer": layer, "module": module, "num_experts": sums.shape[-1],
               "world_knowledge_mass": dict(zip(totals.task_names, wk.tolist())),
               "by_type": _by_type(sums, tokens, types)}
        routers.append(row)
        by_layer.setdefault(layer, []).append(row)
    layers = []
    for layer, rows in sorted(by_layer.items()):
        layers.append({
            "layer": layer,
            "world_knowledge_mass": {t: mean_defined([r["world_knowledge_mass"][t] for r in rows]) for t in totals.task_names},
            "by_type": {g: mean_defined([r["by_type"][g] for r in rows]) for g in (WORLD_KNOWLEDGE, OTHER)},
        })
    out = _header("loramoe_groups", totals, ac)
    out.update({
        "world_knowledge_tasks": None if world_knowledge_tasks is None else list(world_knowledge_tasks),
        "task_types": dict(zip(totals.task_names, types)),
        "world_knowledge_group": "experts 0 .. E/2-1 of every router (task type 1 is steered there by the localized constraint)",
        "by_type": {g: mean_defined([r["by_type"][g] for r in layers]) for g in (WORLD_KNOWLEDGE, OTHER)},
        "layers": layers,
        "routers": routers,
    })
    return clean(out)
