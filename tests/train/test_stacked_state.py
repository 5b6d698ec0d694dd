"""The train state kept stacked over layers between steps (train/state.py, as the train loop keeps it
for scanned layers): the same steps as a per-layer state, zero padding that stays zero, and the
non-finite guard still naming the per-layer leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY, batch as make_batch, init_adapter, randomize, tiny_base
from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.allocation import Allocation
from moe_lora_jax.train.state import TrainState, stack_state, state_shapes, unstack_state
from moe_lora_jax.train.step import describe_nonfinite, make_train_step

CFG = TINY.replace(num_hidden_layers=2, scan_layers=True)
AC = AdapterConfig(method="mola", rank=2, top_k=2, target_modules=("q", "down"),
                   allocation=Allocation.from_counts({"q": (1, 3), "down": (2, 4)}))
TX = optax.adamw(1e-2, weight_decay=0.1)  # decay too must leave the zero padding at zero


@pytest.fixture(scope="module")
def setup():
    base = tiny_base(CFG, seed=1)[1]
    adapter = randomize(init_adapter(CFG, AC), seed=2, scale=0.1)
    like = state_shapes(TrainState.create(adapter, TX, seed=0))
    ids, mask = make_batch(CFG, B=2, L=8)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    step = jax.jit(make_train_step(LlamaForCausalLM(CFG, AC), AC, TX, deterministic=True, state_like=like))
    return base, adapter, like, batch, step


def test_a_stacked_state_steps_like_the_per_layer_state_and_its_padding_stays_zero(setup):
    base, adapter, like, batch, step = setup
    per_layer = TrainState.create(adapter, TX, seed=0)
    stacked = stack_state(per_layer)
    assert stacked.adapter["layers"]["self_attn"]["q_proj"]["lora_A"].shape[:2] == (2, 3)  # 2 layers x 3 experts (padded)
    for _ in range(3):
        per_layer, m_ref = step(per_layer, base, batch)
        stacked, m = step(stacked, base, batch)
        assert "layers" in stacked.adapter  # returned stacked
        np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-6)
    back = unstack_state(stacked, like)
    assert jax.tree.structure(back) == jax.tree.structure(per_layer)
    moved = 0.0
    for x, y, x0 in zip(jax.tree.leaves(back), jax.tree.leaves(per_layer), jax.tree.leaves(TrainState.create(adapter, TX))):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
        moved = max(moved, float(np.max(np.abs(np.asarray(y, np.float64) - np.asarray(x0, np.float64)))))
    assert moved > 1e-3  # the steps did change the state
    # layer 0 of q has one expert: experts 1 and 2 of the stacked leaf are padding, exactly zero
    for tree in (stacked.adapter, stacked.opt_state[0].mu, stacked.opt_state[0].nu):
        assert float(jnp.max(jnp.abs(tree["layers"]["self_attn"]["q_proj"]["lora_A"][0, 1:]))) == 0.0


def test_the_guard_names_the_per_layer_leaf_of_a_stacked_state(setup):
    base, adapter, like, batch, step = setup
    per_layer = TrainState.create(adapter, TX, seed=0)
    nu = per_layer.opt_state[0].nu  # an Inf second moment in one layer's leaf: finite gradients, an Inf optimizer state
    nu["layers_1"]["mlp"]["down_proj"]["lora_B"] = nu["layers_1"]["mlp"]["down_proj"]["lora_B"].at[3, 0, 0].set(jnp.inf)
    stacked, metrics = step(stack_state(per_layer), base, batch)
    assert int(metrics["nonfinite"]) == 1 and int(stacked.step) == 1
    what = describe_nonfinite(metrics["nonfinite/flags"], metrics["nonfinite/leaf"], like.adapter, like.opt_state)
    # (an Inf second moment makes a zero update, so the adapter itself stays finite)
    assert what == "updated optimizer state (first at 0/nu/layers_1/mlp/down_proj/lora_B)", what
