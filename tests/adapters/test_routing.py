"""Routing: top-1 gates keep the router probability (the router learns from the task loss), per-layer
top-k from the Allocation (a layer with one expert routes top-1), and the Switch term at per-layer k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, batch, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM, MoeLoraError
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.layers import topk_gates
from moe_lora_jax.allocation import Allocation
from moe_lora_jax.losses import _layer_top_k, cross_entropy, router_stats, switch_aux_mola, total_loss

ROUTER_LEAVES = {"mola": ("router",), "mixlora": ("router",), "milora": ("w1", "w2", "b1", "pool_query")}


@pytest.fixture(scope="module")
def base():
    return tiny_base()


def _router_grad_norms(config, params, ac, seed: int = 3) -> dict[str, float]:
    """|d CE / d w| of every router weight (task loss alone: no balance term)."""
    adapter = randomize(init_adapter(config, ac), seed=seed, scale=0.3)
    ids, mask = batch(config)
    model = LlamaForCausalLM(config, ac)

    def ce(ad):
        return cross_entropy(model.apply({"params": params, "adapter": ad}, ids, mask), ids, mask)[0]

    grads = jax.jit(jax.grad(ce))(adapter)  # one compile: several times faster than op by op here
    out = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if path[-1].key in ROUTER_LEAVES[ac.method]:
            out[name] = float(jnp.linalg.norm(g))
    return out


@pytest.mark.parametrize("method", ["mola", "mixlora", "milora"])
def test_top1_router_learns_from_the_task_loss(base, method):
    config, params = base
    targets = {"mola": ("q", "v"), "mixlora": ("up",), "milora": ("q", "v", "up")}[method]
    ac = AdapterConfig(method=method, num_experts=4, top_k=1, target_modules=targets)
    norms = _router_grad_norms(config, params, ac)
    assert norms and all(n > 1e-4 for n in norms.values()), norms  # a gate of exactly 1 gave ~3e-10


def test_top1_gate_is_the_router_probability_and_top2_is_renormalised():
    probs = jax.nn.softmax(jnp.asarray([[0.3, 1.2, -0.5, 0.1]]), -1)
    g1 = np.asarray(topk_gates(probs, 1))
    assert g1[0, 1] == pytest.approx(float(probs[0, 1]), abs=0) and (g1 > 0).sum() == 1 and g1.sum() < 0.53
    g2 = np.asarray(topk_gates(probs, 2))
    assert g2.sum() == pytest.approx(1.0, abs=1e-6) and (g2 > 0).sum() == 2
    np.testing.assert_array_equal(np.asarray(topk_gates(probs, 2, renormalize=False)), np.asarray(probs * (g2 > 0)))
    # the references' code as written: divided by the sum also at top-1, a gate of exactly 1
    np.testing.assert_array_equal(np.asarray(topk_gates(probs, 1, renormalize="always")), [[0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(topk_gates(probs, 2, renormalize="always")), g2)
    with pytest.raises(MoeLoraError, match="renormalize='sometimes'"):
        AdapterConfig(method="mola", renormalize="sometimes")


def _gates(config, params, ac):
    adapter = randomize(init_adapter(config, ac), seed=4, scale=0.3)
    ids, mask = batch(config)
    model = LlamaForCausalLM(config, ac)
    _, state = jax.jit(lambda ad: model.apply({"params": params, "adapter": ad}, ids, mask, mutable=["intermediates"]))(adapter)
    return {(s.layer, s.module): s for s in router_stats(state)}, state


def test_one_expert_layer_routes_top1_and_per_layer_top_k_is_used(base):
    config, params = base
    # no top_k_per_layer (files written before it): top_k=2 capped by each layer's count
    alloc = Allocation.from_experts_per_layer([1, 3], ("q", "v"))
    ac = AdapterConfig(method="mola", top_k=2, allocation=alloc, target_modules=("q", "v"))
    ac.validate_for(config)
    stats, _ = _gates(config, params, ac)
    for module in ("q_proj", "v_proj"):
        g0, g1 = np.asarray(stats[(0, module)].gates), np.asarray(stats[(1, module)].gates)
        assert g0.shape[-1] == 1 and np.all(g0 == 1.0)  # softmax over one expert: p = 1, top-1
        assert g1.shape[-1] == 3 and np.all((g1 > 0).sum(-1) == 2)
        np.testing.assert_allclose(g1.sum(-1), 1.0, atol=1e-6)
    # the Allocation's own per-module top-k wins over the adapter's top_k
    alloc = Allocation.from_experts_per_layer([2, 3], ("q", "v"), top_k_per_layer={"q": [1, 3], "v": [2, 1]})
    ac = AdapterConfig(method="mola", top_k=2, allocation=alloc, target_modules=("q", "v"))
    assert [ac.layer_top_k(m, i, c) for m in ("q", "v") for i, c in enumerate((2, 3))] == [1, 3, 2, 1]
    stats, _ = _gates(config, params, ac)
    nonzero = {k: int((np.asarray(s.gates) > 0).sum(-1).max()) for k, s in stats.items()}
    assert nonzero == {(0, "q_proj"): 1, (1, "q_proj"): 3, (0, "v_proj"): 2, (1, "v_proj"): 1}
    # top-1 layers keep their probability as gate (< 1), top-3 sums to 1
    assert np.asarray(stats[(0, "q_proj")].gates).sum(-1).max() < 1.0
    np.testing.assert_allclose(np.asarray(stats[(1, "q_proj")].gates).sum(-1), 1.0, atol=1e-6)


def test_switch_term_uses_each_layers_top_k(base):
    config, params = base
    alloc = Allocation.from_experts_per_layer([3, 3], ("q",), top_k_per_layer=[1, 3])
    ac = AdapterConfig(method="mola", top_k=2, allocation=alloc, target_modules=("q",))
    stats, state = _gates(config, params, ac)
    per_layer = sum(float(switch_aux_mola([stats[(i, "q_proj")]], k)[0]) for i, k in ((0, 1), (1, 3)))
    ours = float(switch_aux_mola(list(stats.values()), _layer_top_k(ac))[0])
    assert ours == pytest.approx(per_layer, rel=1e-6)
    assert ours != pytest.approx(float(switch_aux_mola(list(stats.values()), 2)[0]), rel=1e-3)
    ids, mask = batch(config)
    b = {"input_ids": ids}
    logits = jnp.zeros(ids.shape + (config.vocab_size,))
    terms = total_loss(logits, b, state, ac)[1]
    assert float(terms["switch_aux"]) == pytest.approx(per_layer, rel=1e-6)


def test_top_k_above_a_layers_experts(base):
    config, _ = base
    alloc = Allocation.from_experts_per_layer([2, 4], ("q",))
    ac = AdapterConfig(method="mola", top_k=3, allocation=alloc, target_modules=("q",))
    ac.validate_for(config)  # with an Allocation: capped per layer, as AlphaLoRA's top_k = 2 if n > 1 else 1
    assert (ac.layer_top_k("q", 0, 2), ac.layer_top_k("q", 1, 4)) == (2, 3)
