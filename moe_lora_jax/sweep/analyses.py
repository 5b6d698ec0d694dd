"""The routing analyses run after each sweep run's evaluation (issue 13 item 2).

`run_analyses` is the one hook the runner calls: every analysis of `moe_lora_jax.analysis` that
applies to the run's method is written under `RUN/routing/` (JSON + PNG, as `moe-lora routing`
writes them), and the headline numbers go into the run's result and results.json under the
arm's `analyses`. A rerun of a finished run reads the files already there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_lora_jax.analysis.methods import applicable_analyses
from moe_lora_jax.analysis.runner import run_routing_analyses

ROUTING_DIR = "routing"
# The scalar of each analysis worth comparing across arms (None where the analysis has no single number).
# MiLoRA's module selection stores its task separation per layer: the headline is the mean over layers.
HEADLINES = {"expert_load": "task_separation", "expert_redundancy": "mean_cosine_distance",
             "milora_modules": "task_separation"}


def headline(doc: dict[str, Any], key: str) -> float | None:
    """`doc[key]`, or the mean of its defined values when the analysis stores one per layer."""
    value = doc.get(key)
    if isinstance(value, list):
        defined = [v for v in value if v is not None]
        return float(sum(defined) / len(defined)) if defined else None
    return value


def run_analyses(run_dir: Path, adapter_config: Any) -> dict[str, Any]:
    """Routing analyses of the finished run in `run_dir` (adapter/ and config.yaml there).

    Returns {name: {"json": path relative to run_dir, "png": ..., headline key: value}} for each analysis
    that applies to the run's method; {} when none does (plain LoRA)."""
    names = applicable_analyses(adapter_config)
    if not names:
        return {}
    out = run_dir / ROUTING_DIR
    if not out.is_dir():
        run_routing_analyses(run_dir / "adapter", out, names=names)
    result: dict[str, Any] = {}
    for name in names:
        doc = json.loads((out / f"{name}.json").read_text())
        entry: dict[str, Any] = {"json": f"{ROUTING_DIR}/{name}.json", "png": f"{ROUTING_DIR}/{name}.png"}
        if name in HEADLINES:
            entry[HEADLINES[name]] = headline(doc, HEADLINES[name])
        result[name] = entry
    return result
