"""Every adapter method as a configuration of the same model: init equality, routing, shapes, training."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, batch, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM, MoeLoraError
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.config import allocation_from_dict
from moe_lora_jax.adapters.layers import RATIONAL_GELU_DEN, RATIONAL_GELU_NUM, rational
from moe_lora_jax.losses import router_stats
from moe_lora_jax.model import KVCache

METHODS = ("lora", "molora", "mov", "mola", "loramoe", "mixlora", "milora")


@dataclasses.dataclass(frozen=True)
class StandInAllocation:
    """The `moe_lora_jax.allocation.Allocation` API the adapters use (counts per module per layer)."""

    table: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, **counts):
        return cls(tuple((m, tuple(c)) for m, c in counts.items()))

    @property
    def modules(self):
        return tuple(m for m, _ in self.table)

    @property
    def num_layers(self):
        return len(self.table[0][1])

    def counts(self, module):
        return dict(self.table)[module]


def _allocation(**counts):
    try:
        from moe_lora_jax.allocation import Allocation  # noqa: F401 - prefer the real one when it exists

        return allocation_from_dict({"counts": counts})
    except ImportError:
        return StandInAllocation.of(**counts)


@pytest.fixture(scope="module")
def base():
    return tiny_base()


@pytest.mark.parametrize("method", METHODS)
def test_init_leaves_base_logits_and_params_tree(base, method):
    config, params = base
    ids, mask = batch(config)
    model = LlamaForCausalLM(config, AdapterConfig(method=method, num_experts=4, top_k=2))
    # the real initialisers, run eagerly (op compiles are shared between methods) with a cheap PRNG
    ours, variables = model.init_with_output(jax.random.key(1, impl="unsafe_rbg"), ids, mask)
    assert set(variables) == {"params", "adapter"}
    assert jax.tree.structure(nn.unbox(variables["params"])) == jax.tree.structure(params)
    # with the initial adapter (B = 0, IA3 = 1) on the base weights the logits are the base model's
    base_init = LlamaForCausalLM(config).apply({"params": nn.unbox(variables["params"])}, ids, mask)
    valid = mask.astype(bool)
    assert float(jnp.abs(ours - base_init)[valid].max()) <= 2e-6
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(variables["adapter"]))[0]:
        name = str(path[-1].key)
        if name == "lora_B":
            assert not np.any(np.asarray(leaf))
        if name == "ia3":
            assert np.all(np.asarray(leaf) == 1.0)


def test_adapter_params_carry_logical_axes(base):
    config, _ = base
    model = LlamaForCausalLM(config, AdapterConfig(method="mola"))
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    q = variables["adapter"]["layers_0"]["self_attn"]["q_proj"]
    assert q["lora_A"].names == ("expert", "embed", "rank")
    assert q["lora_B"].names == ("expert", "rank", "heads")
    assert q["router"].names == (None, "expert")


def test_topk_gates_sum_to_one_with_exactly_k(base):
    config, params = base
    ac = AdapterConfig(method="mola", num_experts=5, top_k=2)
    adapter = randomize(init_adapter(config, ac), scale=0.3)
    ids, mask = batch(config)
    _, state = LlamaForCausalLM(config, ac).apply(
        {"params": params, "adapter": adapter}, ids, mask, mutable=["intermediates"]
    )
    stats = router_stats(state)
    assert len(stats) == 7 * config.num_hidden_layers
    for s in stats:
        g = np.asarray(s.gates)
        assert g.shape == ids.shape + (5,)
        np.testing.assert_allclose(g.sum(-1), 1.0, atol=1e-6)
        assert ((g > 0).sum(-1) == 2).all()
        # the kept experts are the two most probable ones
        top2 = np.argsort(-np.asarray(s.logits), axis=-1)[..., :2]
        assert (np.take_along_axis(g, top2, -1) > 0).all()


def test_allocation_with_different_counts_gives_exact_shapes(base):
    config, _ = base
    counts = {"q": (2, 6), "k": (3, 1), "v": (4, 4), "o": (5, 2), "gate": (1, 3), "up": (2, 2), "down": (6, 1)}
    ac = AdapterConfig(method="mola", rank=3, top_k=1, allocation=_allocation(**counts))
    adapter = init_adapter(config, ac)
    names = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
    for m, per_layer in counts.items():
        for i, E in enumerate(per_layer):
            leaf = adapter[f"layers_{i}"][names[m]][f"{m}_proj"]
            assert leaf["lora_A"].shape[0] == E and leaf["lora_B"].shape[0] == E and leaf["router"].shape[1] == E
            assert leaf["lora_A"].shape[2] == 3 and leaf["lora_B"].shape[1] == 3


@pytest.mark.parametrize("method", ["mola", "mixlora"])
def test_gradient_step_changes_adapter_only(base, method):
    from moe_lora_jax.losses import total_loss

    config, params = base
    ac = AdapterConfig(method=method, num_experts=4, top_k=2, dropout=0.1)
    model = LlamaForCausalLM(config, ac)
    adapter = init_adapter(config, ac)
    ids, mask = batch(config)
    b = {"input_ids": ids, "attention_mask": mask}

    def step(params, adapter, key):  # eager: per-op compiles are shared with the other tests
        def loss_fn(ad):
            logits, state = model.apply({"params": params, "adapter": ad}, ids, mask, deterministic=False,
                                        rngs={"dropout": key}, mutable=["intermediates"])
            return total_loss(logits, b, state, ac)[0]

        loss, g = jax.value_and_grad(loss_fn)(adapter)
        return loss, jax.tree.map(lambda a, d: a - 0.5 * d, adapter, g), g

    before = jax.tree.map(np.asarray, params)
    loss, new_adapter, grads = step(params, adapter, jax.random.key(0))
    assert np.isfinite(float(loss))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), adapter, new_adapter))
    assert any(changed)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, before)


def test_rational_activation_fits_gelu():
    x = np.linspace(-4, 4, 2001).astype(np.float32)
    r = np.asarray(rational(jnp.asarray(x), jnp.asarray(RATIONAL_GELU_NUM), jnp.asarray(RATIONAL_GELU_DEN)))
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))
    assert np.abs(r - gelu).max() <= 2e-3


@pytest.mark.parametrize("pooling", ["attention", "mean", "last", "max"])
def test_milora_routes_from_prompt_only(base, pooling):
    """The routing decision depends on prompt tokens only; padding and the response do not change it."""
    config, params = base
    ac = AdapterConfig(method="milora", top_k=3, milora_pooling=pooling)
    adapter = randomize(init_adapter(config, ac), scale=0.3)
    model = LlamaForCausalLM(config, ac)
    ids, _ = batch(config, B=2, L=10, pad=False)
    prompt = np.zeros_like(ids)
    prompt[:, :6] = 1
    run = (lambda i, m, p: model.apply({"params": params, "adapter": adapter}, i, m, prompt_mask_BxL=p,
                                               mutable=["intermediates"])[1]["intermediates"]["milora_routing"][0])
    r1 = run(ids, np.ones_like(ids), prompt)
    ids2 = ids.copy()
    ids2[:, 6:] = 5  # a different response
    r2 = run(ids2, np.ones_like(ids), prompt)
    np.testing.assert_allclose(r1, r2, atol=1e-6)
    assert r1.shape == (2, config.num_hidden_layers, 7)
    assert ((np.asarray(r1) > 0).sum(-1) == 3).all()
    np.testing.assert_allclose(np.asarray(r1).sum(-1), 1.0, atol=1e-6)


def test_milora_kv_decoding_reuses_routing(base):
    config, params = base
    ac = AdapterConfig(method="milora", top_k=2)
    adapter = randomize(init_adapter(config, ac), scale=0.3)
    model = LlamaForCausalLM(config, ac)
    v = {"params": params, "adapter": adapter}
    ids, _ = batch(config, B=2, L=10, pad=False)
    prompt = np.zeros_like(ids)
    prompt[:, :7] = 1
    full, state = model.apply(v, ids, prompt_mask_BxL=prompt, mutable=["intermediates"])
    cache = KVCache.init(config, 2, 12)
    logits, cache = model.apply(v, ids[:, :7], cache=cache)
    np.testing.assert_allclose(cache.routing, state["intermediates"]["milora_routing"][0], atol=1e-6)
    steps = [logits]
    for t in range(7, 10):
        step_logits, cache = model.apply(v, ids[:, t : t + 1], cache=cache)
        steps.append(step_logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-4)
    # with routing passed explicitly the routers do not run: no milora_logits are sown
    _, st = model.apply(v, ids, routing=cache.routing, mutable=["intermediates"])
    assert not router_stats(st, "milora")


def test_dropout_is_active_only_when_not_deterministic(base):
    config, params = base
    ac = AdapterConfig(method="lora", dropout=0.5)
    adapter = randomize(init_adapter(config, ac))
    model = LlamaForCausalLM(config, ac)
    ids, _ = batch(config, pad=False)
    v = {"params": params, "adapter": adapter}
    a = model.apply(v, ids)
    b = model.apply(v, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(a, model.apply(v, ids))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lora", target_modules=("q", "qkv")), "unknown target module 'qkv'"),
        (dict(method="lora", rank=0), "rank=0"),
        (dict(method="nope"), "unknown adapter method"),
        (dict(method="loramoe", num_experts=3), "two groups"),
        (dict(method="milora", top_k=8), "top_k=8 is larger"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(MoeLoraError, match=message):
        AdapterConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lora", rank=49), "rank=49 is larger than the q_proj linear"),
        (dict(method="mola", top_k=5, num_experts=4), "top_k=5 is larger than the 4 experts of q in layer 0"),
        (dict(method="mola", top_k=1, allocation=dict(q=(2, 4, 4))), "covers 3 layers but the model has 2"),
        (dict(method="mola", top_k=1, allocation=dict(q=(2, 0))), "layer 1 of q has 0 experts"),
    ],
)
def test_bad_config_for_model_is_one_clear_error(base, kwargs, message):
    config, _ = base
    with pytest.raises(MoeLoraError, match=message):  # a zero count is refused when the Allocation is built
        if "allocation" in kwargs:
            counts = {m: kwargs["allocation"].get(m, kwargs["allocation"]["q"]) for m in ("q", "k", "v", "o", "gate", "up", "down")}
            kwargs = dict(kwargs, allocation=_allocation(**counts))
        model = LlamaForCausalLM(config, AdapterConfig(**kwargs))
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
