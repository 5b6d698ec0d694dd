"""Optimizer: schedule values, parameter groups, weight-decay mask, per-group learning rates, clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lora_jax.train.config import OptimConfig
from moe_lora_jax.train.optim import decay_mask, learning_rates, make_optimizer, make_schedule, param_groups


def adapter_tree():
    return {
        "layers_0": {
            "self_attn": {"q_proj": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 8))}},
            "mlp": {
                "router": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones((4,))},
                "gate_proj": {"experts_a": jnp.ones((4, 8, 2))},
            },
            "milora": {"rational": {"numerator": jnp.ones((6,)), "denominator": jnp.ones((4,))}, "pool": {"kernel": jnp.ones((8, 8))}},
            "mov": {"scale": jnp.ones((4, 8)), "ia3": jnp.ones((4, 8))},
            "norm": {"weight": jnp.ones((8,))},
        }
    }


def test_warmup_then_cosine_values():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
    s = make_schedule(cfg, total_steps=110)
    expected = {
        0: 1e-4,  # peak * 1/10: the first step already learns
        4: 5e-4,
        9: 1e-3,
        10: 1e-3,
        60: 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)),
        35: 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)),
        110: 1e-4,
        500: 1e-4,
    }
    for step, lr in expected.items():
        assert float(s(step)) == pytest.approx(lr, rel=1e-5), step


def test_linear_and_constant_schedules():
    lin = make_schedule(OptimConfig(lr=2e-3, warmup_steps=0, schedule="linear", end_lr_ratio=0.0), total_steps=100)
    assert [float(lin(t)) for t in (0, 25, 50, 100, 150)] == pytest.approx([2e-3, 1.5e-3, 1e-3, 0.0, 0.0], abs=1e-9)
    const = make_schedule(OptimConfig(lr=3e-4, warmup_steps=4, schedule="constant"), total_steps=100)
    assert [float(const(t)) for t in (0, 3, 50)] == pytest.approx([7.5e-5, 3e-4, 3e-4])
    # warmup longer than the run: clamped, still reaches the peak on the last step
    short = make_schedule(OptimConfig(lr=1e-3, warmup_steps=50), total_steps=5)
    assert float(short(4)) == pytest.approx(1e-3)


def test_groups_and_decay_mask():
    tree = adapter_tree()
    groups = jax.tree.leaves(param_groups(tree))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    by_path = dict(zip(paths, groups))
    assert {p for p, g in by_path.items() if g == "router"} == {"['layers_0']['mlp']['router']['bias']", "['layers_0']['mlp']['router']['kernel']"}
    assert {p for p, g in by_path.items() if g == "rational"} == {
        "['layers_0']['milora']['rational']['denominator']",
        "['layers_0']['milora']['rational']['numerator']",
    }
    mask = dict(zip(paths, jax.tree.leaves(decay_mask(tree, OptimConfig().no_decay_patterns))))
    decayed = {p for p, m in mask.items() if m}
    assert decayed == {
        "['layers_0']['self_attn']['q_proj']['lora_a']",
        "['layers_0']['self_attn']['q_proj']['lora_b']",
        "['layers_0']['mlp']['router']['kernel']",
        "['layers_0']['mlp']['gate_proj']['experts_a']",
        "['layers_0']['milora']['pool']['kernel']",
    }  # not: router bias, rational coefficients, the `scale` and IA3 vectors, the norm weight (1-D)
    # other layouts: the patterns are config
    custom = param_groups(tree, router_patterns=("router", "milora/pool"), rational_patterns=())
    assert custom["layers_0"]["milora"]["pool"]["kernel"] == "router"
    assert custom["layers_0"]["milora"]["rational"]["numerator"] == "default"


def test_first_update_uses_each_groups_learning_rate_and_masked_decay():
    cfg = OptimConfig(lr=1e-3, router_lr=1e-2, rational_lr=5e-2, warmup_steps=0, weight_decay=0.1, clip_norm=None, eps=1e-12)
    tree = adapter_tree()
    tx = make_optimizer(cfg, total_steps=100)
    state = tx.init(tree)
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), tree)
    updates, _ = jax.jit(tx.update)(grads, state, tree)
    # Adam's first step moves each weight by -lr * sign(g); decoupled decay adds -lr * wd * p.
    lr = {"default": 1e-3, "router": 1e-2, "rational": 5e-2}
    groups = param_groups(tree)
    mask = decay_mask(tree, cfg.no_decay_patterns)
    for (path, u), g, m in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(groups), jax.tree.leaves(mask)):
        expected = -lr[g] * (1.0 + (0.1 if m else 0.0))
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert learning_rates(cfg, 100, 0) == pytest.approx({"lr/default": 1e-3, "lr/router": 1e-2, "lr/rational": 5e-2})


def test_gradient_clipping_bounds_the_global_norm():
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, clip_norm=1.0)
    params = {"a": jnp.zeros((3, 4)), "router": {"kernel": jnp.zeros((4, 2))}}
    grads = {"a": jnp.full((3, 4), 10.0), "router": {"kernel": jnp.full((4, 2), -10.0)}}
    tx = make_optimizer(cfg, 10)
    _, state = tx.update(grads, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * clipped gradient: its global norm is (1 - b1) * clip_norm.
    mus = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state) if "mu" in jax.tree_util.keystr(path)]
    norm = math.sqrt(sum(float(jnp.sum(m**2)) for m in mus))
    assert norm == pytest.approx((1 - cfg.b1) * 1.0, rel=1e-5)
    unclipped = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, clip_norm=None), 10)
    _, state = unclipped.update(grads, unclipped.init(params), params)
    mus = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state) if "mu" in jax.tree_util.keystr(path)]
    assert math.sqrt(sum(float(jnp.sum(m**2)) for m in mus)) == pytest.approx(0.1 * 10.0 * math.sqrt(20), rel=1e-5)
