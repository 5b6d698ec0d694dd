"""Plain LoRA against PEFT's LoRA on transformers' LlamaForCausalLM: logits and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_adapter, randomize
from conftest import make_hf_llama

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.adapters import AdapterConfig

TORCH_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
JAX_NAMES = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
             "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
             "down": ("mlp", "down_proj")}


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    import peft
    import torch

    hf_dir, torch_model = make_hf_llama(tmp_path_factory.mktemp("lora"), seed=5, num_key_value_heads=2)
    config, params = load_hf_llama(hf_dir)
    ac = AdapterConfig(method="lora", rank=4, alpha=8.0, use_rslora=True)
    adapter = randomize(init_adapter(config, ac), seed=3, scale=0.2)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pmodel = peft.get_peft_model(torch_model, pcfg).eval()
    with torch.no_grad():
        for i in range(config.num_hidden_layers):
            for t, tn in TORCH_NAMES.items():
                mod = pmodel.get_submodule(f"base_model.model.model.layers.{i}.{tn}")
                a = adapter[f"layers_{i}"][JAX_NAMES[t][0]][JAX_NAMES[t][1]]
                mod.lora_A["default"].weight.copy_(torch.tensor(np.asarray(a["lora_A"]).T))
                mod.lora_B["default"].weight.copy_(torch.tensor(np.asarray(a["lora_B"]).T))
    return config, params, ac, adapter, pmodel


def test_lora_logits_match_peft(lora_pair):
    import torch

    config, params, ac, adapter, pmodel = lora_pair
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(3, 20)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ours = np.asarray(LlamaForCausalLM(config, ac).apply({"params": params, "adapter": adapter}, ids, mask))
    with torch.no_grad():
        ref = pmodel(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    base = np.asarray(LlamaForCausalLM(config).apply({"params": params}, ids, mask))
    valid = mask.astype(bool)
    assert np.abs(ours - base)[valid].max() > 1e-2  # the adapter really changes the logits
    assert np.abs(ours - ref)[valid].max() <= 1e-4


def test_lora_gradients_match_peft(lora_pair):
    import torch

    config, params, ac, adapter, pmodel = lora_pair
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.vocab_size, size=(2, 16)).astype(np.int32)
    weights = rng.normal(size=(2, 16, config.vocab_size)).astype(np.float32)
    model = LlamaForCausalLM(config, ac)

    def loss(ad):
        return jnp.sum(model.apply({"params": params, "adapter": ad}, ids) * weights)

    grads = jax.grad(loss)(adapter)
    pmodel.zero_grad()
    (pmodel(input_ids=torch.tensor(ids)).logits * torch.tensor(weights)).sum().backward()
    for i in range(config.num_hidden_layers):
        for t, tn in TORCH_NAMES.items():
            mod = pmodel.get_submodule(f"base_model.model.model.layers.{i}.{tn}")
            g = grads[f"layers_{i}"][JAX_NAMES[t][0]][JAX_NAMES[t][1]]
            for name, ref in (("lora_A", mod.lora_A["default"].weight.grad), ("lora_B", mod.lora_B["default"].weight.grad)):
                ref = ref.numpy().T
                rel = np.abs(np.asarray(g[name]) - ref).max() / np.abs(ref).max()
                assert rel <= 1e-4, (i, t, name, rel)
