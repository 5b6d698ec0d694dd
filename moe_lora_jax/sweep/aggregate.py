"""Per-arm aggregation of per-run results: mean, standard deviation over seeds (ddof = 1) and every value.

    summarize([0.5, 0.7])   # {"mean": 0.6, "std": 0.1414..., "values": [0.5, 0.7]}
    results = aggregate(study, run_results, trainable)   # the results.json object
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

# the metrics every run reports (per-task exact match adds exact_match/<task>)
RUN_METRICS = ("eval/loss", "exact_match", "train/tokens_per_s", "wall_s")


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """{"mean", "std", "values"} over the finite values: std with ddof = 1, null for fewer than two; mean null for none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    arr = np.asarray(kept, np.float64)
    return {
        "mean": float(arr.mean()) if kept else None,
        "std": float(arr.std(ddof=1)) if len(kept) > 1 else None,
        "values": kept,
    }


def run_metrics(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The flat metrics of one run's result (exact_match/<task> included)."""
    out = {k: result.get("metrics", {}).get(k) for k in RUN_METRICS}
    for task, value in (result.get("metrics", {}).get("exact_match_per_task") or {}).items():
        out[f"exact_match/{task}"] = value
    return out


def aggregate(arm_names: Sequence[str], runs: Sequence[Mapping[str, Any]], trainable: Mapping[str, int | None],
              *, study_hash: str = "", budget_warning: str | None = None, decode: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The results.json object: one entry per arm (study order) with its metrics over the seeds that finished,
    and the failed runs with their errors. `runs`: per-run records ({"arm", "seed", "status", "metrics", ...})."""
    arms = []
    for name in arm_names:
        mine = sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"])
        ok = [r for r in mine if r.get("status") == "ok"]
        flat = [run_metrics(r) for r in ok]
        keys = list(RUN_METRICS) + sorted({k for f in flat for k in f if k.startswith("exact_match/")})
        metrics = {k: summarize([f.get(k) for f in flat]) for k in keys}
        measured = [r.get("trainable_params") for r in ok if r.get("trainable_params")]
        arms.append({
            "name": name,
            "trainable_params": measured[0] if measured else trainable.get(name),
            "seeds": [r["seed"] for r in ok],
            "metrics": metrics,
            "failed": [{"seed": r["seed"], "error": r.get("error")} for r in mine if r.get("status") != "ok"],
            "analyses": {str(r["seed"]): r.get("analyses", {}) for r in ok},
            **({"decode": decode[name]} if decode and name in decode else {}),
        })
    out: dict[str, Any] = {"study_hash": study_hash, "arms": arms}
    if budget_warning:
        out["budget_warning"] = budget_warning
    return out
