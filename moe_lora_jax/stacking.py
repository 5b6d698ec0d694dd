"""Per-layer parameter trees <-> one tree stacked over a leading `layers` axis.

    stacked = stack_layers(params)            # {"embed_tokens": ..., "layers": {...[N, ...]}, "norm": ...}
    params = unstack_layers(stacked)          # {"embed_tokens": ..., "layers_0": {...}, ..., "norm": ...}
    adapter = unstack_layers(stack_layers(adapter), like=adapter)   # per-layer shapes back (crops the padding)

The scanned decoder (model/scan.py) runs one layer body over `layers`; everything that reads
per-layer trees (merge, spectral analysis, adapter I/O, Hugging Face export, checkpoints) gets
them back from `unstack_layers`. Leaves whose shapes differ between layers (adapters with
per-layer expert counts) are zero-padded to the largest shape; `like` (the per-layer tree, or
its shapes) crops them back. Leaves may be arrays, `jax.ShapeDtypeStruct`s or boxed
`nn.Partitioned` values (a boxed leaf gains the logical axis name "layers" in front), or
`NamedSharding`s (the stacked leaf's sharding: `layers` unsplit, as parallel/rules.py maps it).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

LAYERS = "layers"
_LAYER_KEY = re.compile(r"layers_(\d+)")


def layer_keys(tree: Mapping[str, Any]) -> list[str]:
    """The `layers_{i}` keys of `tree`, in layer order (layers_2 before layers_10)."""
    keys = [k for k in tree if _LAYER_KEY.fullmatch(str(k))]
    return sorted(keys, key=lambda k: int(str(k).split("_")[1]))


def is_stacked(tree: Any) -> bool:
    """Whether `tree` holds its decoder layers stacked under `layers`."""
    return isinstance(tree, Mapping) and LAYERS in tree


def _stack_leaves(*leaves: Any) -> Any:
    """One stacked leaf [N, ...] from N per-layer leaves, zero-padded to the largest shape."""
    if isinstance(leaves[0], NamedSharding):  # the `layers` axis is not split (parallel/rules.py)
        return NamedSharding(leaves[0].mesh, PartitionSpec(None, *leaves[0].spec))
    if isinstance(leaves[0], nn.Partitioned):
        box = leaves[0]
        value = _stack_leaves(*[x.value for x in leaves])
        return box.replace_boxed(value).replace(names=(LAYERS,) + tuple(box.names))
    shape = tuple(int(s) for s in np.max([np.shape(x) for x in leaves], axis=0))
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + shape, leaves[0].dtype)
    if all(np.shape(x) == shape for x in leaves):
        return jnp.stack(leaves)
    return jnp.stack([jnp.pad(x, [(0, s - d) for s, d in zip(shape, np.shape(x))]) for x in leaves])


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` with its `layers_{i}` entries replaced by one `layers` entry of stacked leaves (a no-op
    when it has none or is stacked already)."""
    keys = layer_keys(tree)
    if not keys or is_stacked(tree):
        return dict(tree)
    if keys != [f"layers_{i}" for i in range(len(keys))]:
        raise ValueError(f"layer entries {keys} are not layers_0 ... layers_{len(keys) - 1}")
    out = {k: v for k, v in tree.items() if k not in keys}
    out[LAYERS] = jax.tree_util.tree_map(_stack_leaves, *[tree[k] for k in keys],
                                         is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return out


def unstack_layers(tree: Mapping[str, Any], like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The inverse of `stack_layers`: `layers_{i}` entries again, each leaf cropped to the shape of
    the same leaf in `like` (a per-layer tree of arrays or shapes; None: no cropping)."""
    if not is_stacked(tree):
        return dict(tree)
    stacked = tree[LAYERS]
    leaves = jax.tree_util.tree_leaves(stacked)
    n = len(layer_keys(like)) if like is not None else int(np.shape(leaves[0])[0]) if leaves else 0
    out = {k: v for k, v in tree.items() if k != LAYERS}
    for i in range(n):
        if like is None:
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
        else:  # one slice per leaf: layer i, cropped to its own shape
            out[f"layers_{i}"] = jax.tree_util.tree_map(
                lambda x, ref: x[(i, *(slice(0, d) for d in np.shape(ref)))], stacked, like[f"layers_{i}"])
    return out


def map_layer_dicts(fn: Any, tree: Any, *rest: Any) -> Any:
    """Apply `fn` to every dict in `tree` that holds per-layer (`layers_{i}`) or stacked (`layers`)
    entries, e.g. the parameter-shaped parts of an optax state; `rest` are trees of the same
    structure whose matching dicts are passed along."""
    is_layer_dict = lambda x: isinstance(x, Mapping) and (LAYERS in x or "layers_0" in x)  # noqa: E731
    return jax.tree_util.tree_map(lambda d, *r: fn(d, *r) if is_layer_dict(d) else d, tree, *rest,
                                  is_leaf=is_layer_dict)
