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

from conftest import TINY, batch as make_batch, init_adapter, tiny_base, tiny_config
from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.losses import total_loss
from moe_lora_jax.train.state import TrainState
from moe_lora_jax.train.step import describe_nonfinite, make_train_step

AC = AdapterConfig(method="lora", rank=2, target_modules=("q", "v"))


def injector() -> optax.GradientTransformation:
    """Passes updates through; when its `mode` (set by the test) is 2, its own state turns Inf."""

    def init(params):
        return {"mode": jnp.zeros((), jnp.int32), "acc": jnp.zeros((3,), jnp.float32)}

    def update(updates, state, params=None):
        acc = state["acc"] + jnp.where(state["mode"] == 2, jnp.inf, 1.0)
        return updates, {"mode": state["mode"], "acc": acc}

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
    # eps and lr live in the optimizer state, so one compiled step serves every case
    tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, eps=1e-8), injector())
    step = jax.jit(make_train_step(model, AC, tx, loss_fn=poisonable_loss))
    n = b["input_ids"].shape[0]
    # LoRA's initial B = 0 makes A's gradient exactly zero at step 1 (Adam with eps=0: 0/0)
    b0 = jax.tree_util.tree_map_with_path(lambda p, x: jnp.zeros_like(x) if "lora_B" in jax.tree_util.keystr(p) else x, adapter)

    def run(poison: int = 0, mode: int = 0, lr: float = 1e-2, eps: float = 1e-8, params=adapter):
        good = TrainState.create(params, tx)
        adam, inj = good.opt_state
        hp = {**adam.hyperparams, "learning_rate": jnp.float32(lr), "eps": jnp.float32(eps)}
        state = good.replace(opt_state=(adam._replace(hyperparams=hp), {**inj, "mode": jnp.int32(mode)}))
        before = leaves(state.adapter) + leaves(state.opt_state)
        new, m = step(state, base, {**b, "poison": jnp.full((n,), poison, jnp.int32)})
        said = describe_nonfinite(m["nonfinite/flags"], m["nonfinite/leaf"], new.adapter, new.opt_state)
        return before, new, m, said

    # healthy: the update is applied, nothing flagged
    before, new, m, said = run()
    assert int(m["nonfinite"]) == 0 and np.asarray(m["nonfinite/flags"]).tolist() == [0, 0, 0, 0] and said == "nothing"
    assert np.asarray(m["nonfinite/leaf"]).tolist() == [-1, -1, -1, -1]
    assert not np.array_equal(leaves(new.adapter)[0], before[0]) and int(new.nonfinite_total) == 0

    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(TrainState.create(adapter, tx).opt_state)[0]]
    acc, lr_leaf = next(i for i, p in enumerate(opt_paths) if "acc" in p), next(i for i, p in enumerate(opt_paths) if "learning_rate" in p)
    first_a = "layers_0/self_attn/q_proj/lora_A"
    cases = [  # (kwargs of run, flags, first non-finite leaf per group, what the message starts with)
        (dict(poison=2), [1, 0, 0, 0], [-1, -1, -1, -1], "loss"),  # the loss only
        (dict(poison=1), [0, 1, 0, 0], [-1, 0, -1, -1], f"gradients (first at {first_a})"),  # every gradient leaf
        (dict(eps=0.0, params=b0), [0, 0, 1, 0], [-1, -1, 0, -1], f"updated adapter (first at {first_a})"),  # Adam's 0/0
        (dict(lr=float("nan")), [0, 0, 1, 1], [-1, -1, 0, lr_leaf], f"updated adapter (first at {first_a}), updated optimizer state"),
        (dict(mode=2), [0, 0, 0, 1], [-1, -1, -1, acc], "updated optimizer state (first at 1/acc)"),  # the state overflows
    ]
    for kwargs, flags, first, message in cases:
        before, new, m, said = run(**kwargs)
        assert int(m["nonfinite"]) == 1, kwargs
        assert np.asarray(m["nonfinite/flags"]).tolist() == flags, kwargs
        assert np.asarray(m["nonfinite/leaf"]).tolist() == first, kwargs
        assert said.startswith(message), (kwargs, said)
        assert np.isfinite(float(m["loss"])) == (kwargs.get("poison") != 2)
        # the old adapter and optimizer state, bit for bit; the step and the counters moved
        for x, y in zip(before, leaves(new.adapter) + leaves(new.opt_state)):
            np.testing.assert_array_equal(x, y)
        assert (int(new.step), int(new.nonfinite_total), int(new.nonfinite_run)) == (1, 1, 1)


def test_train_names_a_nonfinite_update_and_prints_without_progress(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """The loop with an optimizer whose every update is NaN (Adam, eps=0, on LoRA's zero A-gradient at B = 0):
    each step is skipped with a line naming the adapter leaf, validation lines print without a
    progress bar, and the run stops with an error naming the cause, not at the checkpoint."""
    from moe_lora_jax.train.loop import build_run, train

    config = tiny_config(tiny_model_dir, tmp_path / "run", "loop.steps=4", "loop.eval_every=1", "loop.max_nonfinite_steps=2",
                         "checkpoint.every=1", "adapter.method=lora", "adapter.target_modules=[q, v]", "loop.global_batch=2",
                         "data.max_len=48")
    run = build_run(config, progress=False)
    run = dataclasses.replace(run, optimizer=optax.adam(1e-2, eps=0.0))
    with pytest.raises(MoeLoraError) as err:
        train(config, progress=False, run=run)
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    skipped = [line for line in lines if "update skipped" in line]
    assert len(skipped) == 2, lines
    assert skipped[0].startswith("step 1: NaN/Inf in the updated adapter (first at layers_0/self_attn/q_proj/lora_A); update skipped (1 in"), skipped
    assert skipped[1].endswith("(2 in a row)"), skipped
    assert [line.split(":")[0] for line in lines if "validation loss" in line] == ["step 1"], lines
    message = str(err.value)
    assert "2 consecutive steps had NaN/Inf, the last in the updated adapter (first at layers_0/" in message, message
    assert "optim.eps" in message and "\n" not in message
    # the step-1 checkpoint holds the untouched initial adapter (never NaN); nothing was refused
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_checkpoint_refusal_names_the_nonfinite_leaf(tmp_path):
    from moe_lora_jax.train.checkpoint import CheckpointStore

    state = TrainState.create({"a": np.ones((2,), np.float32), "b": {"w": np.ones((2, 2), np.float32)}}, optax.sgd(0.1))
    bad = state.replace(adapter={"a": state.adapter["a"], "b": {"w": jnp.asarray([[1.0, np.inf], [0.0, 1.0]], jnp.float32)}})
    store = CheckpointStore(tmp_path / "ck", async_save=False)
    with pytest.raises(MoeLoraError, match=r"holds NaN or Inf \(first at adapter/b/w\)"):
        store.save(1, bad, {})
    store.close()
    assert store.steps == []
