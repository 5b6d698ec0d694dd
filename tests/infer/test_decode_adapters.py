"""Decoding with adapters: KV-cache greedy == full-forward argmax for every method, MiLoRA's
route-once decoding (no router work in decode steps), and merged LoRA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig, merge_lora
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.infer.generate import beam_search, generate, positions_from_mask
from moe_lora_jax.model import KVCache

CONFIGS = {
    "lora": AdapterConfig(method="lora", rank=4),
    "molora": AdapterConfig(method="molora", rank=4, num_experts=3),
    "mov": AdapterConfig(method="mov", num_experts=3),
    "mola": AdapterConfig(method="mola", rank=4, num_experts=4, top_k=2),
    "loramoe": AdapterConfig(method="loramoe", rank=4, num_experts=4),
    "mixlora": AdapterConfig(method="mixlora", rank=4, num_experts=4, top_k=2),
    "milora": AdapterConfig(method="milora", rank=4, top_k=2),
}
NEW = 6


@pytest.fixture(scope="module")
def base():
    return tiny_base(TINY, seed=4)


def _variables(params, method: str, seed: int = 3):
    ac = CONFIGS[method]
    # random, non-zero weights: at init B = 0 and every adapter would be the identity
    return LlamaForCausalLM(TINY, ac), {"params": params, "adapter": randomize(init_adapter(TINY, ac), seed=seed, scale=0.2)}


def _prompts(lengths=(5, 9, 7), seed=0):
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.zeros((len(lengths), L), np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):  # left padding
        ids[row, L - n:] = rng.integers(3, TINY.vocab_size, size=n)
        mask[row, L - n:] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def _full_forward(model, variables, ids, mask, out):
    """Logits of one cache-free forward pass over prompt + continuation (MiLoRA pools the prompt only)."""
    seq = jnp.concatenate([ids, out], axis=1)
    seq_mask = jnp.concatenate([mask, jnp.ones_like(out)], axis=1)
    prompt_mask = jnp.concatenate([mask, jnp.zeros_like(out)], axis=1)
    apply = jax.jit(lambda v, s, m, p: model.apply(v, s, m, positions_from_mask(m), prompt_mask_BxL=p))
    return apply(variables, seq, seq_mask, prompt_mask)


@pytest.mark.parametrize("method", [None, *CONFIGS])
def test_greedy_with_cache_equals_argmax_of_full_forward(base, method):
    config, params = base
    model, variables = (LlamaForCausalLM(config), {"params": params}) if method is None else _variables(params, method)
    ids, mask = _prompts()
    out = generate(model, variables, ids, mask, max_new_tokens=NEW)
    logits = _full_forward(model, variables, ids, mask, out)
    # The model is causal, so the logits at position L-1+t of this one pass are those of a full
    # forward pass over the first L+t tokens: the argmax a cache-free step-by-step decoder picks.
    L = ids.shape[1]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.argmax(logits[:, L - 1 : L - 1 + NEW], axis=-1)))
    if method is not None:  # the adapter is really active while decoding
        plain = _full_forward(LlamaForCausalLM(config), {"params": params}, ids, mask, out)
        assert float(jnp.abs(logits - plain)[:, L - 1 :].max()) > 1e-2  # float noise is ~1e-6


def _step(model, variables, token_B, position_B, cache, mutable=False):
    B = token_B.shape[0]
    kwargs = {"mutable": ["intermediates"]} if mutable else {}
    return model.apply(variables, token_B[:, None], jnp.ones((B, 1), bool), position_B[:, None], cache=cache, **kwargs)


def _milora_prefill(base):
    config, params = base
    model, variables = _variables(params, "milora")
    ids, mask = _prompts()
    cache = KVCache.init(config, ids.shape[0], ids.shape[1] + NEW)
    (logits, cache), inter = model.apply(variables, ids, mask, positions_from_mask(mask), cache=cache,
                                         mutable=["intermediates"])
    return model, variables, ids, mask, logits, cache, inter["intermediates"]


def test_milora_routes_once_at_prefill_and_decode_steps_reuse_it(base):
    model, variables, ids, mask, logits, cache, inter = _milora_prefill(base)
    routing_BxNxM = np.asarray(cache.routing)
    assert routing_BxNxM.shape == (3, TINY.num_hidden_layers, 7)
    np.testing.assert_array_equal(routing_BxNxM, np.asarray(inter["milora_routing"][0]))
    np.testing.assert_array_equal((routing_BxNxM > 0).sum(-1), 2)  # top-2 of the 7 modules
    assert "milora_logits" in str(jax.tree_util.tree_structure(inter))  # the routers ran at prefill

    # poison the router weights for the decode steps: if a router ran, NaN would reach the logits
    poisoned = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, jnp.nan) if "milora_router" in jax.tree_util.keystr(p) else x, variables)
    step = jax.jit(lambda v, t, pos, c: _step(model, v, t, pos, c, mutable=True))
    position = positions_from_mask(mask)[:, -1] + 1
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    clean_cache, poisoned_cache = cache, cache
    for _ in range(4):
        (clean, clean_cache), step_inter = step(variables, token, position, clean_cache)
        (dirty, poisoned_cache), _ = step(poisoned, token, position, poisoned_cache)
        assert "milora_logits" not in str(jax.tree_util.tree_structure(step_inter))  # no router statistics sown
        np.testing.assert_array_equal(np.asarray(clean_cache.routing), routing_BxNxM)  # decision unchanged
        np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
        assert np.isfinite(np.asarray(clean)).all()
        token, position = jnp.argmax(clean[:, -1], axis=-1).astype(jnp.int32), position + 1


def _used_router_inputs(fn, variables, *args) -> tuple[int, int]:
    """(router weights, other adapter weights) that the traced program of `fn` reads."""
    closed = jax.make_jaxpr(fn)(variables, *args)
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars} | {id(v) for v in closed.jaxpr.outvars}
    router = other = 0
    for (path, _), var in zip(leaves, closed.jaxpr.invars[: len(leaves)]):
        name = jax.tree_util.keystr(path)
        if "'adapter'" in name and id(var) in read:
            router, other = (router + 1, other) if "milora_router" in name else (router, other + 1)
    return router, other


def test_milora_decode_step_program_does_not_read_the_router(base):
    model, variables, ids, mask, logits, cache, _ = _milora_prefill(base)
    n_router = sum("milora_router" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables))
    token = jnp.zeros((3,), jnp.int32)
    position = positions_from_mask(mask)[:, -1] + 1
    router, other = _used_router_inputs(lambda v, t, p, c: _step(model, v, t, p, c), variables, token, position, cache)
    assert router == 0 and other == 2 * 7 * TINY.num_hidden_layers  # every lora_A / lora_B, no router weight
    fresh = KVCache.init(TINY, 3, ids.shape[1] + NEW)  # the prefill does read all of them
    prefill = lambda v, c: model.apply(v, ids, mask, positions_from_mask(mask), cache=c)  # noqa: E731
    router, other = _used_router_inputs(prefill, variables, fresh)
    assert router == n_router == 6 * TINY.num_hidden_layers and other == 2 * 7 * TINY.num_hidden_layers


def test_milora_beam_search_scores_match_full_forward(base):
    """Every beam carries its prompt's routing: the best beam's score is its log-likelihood under a
    full forward pass routed on the prompt (no EOS, so it is logp / length)."""
    config, params = base
    model, variables = _variables(params, "milora")
    ids, mask = _prompts()
    beam, score = beam_search(model, variables, ids, mask, num_beams=3, max_new_tokens=NEW)
    logits = _full_forward(model, variables, ids, mask, beam)
    L = ids.shape[1]
    logp = jax.nn.log_softmax(logits[:, L - 1 : L - 1 + NEW], axis=-1)
    total = jnp.take_along_axis(logp, beam[..., None], axis=-1)[..., 0].sum(-1)
    np.testing.assert_allclose(np.asarray(score), np.asarray(total) / NEW, atol=1e-5)
    greedy = generate(model, variables, ids, mask, max_new_tokens=NEW)
    assert (np.asarray(beam) != np.asarray(greedy)).any()  # the beams explored beyond greedy


def test_merged_lora_gives_the_same_logits_and_tokens(base):
    config, params = base
    model, variables = _variables(params, "lora")
    merged = merge_lora(params, variables["adapter"], CONFIGS["lora"])
    ids, mask = _prompts()
    unmerged_logits = jax.jit(model.apply)(variables, ids, mask, positions_from_mask(mask))
    merged_logits = jax.jit(LlamaForCausalLM(config).apply)({"params": merged}, ids, mask, positions_from_mask(mask))
    valid = np.asarray(mask, bool)
    diff = np.abs(np.asarray(merged_logits) - np.asarray(unmerged_logits))[valid]
    assert diff.max() <= 1e-5, diff.max()
    base_logits = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, ids, mask, positions_from_mask(mask))
    assert np.abs(np.asarray(base_logits) - np.asarray(unmerged_logits))[valid].max() > 0.05  # the LoRA does something
    np.testing.assert_array_equal(
        generate(LlamaForCausalLM(config), {"params": merged}, ids, mask, max_new_tokens=NEW),
        generate(model, variables, ids, mask, max_new_tokens=NEW),
    )
    k = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert merged["layers_0"]["self_attn"]["q_proj"]["kernel"] is not k  # a new tree: the base stays unmerged
    np.testing.assert_array_equal(params["layers_0"]["self_attn"]["q_proj"]["kernel"], k)


@pytest.mark.parametrize("method", ["molora", "milora", "mixlora"])
def test_merging_a_routed_adapter_is_refused(base, method):
    _, params = base
    _, variables = _variables(params, method)
    with pytest.raises(MoeLoraError, match=f"only plain LoRA can be merged.*not {method}"):
        merge_lora(params, variables["adapter"], CONFIGS[method])


def test_merging_an_adapter_of_another_shape_is_refused(base):
    _, params = base
    other = TINY.replace(hidden_size=40, head_dim=10)
    adapter = randomize(init_adapter(other, CONFIGS["lora"]))
    with pytest.raises(MoeLoraError, match="different base model"):
        merge_lora(params, adapter, CONFIGS["lora"])
