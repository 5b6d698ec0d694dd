"""TPU topologies by name, their chips' memory, and their devices on a machine without a TPU.

    topo = parse_topology("v5p-8")           # or "v5p:2x2x1", "v4-8", "v4:2x2x2", "v5e-16", "v6e:4x4"
    devices = tpu_devices(topo)              # 4 TpuDevices from libtpu's compiler, no TPU needed

Names: `GEN:AxBxC` gives the chip grid; `GEN-N` is the Cloud TPU name, where N counts TensorCores
for v4 and v5p (two per chip, run as one megacore device) and chips for v5e and v6e. Each host
holds 2x2 chips (v4, v5p) or up to 8 chips (v5e, v6e), so v4:2x2x2 is two hosts.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from moe_lora_jax.errors import MoeLoraError

GiB = 1024**3
# High-bandwidth memory per chip (one device per chip: v4 and v5p run their two cores as a megacore).
HBM_BYTES = {"v4": 32 * GiB, "v5p": 95 * GiB, "v5e": 16 * GiB, "v6e": 32 * GiB}
_KIND = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}  # TPU_ACCELERATOR_TYPE prefix
_3D = ("v4", "v5p")
# The usual slice shapes for a chip count (Cloud TPU's default topologies).
_GRID_3D = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
            128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
INSTALL_HINT = "pip install 'moe-lora-jax[tpu]'"


@dataclass(frozen=True)
class Topology:
    """One TPU slice: generation, chip grid, hosts, and what libtpu's topology call needs."""

    name: str
    generation: str  # v4, v5p, v5e, v6e
    grid: tuple[int, ...]
    chips_per_host_bounds: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def hosts(self) -> int:
        return max(1, self.chips // math.prod(self.chips_per_host_bounds))

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def chip_config_name(self) -> str:
        return "megacore" if self.generation == "v4" else "default"  # v4's default config exposes each core

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]

    def describe(self) -> str:
        return f"{self.topology_name} ({self.chips} chips, {self.hosts} host{'s' if self.hosts > 1 else ''}, {self.hbm_bytes / GiB:.0f} GiB HBM per chip)"


def parse_topology(name: str) -> Topology:
    """`v5p:2x2x1`, `v5p-8`, `v4-8`, `v4:2x2x2`, `v5e-16`, `v6e:2x4`, ... as a Topology (MoeLoraError otherwise)."""
    text = str(name).strip().lower().replace("v5litepod", "v5e").replace("v5lite", "v5e")
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?::|-)(.+)", text)
    if not m:
        raise MoeLoraError(f"--topology {name!r} is not a TPU topology: use e.g. v5p-8, v5p:2x2x1, v4-8, v4:2x2x2, v5e-16 or v6e:4x4")
    gen, rest = m.groups()
    dims = 3 if gen in _3D else 2
    if re.fullmatch(r"\d+(x\d+)+", rest):
        grid = tuple(int(x) for x in rest.split("x"))
        if len(grid) != dims or min(grid) < 1:
            raise MoeLoraError(f"--topology {name!r}: a {gen} slice is a {'AxBxC' if dims == 3 else 'AxB'} grid of chips, e.g. "
                               f"{gen}:{'2x2x1' if dims == 3 else '2x2'}")
    elif rest.isdigit():
        count = int(rest) // 2 if gen in _3D else int(rest)  # v4/v5p names count TensorCores, two per chip
        table = _GRID_3D if dims == 3 else _GRID_2D
        if count not in table:
            raise MoeLoraError(f"--topology {name!r}: no standard {gen} slice has that size; name its chip grid instead, e.g. "
                               f"{gen}:{'x'.join(map(str, table[8]))}")
        grid = table[count]
    else:
        raise MoeLoraError(f"--topology {name!r}: give a core count ({gen}-8) or a chip grid ({gen}:2x2{'x1' if dims == 3 else ''})")
    chips = math.prod(grid)
    if dims == 3:
        per_host = tuple(min(g, b) for g, b in zip(grid, (2, 2, 1)))
    else:  # v5e/v6e hosts hold up to 8 chips (2x4); bigger slices are 4 chips (2x2) per host
        per_host = grid if chips <= 8 else (2, 2)
        per_host = (*per_host, 1)
    return Topology(name=str(name), generation=gen, grid=grid, chips_per_host_bounds=tuple(per_host))  # type: ignore[arg-type]


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: Topology) -> list:
    """The slice's devices from libtpu's compiler (no TPU needed). MoeLoraError when libtpu is not installed."""
    if not libtpu_available():
        raise MoeLoraError(f"planning for a TPU needs libtpu (the TPU compiler), which is not installed: {INSTALL_HINT}")
    # Quiet libtpu's start-up probes on a machine without a TPU, and let several processes load it.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{_KIND[topology.generation]}-{topology.chips * (2 if topology.generation in _3D else 1)}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name, chip_config_name=topology.chip_config_name,
            chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1,
        )
    except Exception as e:  # libtpu's own message: a shape it refuses, a version it cannot run
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MoeLoraError(f"libtpu could not describe {topology.topology_name} ({first}): check the topology, or reinstall with {INSTALL_HINT}") from None
    return list(desc.devices)
