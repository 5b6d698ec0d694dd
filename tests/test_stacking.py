"""stacking.py: per-layer trees <-> stacked over `layers`, and the train step's per-layer
non-finite leaf report read off stacked trees."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax.stacking import map_layer_dicts, stack_layers, unstack_layers
from moe_lora_jax.train.step import _leaf_finite


def _tree():
    rng = np.random.default_rng(0)
    layer = lambda e: {"q_proj": {"lora_A": jnp.asarray(rng.normal(size=(e, 5, 2)), jnp.float32),  # noqa: E731
                                  "router": jnp.asarray(rng.normal(size=(5, e)), jnp.float32)},
                       "scale": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    return {"embed": jnp.ones((3, 5)), "layers_0": layer(2), "layers_1": layer(4), "layers_2": layer(1)}


def test_stack_pads_and_unstack_crops_back_exactly():
    tree = _tree()
    stacked = stack_layers(tree)
    assert sorted(stacked) == ["embed", "layers"]
    assert stacked["layers"]["q_proj"]["lora_A"].shape == (3, 4, 5, 2)
    assert stacked["layers"]["scale"].shape == (3, 5)
    assert float(jnp.abs(stacked["layers"]["q_proj"]["router"][2, :, 1:]).max()) == 0.0  # zero padding
    back = unstack_layers(stacked, like=tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_boxed_leaves_gain_the_layers_axis_name():
    boxed = {f"layers_{i}": {"kernel": nn.Partitioned(jnp.zeros((4, 6)), names=("embed", "mlp"))} for i in range(3)}
    stacked = stack_layers(boxed)["layers"]["kernel"]
    assert stacked.names == ("layers", "embed", "mlp") and stacked.value.shape == (3, 4, 6)
    shapes = stack_layers({f"layers_{i}": {"k": jax.ShapeDtypeStruct((2, i + 1), jnp.float32)} for i in range(2)})
    assert shapes["layers"]["k"].shape == (2, 2, 2)


def test_optimizer_like_states_stack_and_unstack_their_layer_dicts():
    tree = _tree()
    state = ({"count": jnp.zeros((), jnp.int32)}, {"mu": tree, "nu": tree})
    stacked = map_layer_dicts(stack_layers, state)
    assert stacked[1]["mu"]["layers"]["q_proj"]["lora_A"].shape == (3, 4, 5, 2)
    back = map_layer_dicts(unstack_layers, stacked, state)
    assert jax.tree.structure(back) == jax.tree.structure(state)


def test_leaf_finite_on_stacked_trees_reports_per_layer_leaves_and_ignores_padding():
    tree = _tree()
    tree["layers_1"]["q_proj"]["router"] = tree["layers_1"]["q_proj"]["router"].at[0, 3].set(jnp.nan)
    stacked = stack_layers(tree)
    np.testing.assert_array_equal(np.asarray(_leaf_finite(stacked, tree)), np.asarray(_leaf_finite(tree)))
    assert int(np.argmin(np.asarray(_leaf_finite(stacked, tree)))) == 5  # layers_1/q_proj/router
    # a NaN in layer 2's padding (past its one expert) is not part of any layer's leaf
    clean = stack_layers(_tree())
    clean["layers"]["q_proj"]["router"] = clean["layers"]["q_proj"]["router"].at[2, 0, 3].set(jnp.inf)
    assert bool(jnp.all(_leaf_finite(clean, _tree())))


def test_scanned_model_reads_stacked_base_and_unrolled_model_refuses_it():
    import pytest
    from conftest import TINY, init_adapter, randomize, tiny_base

    from moe_lora_jax import LlamaForCausalLM
    from moe_lora_jax.adapters import AdapterConfig
    from moe_lora_jax.adapters.merge import merge_lora

    cfg = TINY.replace(num_hidden_layers=2)
    ac = AdapterConfig(method="lora", rank=2, target_modules=("q", "v"))
    base = tiny_base(cfg, seed=1)[1]
    adapter = randomize(init_adapter(cfg, ac), seed=2, scale=0.1)
    ids = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    model = LlamaForCausalLM(cfg.replace(scan_layers=True), ac)
    apply = jax.jit(lambda p: model.apply({"params": p, "adapter": adapter}, ids))
    np.testing.assert_array_equal(np.asarray(apply(stack_layers(base))), np.asarray(apply(base)))
    with pytest.raises(ValueError, match="stacked"):
        LlamaForCausalLM(cfg.replace(scan_layers=False), ac).apply({"params": stack_layers(base), "adapter": adapter}, ids)
    merged = merge_lora(stack_layers(base), adapter, ac)  # per layer again, as exports need
    want = merge_lora(base, adapter, ac)
    assert jax.tree.structure(merged) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
