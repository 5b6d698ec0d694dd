"""Logits of the Flax LLaMA against transformers' LlamaForCausalLM on random tiny configs and on SmolLM2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import torch_logits

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.infer.generate import greedy_generate

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "odd-sizes": dict(
        vocab_size=101, hidden_size=30, intermediate_size=53, num_attention_heads=3, num_key_value_heads=3, head_dim=10, num_hidden_layers=3
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_llama_factory, name):
    hf_dir, torch_model = hf_llama_factory(seed=len(name), **CONFIGS[name])
    config, params = load_hf_llama(hf_dir)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(3, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, 31:] = 0  # right padding
    ours = np.asarray(jax.jit(LlamaForCausalLM(config).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(torch_model, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 40, config.vocab_size)
    valid = mask.astype(bool)  # padding queries carry no meaning in either implementation
    assert np.abs(ours - ref)[valid].max() <= 1e-4


def test_kv_cache_decoding_equals_full_forward(hf_llama_factory):
    hf_dir, _ = hf_llama_factory(seed=3, num_key_value_heads=2)
    config, params = load_hf_llama(hf_dir)
    model = LlamaForCausalLM(config)
    from moe_lora_jax.model import KVCache

    ids = jnp.asarray(np.random.default_rng(1).integers(3, config.vocab_size, size=(2, 12)), jnp.int32)
    apply = jax.jit(model.apply)
    full = apply({"params": params}, ids)
    cache = KVCache.init(config, 2, 16)
    prefill, cache = apply({"params": params}, ids[:, :8], cache=cache)
    steps = [prefill]
    for t in range(8, 12):
        logits, cache = apply({"params": params}, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    assert int(cache.index) == 12
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_bfloat16_policy_and_remat(hf_llama_factory):
    hf_dir, _ = hf_llama_factory(seed=4)
    config, params = load_hf_llama(hf_dir)
    ids = jnp.asarray(np.random.default_rng(2).integers(3, config.vocab_size, size=(2, 16)), jnp.int32)
    ref = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, ids)

    bf16_config, bf16_params = load_hf_llama(hf_dir, param_dtype="bfloat16", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}
    bf16 = jax.jit(LlamaForCausalLM(bf16_config).apply)({"params": bf16_params}, ids)
    assert bf16.dtype == jnp.float32
    rel = float(jnp.abs(bf16 - ref).max() / jnp.abs(ref).max())
    assert rel < 0.05, rel  # bfloat16 keeps ~3 significant digits through 2 layers

    def loss(p, cfg):
        return jnp.mean(LlamaForCausalLM(cfg).apply({"params": p}, ids) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_plain = grad(params, config)
    g_remat = grad(params, config.replace(remat=True))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_param_has_logical_axes():
    import flax.linen as nn

    from moe_lora_jax import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    boxed = jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    specs = nn.get_partition_spec(boxed)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == 1 + 9 * 2 + 1 + 1  # embedding, 9 per layer, final norm, untied head
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == len(leaf.value.shape)
    assert specs["layers_0"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")


# ------------------------------------------------------------------ the real model
PROMPT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower between"
)


def test_smollm2_logits_match_transformers(smollm2, smollm2_torch):
    config, params, tokenizer, _ = smollm2
    ids = np.asarray(tokenizer(PROMPT)["input_ids"], np.int32)[None]
    assert ids.shape[1] >= 32
    ours = np.asarray(jax.jit(LlamaForCausalLM(config).apply)({"params": params}, jnp.asarray(ids)))
    ref = torch_logits(smollm2_torch, ids)
    assert np.abs(ours - ref).max() <= 2e-4


def test_smollm2_greedy_kv_cache_matches_transformers_generate(smollm2, smollm2_torch):
    import torch

    config, params, tokenizer, _ = smollm2
    tokenizer.padding_side = "left"
    enc = tokenizer(["The capital of France is", PROMPT], return_tensors="np", padding=True)
    ours = greedy_generate(
        LlamaForCausalLM(config),
        {"params": params},
        jnp.asarray(enc["input_ids"]),
        jnp.asarray(enc["attention_mask"]),
        max_new_tokens=16,
        eos_token_ids=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    with torch.no_grad():
        ref = smollm2_torch.generate(
            torch.tensor(enc["input_ids"]),
            attention_mask=torch.tensor(enc["attention_mask"]),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=config.pad_token_id,
        )[:, enc["input_ids"].shape[1]:].numpy()
    assert ref.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    assert tokenizer.decode(np.asarray(ours)[0]).strip().startswith("Paris")
