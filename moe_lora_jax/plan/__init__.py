"""Will it fit? Ahead-of-time plans of the train step on TPU slices (`moe-lora plan`), from a CPU machine."""

from moe_lora_jax.plan.aot import HEADROOM, format_report, plan_train_step, suggest_remat
from moe_lora_jax.plan.flops import analytic_flops
from moe_lora_jax.plan.shapes import NAMED_SHAPES, plan_model_config
from moe_lora_jax.plan.topology import HBM_BYTES, INSTALL_HINT, Topology, libtpu_available, parse_topology, tpu_devices

__all__ = ["HBM_BYTES", "HEADROOM", "INSTALL_HINT", "NAMED_SHAPES", "Topology", "analytic_flops", "format_report",
           "libtpu_available", "parse_topology", "plan_model_config", "plan_train_step", "suggest_remat", "tpu_devices"]
