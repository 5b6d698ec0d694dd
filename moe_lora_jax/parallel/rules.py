"""One table from logical axis names to mesh axes, and the shardings it implies.

Parameters carry logical names (`nn.with_logical_partitioning`); this module is
the only place that says which mesh axis each name is split over:

    embed -> fsdp     mlp, heads, kv, vocab -> tensor     expert, rank, layers -> replicated
    batch -> (data, fsdp)

    abstract = jax.eval_shape(lambda: model.init(key, ids))      # boxed, no memory used
    param_sh = shardings_for(abstract["params"], mesh)           # NamedSharding per leaf
    adapter_sh = replicated_shardings(abstract["adapter"], mesh)  # small: replicate
    batch = shard_batch(local_numpy_batch, mesh)                  # global arrays over (data, fsdp)

A dimension whose size does not divide by its mesh axes is left unsharded (and
logged), so odd shapes such as SmolLM2's 3 KV heads on tensor=2 still run.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_lora_jax.parallel.mesh import BATCH_AXES

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("expert", None),
    ("rank", None),
    ("layers", None),
    ("length", None),
)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def mesh_spec(logical: PartitionSpec | Sequence[str | None], rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Mesh PartitionSpec for a tuple of logical names (names without a rule are replicated)."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, where: str = "") -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide, and repeated uses of one mesh axis."""
    used: set[str] = set()
    out = []
    for dim, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        axes = tuple(a for a in axes if a not in used)
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if axes and shape[dim] % size:
            log.info("%s: dimension %d of size %d is not divisible by %s=%d; replicating it", where, dim, shape[dim], axes, size)
            axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)


def shardings_for(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of logically boxed leaves (e.g. `jax.eval_shape(model.init, ...)`).

    The result has the structure of the unboxed tree. Leaves that are not boxed are replicated.
    """
    logical = nn.get_partition_spec(tree)
    unboxed = nn.unbox(tree)

    def one(path, leaf_spec, value):
        shape = getattr(value, "shape", ())
        spec = fit_spec(mesh_spec(leaf_spec, rules), shape, mesh, jax.tree_util.keystr(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, logical, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
    """A replicated NamedSharding for every leaf (boxes are unboxed first)."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), nn.unbox(tree))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (`BatchIterator` output) split over data x fsdp."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local_batch.items()
    }


def put_global(tree: Any, shardings: Any) -> Any:
    """Place a tree that every process holds in full (same values) onto global `shardings`.

    One process: `jax.device_put`. Several: each process fills only its addressable shards
    (`jax.make_array_from_callback`), since a plain device_put cannot reach other hosts' devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]), tree, shardings
    )


def abstract_variables(model: nn.Module, sample_shape: tuple[int, int] = (1, 8), **init_kwargs: Any) -> Any:
    """Boxed ShapeDtypeStructs of every collection `model.init` creates; nothing is allocated."""
    ids = jnp.zeros(sample_shape, jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, **init_kwargs))


def param_shardings(model: nn.Module, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> dict[str, Any]:
    """Shardings for each collection of `model`: `params` by the rules, everything else replicated."""
    abstract = abstract_variables(model)
    return {
        name: shardings_for(tree, mesh, rules) if name == "params" else replicated_shardings(tree, mesh)
        for name, tree in abstract.items()
    }
