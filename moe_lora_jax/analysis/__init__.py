"""Routing analyses of a trained adapter: per-task expert load (MoV), MiLoRA's module selection,
LoRAMoE's group utilisation by task type, MoLA's expert redundancy. Each writes NAME.json + NAME.png.

    methods.py     which analysis applies to which method (`applicable_analyses`)
    stats.py       pure functions: router statistics -> per-task sums -> loads; expert dW distances
    collect.py     one jitted pass of the model over batches, summing the statistics per task
    results.py     the JSON documents of the data-driven analyses
    redundancy.py  the expert-redundancy document (adapter weights only)
    plots.py       a PNG per document
    runner.py      `run_routing_analyses(adapter_dir, out_dir, ...)`, the one entry point
"""

from moe_lora_jax.analysis.methods import ANALYSES, applicable_analyses, check_analyses
from moe_lora_jax.analysis.runner import DEFAULT_MAX_EXAMPLES, run_routing_analyses

__all__ = ["ANALYSES", "DEFAULT_MAX_EXAMPLES", "applicable_analyses", "check_analyses", "run_routing_analyses"]
