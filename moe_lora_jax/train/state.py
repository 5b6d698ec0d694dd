"""The train state: everything a step changes, and nothing it does not.

    adapter = init_adapter(model_config, adapter_config, key)      # moe_lora_jax.adapters: the `adapter` collection only
    state = TrainState.create(adapter, optimizer, seed=config.seed)
    state_sh = state_shardings(state, mesh)                         # replicated by default
    stacked = stack_state(state)                                    # scanned layers: adapter and moments over `layers`
    state = unstack_state(stacked, like=state)                      # each layer's exact shapes back (checkpoints, exports)

The frozen base weights (`params`) are *not* in the state: they are passed to the
step as a separate argument, never differentiated, never donated, never
checkpointed (a checkpoint names the base model by path and fingerprint).

Fields:

    step            int32 []   batches processed (skipped non-finite steps included)
    adapter         float32    the `adapter` collection (LoRA, expert banks, routers)
    opt_state                  optax state of `adapter` (float32; its own count of applied updates)
    rng             uint32 [2] raw PRNG key data; step t uses fold_in(rng, t), so the key never changes
    nonfinite_total int32 []   steps whose loss, gradients or updated state were NaN/Inf (their update was skipped)
    nonfinite_run   int32 []   consecutive such steps up to now (0 after a good step)

With scanned layers the train loop keeps the state stacked between steps (`stack_state`): the
step then neither stacks nor crops its hundreds of per-layer leaves, which is what made its
compile time grow with depth. Checkpoints and exports get each layer's exact shapes back
(`unstack_state`); the padding of layers with fewer experts stays exactly zero (zero gradients,
zero AdamW moments, so zero updates).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_lora_jax.parallel.rules import LOGICAL_AXIS_RULES, shardings_for
from moe_lora_jax.stacking import is_stacked, map_layer_dicts, stack_layers, unstack_layers


class TrainState(struct.PyTreeNode):
    step: jax.Array
    adapter: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_total: jax.Array
    nonfinite_run: jax.Array

    @classmethod
    def create(cls, adapter: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> "TrainState":
        # a copy: the state owns its buffers, so donating it to the step never deletes the caller's arrays
        adapter = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), nn.unbox(adapter))
        return cls(
            step=jnp.zeros((), jnp.int32),
            adapter=adapter,
            opt_state=optimizer.init(adapter),
            rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
            nonfinite_total=jnp.zeros((), jnp.int32),
            nonfinite_run=jnp.zeros((), jnp.int32),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what checkpoints store)."""
        return {
            "step": self.step,
            "adapter": self.adapter,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{k: d[k] for k in ("step", "adapter", "opt_state", "rng", "nonfinite_total", "nonfinite_run")})

    @property
    def applied_updates(self) -> jax.Array:
        """Optimizer updates actually applied (= optax's own count, which drives the schedule)."""
        return self.step - self.nonfinite_total


def stack_state(state: TrainState) -> TrainState:
    """`state` with the adapter and every adapter-shaped part of the optimizer state stacked over
    `layers` (stacking.stack_layers; works on a TrainState of arrays, shapes or NamedShardings)."""
    if is_stacked(state.adapter):
        return state
    return state.replace(adapter=stack_layers(state.adapter), opt_state=map_layer_dicts(stack_layers, state.opt_state))


def unstack_state(state: TrainState, like: TrainState) -> TrainState:
    """The inverse of `stack_state`: per-layer entries cropped to the shapes of `like` (the per-layer
    state, or its shapes)."""
    if not is_stacked(state.adapter):
        return state
    return state.replace(adapter=unstack_layers(state.adapter, like=like.adapter),
                         opt_state=map_layer_dicts(unstack_layers, state.opt_state, like.opt_state))


def state_shapes(state: TrainState) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs): what `unstack_state` crops to."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), state)


def state_shardings(state: TrainState, mesh: Mesh, adapter_abstract: Any = None, adapter_sharding: str = "replicated") -> TrainState:
    """A TrainState of NamedShardings.

    `adapter_sharding="replicated"` (default: adapters are small) puts every leaf on
    every device; `"rules"` shards the adapter and its optimizer moments by the
    logical axis rules (pass the boxed `adapter` collection of `jax.eval_shape(model.init, ...)`).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    if adapter_sharding == "replicated" or adapter_abstract is None:
        return jax.tree.map(lambda _: replicated, state)
    if adapter_sharding != "rules":
        raise ValueError(f"adapter_sharding={adapter_sharding!r}: use replicated or rules")
    adapter_sh = shardings_for(adapter_abstract, mesh, LOGICAL_AXIS_RULES)
    adapter_struct = jax.tree.structure(adapter_sh)

    def opt_sharding(subtree: Any) -> Any:
        # Optimizer moments shaped like the adapter follow its sharding; scalars (counts) are replicated.
        if jax.tree.structure(subtree) == adapter_struct:
            return adapter_sh
        return jax.tree.map(lambda _: replicated, subtree)

    opt_sh = jax.tree.map(opt_sharding, state.opt_state, is_leaf=lambda x: jax.tree.structure(x) == adapter_struct)
    return TrainState(
        step=replicated,
        adapter=adapter_sh,
        opt_state=opt_sh,
        rng=replicated,
        nonfinite_total=replicated,
        nonfinite_run=replicated,
    )
