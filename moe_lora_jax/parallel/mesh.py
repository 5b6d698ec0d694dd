"""The device mesh: axes (data, fsdp, tensor) from a MeshConfig.

- data:   pure data parallelism (weights replicated across it)
- fsdp:   data parallelism that also shards the `embed` dimension of the base weights
- tensor: shards heads / kv / mlp / vocab dimensions (Megatron-style)

The batch is split over data x fsdp. Sizes multiply to the device count; one
axis may be -1 and takes whatever is left.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from moe_lora_jax.errors import MoeLoraError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill the one -1 entry (if any) and check the product equals `num_devices`."""
    sizes = [int(s) for s in sizes]
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sum(s == -1 for s in sizes) > 1:
        raise MoeLoraError(f"mesh ({named}) has more than one -1: at most one axis can be filled automatically")
    if any(s == 0 or s < -1 for s in sizes):
        raise MoeLoraError(f"mesh ({named}) has a size that is neither positive nor -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MoeLoraError(
                f"mesh ({named}): the fixed axes multiply to {known}, which does not divide the {num_devices} devices: "
                "choose sizes whose product divides the device count"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MoeLoraError(
            f"mesh ({named}) has {math.prod(sizes)} devices but {num_devices} are available: "
            f"make data x fsdp x tensor = {num_devices}, or set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Any = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices of all processes).

    `mesh_config` is a MeshConfig, a dict with those keys, a 3-tuple, or None (all data).
    On TPU the device order follows the physical topology (mesh_utils); elsewhere it is
    the order of `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if mesh_config is None:
        sizes: Sequence[int] = (-1, 1, 1)
    elif isinstance(mesh_config, (tuple, list)):
        sizes = mesh_config
    elif isinstance(mesh_config, dict):
        sizes = tuple(mesh_config.get(a, 1) for a in MESH_AXES)
    else:
        sizes = tuple(getattr(mesh_config, a) for a in MESH_AXES)
    if len(sizes) != 3:
        raise MoeLoraError(f"a mesh needs three sizes (data, fsdp, tensor), got {tuple(sizes)}")
    shape = resolve_mesh_shape(sizes, len(devices))
    device_array = None
    if devices[0].platform == "tpu":
        try:
            from jax.experimental import mesh_utils

            device_array = mesh_utils.create_device_mesh(shape, devices)
        except Exception:  # topology helpers refuse some shapes; the plain order still works
            device_array = None
    if device_array is None:
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (data x fsdp)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])
