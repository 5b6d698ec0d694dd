"""Mesh, logical-axis rules and shardings, multi-host start-up."""

from moe_lora_jax.parallel.mesh import BATCH_AXES, MESH_AXES, data_parallel_size, make_mesh, resolve_mesh_shape
from moe_lora_jax.parallel.multihost import distributed_plan, initialize_distributed, is_main_process
from moe_lora_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    abstract_variables,
    batch_sharding,
    param_shardings,
    replicated_shardings,
    shard_batch,
    shardings_for,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "abstract_variables",
    "batch_sharding",
    "data_parallel_size",
    "distributed_plan",
    "initialize_distributed",
    "is_main_process",
    "make_mesh",
    "param_shardings",
    "replicated_shardings",
    "resolve_mesh_shape",
    "shard_batch",
    "shardings_for",
]
