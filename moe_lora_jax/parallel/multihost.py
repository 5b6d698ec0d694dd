"""Multi-process start-up from the environment.

Call `initialize_distributed()` first thing in a process, before anything touches
a JAX device. What it does is decided from environment variables, in this order:

1. `MOE_LORA_COORDINATOR=host:port` (with `MOE_LORA_NUM_PROCESSES` and
   `MOE_LORA_PROCESS_ID`, which fall back to SLURM_NTASKS / SLURM_PROCID):
   explicit `jax.distributed.initialize(coordinator, n, id)`. Optional
   `MOE_LORA_LOCAL_DEVICE_IDS=0,1` limits the devices this process uses.
2. A SLURM step with more than one task (SLURM_NTASKS > 1): JAX's own SLURM
   detection (coordinator = first node of the step).
3. A TPU pod slice (`MOE_LORA_TPU_POD=1`, set by tpu_scripts, or
   TPU_WORKER_HOSTNAMES listing several workers): `jax.distributed.initialize()`
   with no arguments; JAX reads the topology from the TPU metadata.
4. Otherwise a single process: nothing happens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

from moe_lora_jax.errors import MoeLoraError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MOE_LORA_COORDINATOR"
ENV_NUM_PROCESSES = "MOE_LORA_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_LORA_PROCESS_ID"
ENV_LOCAL_DEVICES = "MOE_LORA_LOCAL_DEVICE_IDS"
ENV_TPU_POD = "MOE_LORA_TPU_POD"

_initialized = False


@dataclass(frozen=True)
class DistributedPlan:
    """How this process joins the job; `kind` is explicit, slurm, tpu or single."""

    kind: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise MoeLoraError(f"environment variable {name}={value!r} is not an integer: set it to a number") from None
    return None


def distributed_plan(env: Mapping[str, str] | None = None) -> DistributedPlan:
    """Decide, from environment variables only, how this process should start (pure)."""
    env = os.environ if env is None else env
    coordinator = env.get(ENV_COORDINATOR)
    if coordinator:
        if ":" not in coordinator:
            raise MoeLoraError(f"{ENV_COORDINATOR}={coordinator!r} lacks a port: use host:port, e.g. 10.0.0.2:8476")
        n = _int_env(env, ENV_NUM_PROCESSES, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
        pid = _int_env(env, ENV_PROCESS_ID, "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
        if n is None or pid is None:
            raise MoeLoraError(
                f"{ENV_COORDINATOR} is set but the process count or id is not: "
                f"set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or run under srun)"
            )
        if n < 1 or not 0 <= pid < n:
            raise MoeLoraError(f"process id {pid} is outside 0..{n - 1}: check {ENV_PROCESS_ID} and {ENV_NUM_PROCESSES}")
        local = env.get(ENV_LOCAL_DEVICES)
        local_ids = tuple(int(x) for x in local.split(",") if x.strip()) if local else None
        return DistributedPlan("explicit", coordinator, n, pid, local_ids)
    if (_int_env(env, "SLURM_NTASKS") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return DistributedPlan("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if env.get(ENV_TPU_POD, "") in ("1", "true", "yes") or len(hosts) > 1:
        return DistributedPlan("tpu")
    return DistributedPlan("single")


def initialize_distributed(env: Mapping[str, str] | None = None) -> DistributedPlan:
    """Join the multi-process job described by the environment (idempotent; no-op for one process)."""
    global _initialized
    plan = distributed_plan(env)
    if _initialized or plan.kind == "single":
        return plan
    import jax

    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is not None and is_initialized():  # someone else in this process already joined
        _initialized = True
        return plan
    try:
        if plan.kind == "explicit":
            jax.distributed.initialize(
                coordinator_address=plan.coordinator,
                num_processes=plan.num_processes,
                process_id=plan.process_id,
                local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
            )
        else:
            jax.distributed.initialize()
    except RuntimeError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "only be called once" in message:
            _initialized = True
            return plan
        if "must be called before" in message:
            raise MoeLoraError(
                "initialize_distributed() ran after JAX had already started its backend: call it first, "
                "before anything creates arrays or lists devices"
            ) from None
        raise MoeLoraError(
            f"jax.distributed.initialize failed for a {plan.kind} job ({message}): "
            "check the coordinator address and that every process started"
        ) from None
    _initialized = True
    log.info("joined %s job: process %d of %d", plan.kind, jax.process_index(), jax.process_count())
    return plan


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, metrics and configs)."""
    import jax

    return jax.process_index() == 0
