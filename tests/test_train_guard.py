"""The non-finite guard: whatever goes NaN/Inf (loss, gradients, the updated adapter, the updated
optimizer state), the step is skipped, the old state kept and counted, and the message names it.

The failing updates are built here (an optimizer whose update or state turns NaN, a loss whose
gradient does), not from config values, so that no up-front config check can refuse them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adapter_testlib import TINY, batch as make_batch, init_adapter, tiny_base
from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.losses import total_loss
from moe_lora_jax.train.state import TrainState
from moe_lora_jax.train.step import NONFINITE_GROUPS, describe_nonfinite, make_train_step
from test_train_loop import tiny_config, tiny_model_dir  # noqa: F401 - the module's fixture

AC = AdapterConfig(method="lora", rank=2, target_modules=("q", "v"))


def injector() -> optax.GradientTransformation:
    """Passes updates through, unless its `mode` (set by the test) says to poison them:
    1 = the update of the first leaf is NaN (so the new adapter is), 2 = its own state turns Inf."""

    def init(params):
        return {"mode": jnp.zeros((), jnp.int32), "acc": jnp.zeros((3,), jnp.float32)}

    def update(updates, state, params=None):
        mode = state["mode"]
        leaves, treedef = jax.tree.flatten(updates)
        leaves[0] = jnp.where(mode == 1, jnp.nan, leaves[0])
        acc = state["acc"] + jnp.where(mode == 2, jnp.inf, 1.0)
        return jax.tree.unflatten(treedef, leaves), {"mode": mode, "acc": acc}

    return optax.GradientTransformation(init, update)


def poisonable_loss(logits, batch, intermediates, adapter_config):
    """total_loss, plus 0 * sqrt(0 * logits) (gradient 0 * inf = NaN, value 0) when poison == 1,
    plus NaN (value only; gradients stay finite) when poison == 2."""
    loss, metrics = total_loss(logits, batch, intermediates, adapter_config)
    poison = batch["poison"][0]
    zero_or_one = jnp.where(poison == 1, 0.0, 1.0)
    loss = loss + 0.0 * jnp.sqrt(zero_or_one + 0.0 * jnp.sum(logits)) + jnp.where(poison == 2, jnp.nan, 0.0)
    return loss, metrics


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def tiny():
    config, base = tiny_base(TINY)
    rng = np.random.default_rng(0)
    adapter = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32), init_adapter(TINY, AC))
    ids, mask = make_batch(TINY, B=2, L=8)
    b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    return LlamaForCausalLM(TINY, AC), base, adapter, b


def test_every_nonfinite_group_is_rejected_counted_and_named(tiny):
    model, base, adapter, b = tiny
    tx = optax.chain(optax.adam(1e-2), injector())
    step = jax.jit(make_train_step(model, AC, tx, loss_fn=poisonable_loss))
    good = TrainState.create(adapter, tx)
    n = b["input_ids"].shape[0]

    def run(poison: int, mode: int):
        state = good.replace(opt_state=(good.opt_state[0], {**good.opt_state[1], "mode": jnp.int32(mode)}))
        before = leaves(state.adapter) + leaves(state.opt_state)
        new, m = step(state, base, {**b, "poison": jnp.full((n,), poison, jnp.int32)})
        return before, new, m

    # healthy: the update is applied, nothing flagged
    before, new, m = run(0, 0)
    assert int(m["nonfinite"]) == 0 and np.asarray(m["nonfinite/flags"]).tolist() == [0, 0, 0, 0]
    assert np.asarray(m["nonfinite/leaf"]).tolist() == [-1, -1, -1, -1]
    assert not np.array_equal(leaves(new.adapter)[0], before[0]) and int(new.nonfinite_total) == 0

    cases = [  # (poison, injector mode, flags, first non-finite leaf per group)
        (2, 0, [1, 0, 0, 0], [-1, -1, -1, -1]),  # the loss only
        (1, 0, [0, 1, 0, 0], [-1, 0, -1, -1]),  # the gradients (every leaf: the first is named)
        (0, 1, [0, 0, 1, 0], [-1, -1, 0, -1]),  # the update of leaf 0 makes the adapter NaN
        (0, 2, [0, 0, 0, 1], [-1, -1, -1, 0]),  # the optimizer state overflows
    ]
    opt_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(good.opt_state)[0]]
    inf_leaf = next(i for i, p in enumerate(opt_paths) if "acc" in jax.tree_util.keystr(p))
    for poison, mode, flags, first in cases:
        if mode == 2:
            first = [-1, -1, -1, inf_leaf]
        before, new, m = run(poison, mode)
        assert int(m["nonfinite"]) == 1, (poison, mode)
        assert np.asarray(m["nonfinite/flags"]).tolist() == flags, (poison, mode)
        assert np.asarray(m["nonfinite/leaf"]).tolist() == first, (poison, mode)
        # the old adapter and optimizer state, bit for bit; the step and the counters moved
        for x, y in zip(before, leaves(new.adapter) + leaves(new.opt_state)):
            np.testing.assert_array_equal(x, y)
        assert (int(new.step), int(new.nonfinite_total), int(new.nonfinite_run)) == (1, 1, 1)
        said = describe_nonfinite(m["nonfinite/flags"], m["nonfinite/leaf"], new.adapter, new.opt_state)
        assert said.startswith(NONFINITE_GROUPS[flags.index(1)]), said
    assert said == f"updated optimizer state (first at 1/acc)", said
    before, new, m = run(0, 1)
    said = describe_nonfinite(m["nonfinite/flags"], m["nonfinite/leaf"], new.adapter, new.opt_state)
    assert said == "updated adapter (first at layers_0/self_attn/q_proj/lora_A)", said


@pytest.mark.parametrize("tx", [optax.adam(1e-2, eps=0.0), optax.adam(float("nan"))], ids=["eps0", "lr_nan"])
def test_adam_with_eps0_or_lr_nan_is_skipped_not_written(tiny, tx):
    """Adam with eps=0 on a zero gradient computes 0/0; lr=NaN scales every update to NaN.
    Loss and gradients are finite, so only the new-adapter check can catch either."""
    model, base, adapter, b = tiny
    # B = 0 (the LoRA initialisation): A's gradient is exactly zero at step 1
    adapter = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "lora_B" in jax.tree_util.keystr(p) else x, adapter
    )
    state = TrainState.create(adapter, tx)
    before = leaves(state.adapter) + leaves(state.opt_state)
    new, m = jax.jit(make_train_step(model, AC, tx))(state, base, b)
    assert np.asarray(m["nonfinite/flags"]).tolist() == [0, 0, 1, 0] and np.isfinite(float(m["loss"]))
    for x, y in zip(before, leaves(new.adapter) + leaves(new.opt_state)):
        np.testing.assert_array_equal(x, y)
    assert int(new.nonfinite_total) == 1


def test_train_names_a_nonfinite_update_and_prints_without_progress(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """The loop with an optimizer whose every update is NaN (Adam, eps=0, on LoRA's zero A-gradient):
    each step is skipped with a line naming the adapter leaf, validation lines print without a
    progress bar, and the run stops with an error naming the cause, not at the checkpoint."""
    from moe_lora_jax.train.loop import build_run, train

    config = tiny_config(tiny_model_dir, tmp_path / "run", "loop.steps=4", "loop.eval_every=1", "loop.max_nonfinite_steps=2",
                         "checkpoint.every=1")
    run = build_run(config, progress=False)
    run = dataclasses.replace(run, optimizer=optax.adam(1e-2, eps=0.0))
    with pytest.raises(MoeLoraError) as err:
        train(config, progress=False, run=run)
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    skipped = [line for line in lines if "update skipped" in line]
    assert len(skipped) == 2, lines
    assert skipped[0].startswith("step 1: NaN/Inf in the updated adapter (first at layers_0/") and "lora_A" in skipped[0], skipped
    assert skipped[1].endswith("(2 in a row)"), skipped
    assert [line.split(":")[0] for line in lines if "validation loss" in line] == ["step 1"], lines
    message = str(err.value)
    assert "2 consecutive steps had NaN/Inf, the last in the updated adapter (first at layers_0/" in message, message
    assert "optim.eps" in message and "\n" not in message
    # the step-1 checkpoint holds the untouched initial adapter (never NaN); nothing was refused
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
