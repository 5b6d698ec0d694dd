"""Studies: equal-budget comparisons of adapter methods, allocations and seeds (`moe-lora sweep`).

    from moe_lora_jax.sweep import load_study, run_study
    results = run_study(load_study("experiments/reproduce/quick.yaml"), "runs/quick")

    study.py      the study file: parsing, checks, content hash, overlays and --set
    plan.py       one train config per arm x seed; trainable parameters; the equal-budget check
    runner.py     training, evaluation, resume, failures, progress and ETA
    aggregate.py  mean / std (ddof 1) / values per arm -> results.json
    report.py     results.md and the plots
    decode.py     the optional decode-speed step (tokens/s at beam 1 and 3)
    analyses.py   run_analyses: the routing analyses after each run
"""

from moe_lora_jax.sweep.aggregate import aggregate, summarize
from moe_lora_jax.sweep.analyses import run_analyses
from moe_lora_jax.sweep.plan import budget_warning, plan_runs, trainable_params
from moe_lora_jax.sweep.runner import check_study_dir, default_out_dir, run_study
from moe_lora_jax.sweep.study import Arm, Study, load_study, parse_study

__all__ = ["Arm", "Study", "aggregate", "budget_warning", "check_study_dir", "default_out_dir", "load_study", "parse_study",
           "plan_runs", "run_analyses", "run_study", "summarize", "trainable_params"]
