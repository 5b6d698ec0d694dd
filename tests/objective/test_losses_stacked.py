"""switch_aux_mola (vectorised over each module's stacked routers) against its per-router definition
on a model whose modules have different expert counts and top-k per layer (so the per-layer groups
of equal expert count hold different modules): value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.layers import topk_mask
from moe_lora_jax.allocation import Allocation
from moe_lora_jax.losses import _layer_top_k, _stat_k, _token_weights, router_stats, switch_aux_mola

CFG = TINY.replace(num_hidden_layers=3)
COUNTS = {"q": (1, 3, 2), "v": (3, 1, 2), "down": (2, 3, 4)}
TOP_K = {"q": (1, 2, 2), "v": (2, 1, 1), "down": (2, 2, 3)}


def _definition(stats, top_k, mask):
    """The per-router form: per (layer, E, k) the routers concatenated as tokens, E * sum f P, summed."""
    groups = {}
    for s in stats:
        E = s.logits.shape[-1]
        groups.setdefault((s.layer, E, _stat_k(top_k, s, E)), []).append(s)
    total = 0.0
    for (_, E, k), group in sorted(groups.items()):
        probs = jnp.concatenate([jax.nn.softmax(s.logits.reshape(-1, E).astype(jnp.float32), -1) for s in group])
        w = jnp.concatenate([_token_weights(s.logits, mask) for s in group])
        sel = topk_mask(probs, k, jnp.float32) * w[:, None]
        f = jnp.sum(sel, 0) / jnp.maximum(jnp.sum(sel), 1e-10)
        p = jnp.sum(probs * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1e-10)
        total = total + E * jnp.sum(f * p)
    return total


def test_stacked_switch_mola_matches_its_per_router_definition():
    ac = AdapterConfig(method="mola", rank=4, top_k=2, target_modules=tuple(COUNTS),
                       allocation=Allocation.from_counts(COUNTS, top_k_per_layer=TOP_K))
    model = LlamaForCausalLM(CFG, ac)
    base = tiny_base(CFG, seed=1)[1]
    adapter = randomize(init_adapter(CFG, ac), seed=2, scale=0.5)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6], jnp.int32)

    def value(adapter, fn):
        _, state = model.apply({"params": base, "adapter": adapter}, ids, mask, mutable=["intermediates"])
        stats = router_stats(state["intermediates"])
        return fn(stats, _layer_top_k(ac), mask)

    got, g_got = jax.jit(jax.value_and_grad(lambda a: value(a, switch_aux_mola)[0]))(adapter)
    want, g_want = jax.jit(jax.value_and_grad(lambda a: value(a, _definition)))(adapter)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    for x, y in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
