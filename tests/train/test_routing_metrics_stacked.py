"""train.step.routing_metrics (vectorised over each module's stacked routers) against its definition:
`train.metrics.routing_stats` of every router, averaged over each layer's routers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.allocation import Allocation
from moe_lora_jax.losses import router_stats
from moe_lora_jax.train.metrics import routing_stats
from moe_lora_jax.train.step import routing_metrics

CFG = TINY.replace(num_hidden_layers=3)
COUNTS = {"q": (1, 3, 2), "v": (4, 1, 2), "down": (2, 3, 4)}


def _reference(inter, mask, top_k):
    per_layer = {}
    for s in router_stats(inter, "router") + router_stats(inter, "milora"):
        probs = jax.nn.softmax(s.logits.astype(jnp.float32), axis=-1)
        m = mask if probs.shape[:2] == mask.shape else None
        per_layer.setdefault(s.layer, []).append(routing_stats(probs, m, min(top_k, probs.shape[-1]), prefix="r"))
    out, means = {}, {}
    for layer, rows in sorted(per_layer.items()):
        for stat in ("entropy", "entropy_norm", "load_max", "load_min", "load_cv2"):
            out[f"router/layer_{layer}/{stat}"] = jnp.mean(jnp.stack([r[f"r/{stat}"] for r in rows]))
            means.setdefault(stat, []).append(out[f"router/layer_{layer}/{stat}"])
        loads = [r["r/load"] for r in rows]
        if len({x.shape for x in loads}) == 1:
            out[f"router/layer_{layer}/load"] = jnp.mean(jnp.stack(loads), axis=0)
    out.update({f"router/mean/{k}": jnp.mean(jnp.stack(v)) for k, v in means.items()})
    return out


@pytest.mark.parametrize("ac", [
    AdapterConfig(method="mola", rank=4, top_k=2, target_modules=tuple(COUNTS), allocation=Allocation.from_counts(COUNTS)),
    AdapterConfig(method="mov", num_experts=3),
], ids=["mola_counts", "mov_heads"])
def test_stacked_routing_metrics_match_the_per_router_definition(ac):
    model = LlamaForCausalLM(CFG, ac)
    variables = {"params": tiny_base(CFG, seed=1)[1], "adapter": randomize(init_adapter(CFG, ac), seed=2, scale=0.5)}
    ids = jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6], jnp.int32)
    _, state = jax.jit(lambda v: model.apply(v, ids, mask, mutable=["intermediates"]))(variables)
    inter = state["intermediates"]
    got = jax.jit(lambda i: routing_metrics(i, mask, 2))(inter)
    want = jax.jit(lambda i: _reference(i, mask, 2))(inter)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)
