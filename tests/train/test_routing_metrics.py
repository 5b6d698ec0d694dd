"""train.step.routing_metrics counts each router's own top-k: a MoLA Allocation's per-layer top-k,
as the Switch terms do, not one global top_k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.allocation import Allocation
from moe_lora_jax.losses import _layer_top_k
from moe_lora_jax.train.state import TrainState
from moe_lora_jax.train.step import make_train_step, routing_metrics

# two layers of 3 experts on q: layer 0 routes top-1, layer 1 top-2 (the adapter's top_k is 2)
AC = AdapterConfig(method="mola", rank=2, top_k=2, target_modules=("q",),
                   allocation=Allocation.from_counts({"q": (3, 3)}, top_k_per_layer={"q": (1, 2)}))

# 4 tokens, 3 experts. top-1 picks 0, 0, 1, 2 -> load [2, 1, 1] / 4;
# top-2 picks {0,1} {0,2} {1,2} {0,2} -> load [3, 2, 3] / 8.
LOGITS = np.array([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]], np.float32)


def _inter(*per_layer):
    return {f"layers_{i}": {"self_attn": {"q_proj": {"router_logits": (jnp.asarray(x)[None],)}}} for i, x in enumerate(per_layer)}


def test_each_layer_counts_its_own_top_k():
    out = routing_metrics(_inter(LOGITS, LOGITS), jnp.ones((1, 4), jnp.int32), _layer_top_k(AC))
    np.testing.assert_allclose(out["router/layer_0/load"], [0.5, 0.25, 0.25], rtol=1e-6)
    np.testing.assert_allclose(out["router/layer_1/load"], [3 / 8, 2 / 8, 3 / 8], rtol=1e-6)
    # CV^2 of the loads: var / mean^2 with mean 1/3: (1/72) * 9 and (1/288) * 9
    assert float(out["router/layer_0/load_cv2"]) == pytest.approx(1 / 8, rel=1e-5)
    assert float(out["router/layer_1/load_cv2"]) == pytest.approx(1 / 32, rel=1e-5)
    assert float(out["router/layer_0/load_max"]) == pytest.approx(0.5, rel=1e-6)
    assert float(out["router/mean/load_max"]) == pytest.approx((0.5 + 0.375) / 2, rel=1e-6)
    # one int still means that k for every router, capped by its expert count
    both2 = routing_metrics(_inter(LOGITS, LOGITS), None, 2)
    np.testing.assert_allclose(both2["router/layer_0/load"], [3 / 8, 2 / 8, 3 / 8], rtol=1e-6)
    np.testing.assert_allclose(routing_metrics(_inter(LOGITS), None, 5)["router/layer_0/load"], [1 / 3] * 3, rtol=1e-6)


class _StubModel:
    """Stands in for LlamaForCausalLM in the train step: sows LOGITS as both layers' q router logits."""

    def apply(self, variables, input_ids, attention_mask=None, **_):
        w = variables["adapter"]["w"]
        logits_BxLxV = jnp.zeros(input_ids.shape + (5,)) + w
        router = jnp.asarray(LOGITS)[None] + w
        return logits_BxLxV, {"intermediates": _inter(router, router)}


def _stub_loss(logits, batch, intermediates, adapter_config):
    ce = jnp.mean(logits) ** 2
    return ce, {"ce": ce, "tokens": jnp.float32(3.0)}


def test_train_step_logs_the_allocation_top_k():
    tx = optax.sgd(0.0)
    step = make_train_step(_StubModel(), AC, tx, deterministic=True, loss_fn=_stub_loss)
    b = {"input_ids": jnp.zeros((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)}
    _, metrics = jax.jit(step)(TrainState.create({"w": jnp.zeros(())}, tx), {}, b)
    np.testing.assert_allclose(metrics["router/layer_0/load"], [0.5, 0.25, 0.25], rtol=1e-6)  # top-1
    np.testing.assert_allclose(metrics["router/layer_1/load"], [3 / 8, 2 / 8, 3 / 8], rtol=1e-6)  # top-2
    assert float(metrics["router/layer_0/load_cv2"]) == pytest.approx(1 / 8, rel=1e-5)
    # without an Allocation every layer of this MoLA adapter routes top-2
    plain = AC.replace(allocation=None)
    _, metrics = jax.jit(make_train_step(_StubModel(), plain, tx, deterministic=True, loss_fn=_stub_loss))(
        TrainState.create({"w": jnp.zeros(())}, tx), {}, b)
    np.testing.assert_allclose(metrics["router/layer_0/load"], [3 / 8, 2 / 8, 3 / 8], rtol=1e-6)
