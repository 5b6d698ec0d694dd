"""Run planning: one train config per arm x seed, trainable parameters per arm, the equal-budget check.

    runs = plan_runs(study, out_dir)            # [RunSpec(arm, seed, run_dir, config), ...] arm-major
    counts = {arm.name: trainable_params(config) for ...}
    warning = budget_warning(counts, tolerance=0.05)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.sweep.study import Arm, Study
from moe_lora_jax.train.config import TrainConfig, apply_overrides, config_from_dict

BUDGET_TOLERANCE = 0.05  # arms whose trainable parameters differ by more than this fraction are flagged


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    run_dir: Path
    config: TrainConfig


def _override(key: str, value: Any) -> str:
    """A study value as a `--set` string: adapter values are YAML (JSON is YAML), others are typed later."""
    if key.startswith("adapter.") or not isinstance(value, str):
        return f"{key}={json.dumps(value)}"
    return f"{key}={value}"


def arm_config(study: Study, arm: Arm, seed: int, run_dir: Path) -> TrainConfig:
    """The train config of one run: base, the arm's overrides, the study's --set, then the run's seed and directory.

    The seed sets both `seed` (initialisation, dropout) and `data.seed` (shuffle order)."""
    overrides = [_override(k, v) for k, v in arm.set.items()] + list(study.train_sets)
    overrides += [f"seed={seed}", f"data.seed={seed}", f"output_dir={run_dir}"]
    try:
        return config_from_dict(apply_overrides(dict(study.base), overrides))
    except MoeLoraError as e:
        raise MoeLoraError(f"arm {arm.name!r}: {e}") from None


def plan_runs(study: Study, out_dir: str | Path) -> list[RunSpec]:
    """Every arm x seed, arm-major, each under OUT/<arm>/seed<k>/; a config error names its arm (one line)."""
    out = Path(out_dir)
    return [RunSpec(arm.name, seed, out / arm.name / f"seed{seed}", arm_config(study, arm, seed, out / arm.name / f"seed{seed}"))
            for arm in study.arms for seed in study.seeds]


def count_params(tree: Any) -> int:
    import jax

    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree)))


def trainable_params(config: TrainConfig) -> int:
    """Trainable parameters of the run's adapter, from shapes alone (no weights loaded, nothing computed).

    An AlphaLoRA allocation needs the weights' spectra; its count is that of a uniform allocation
    with the same total, which is exact: every layer's linears have the same shapes, so the
    parameters depend on the total number of experts per module, not on where they sit.
    """
    import dataclasses

    from moe_lora_jax.adapters.io import adapter_shapes
    from moe_lora_jax.convert import load_llama_config
    from moe_lora_jax.embedded import resolve_model_path
    from moe_lora_jax.train.loop import adapter_config_from, check_config

    raw = dict(config.adapter)
    spec = raw.get("allocation")
    if isinstance(spec, Mapping) and str(spec.get("method")) == "alphalora":
        raw["allocation"] = {k: v for k, v in spec.items() if k in ("total", "min_experts", "max_experts")} | {"method": "uniform"}
        config = dataclasses.replace(config, adapter=raw)
    check_config(config)  # the whole config, with one-line errors, before anything else
    model_config = load_llama_config(resolve_model_path(config.model.path))
    ac = adapter_config_from(raw, None, model_config)
    return count_params(adapter_shapes(model_config, ac))


def budget_warning(counts: Mapping[str, int], tolerance: float = BUDGET_TOLERANCE) -> str | None:
    """A warning when the arms' trainable parameters differ by more than `tolerance` (relative to the smallest)."""
    if len(counts) < 2:
        return None
    lo_name = min(counts, key=counts.get)
    hi_name = max(counts, key=counts.get)
    lo, hi = counts[lo_name], counts[hi_name]
    if lo <= 0 or (hi - lo) / lo <= tolerance:
        return None
    return (f"warning: arms differ in trainable parameters by {100 * (hi - lo) / lo:.1f}% (> {100 * tolerance:.0f}%): "
            f"{hi_name} has {hi:,}, {lo_name} has {lo:,}; equalise ranks or expert counts, or declare "
            "compares_budgets: true in the study")
