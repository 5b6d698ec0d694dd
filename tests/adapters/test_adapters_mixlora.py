"""MixLoRA against the `mixlora` package (inject_adapter_in_model) on a tiny random LLaMA."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import init_adapter, randomize
from conftest import make_hf_llama

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.adapters import AdapterConfig

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def mixlora_torch_model(torch_model, adapter, ac, num_layers):
    """Inject our weights into a transformers LLaMA with the mixlora package; experts switched to eval."""
    import torch
    from mixlora import MixLoraConfig, inject_adapter_in_model

    t = lambda a: torch.tensor(np.ascontiguousarray(np.asarray(a).T))  # noqa: E731
    weights = {}
    for i in range(num_layers):
        layer = adapter[f"layers_{i}"]
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = t(layer["mlp"]["router"])
        for m in ("q", "k", "v", "o"):
            leaf = layer["self_attn"][PROJ[m]]
            weights[f"mixlora.layers.{i}.self_attn.{PROJ[m]}.lora_A.weight"] = t(leaf["lora_A"])
            weights[f"mixlora.layers.{i}.self_attn.{PROJ[m]}.lora_B.weight"] = t(leaf["lora_B"])
        for m in ("gate", "up", "down"):
            leaf = layer["mlp"][PROJ[m]]
            for e in range(ac.num_experts):
                weights[f"mixlora.layers.{i}.mlp.{PROJ[m]}.experts.{e}.lora_A.weight"] = t(leaf["lora_A"][e])
                weights[f"mixlora.layers.{i}.mlp.{PROJ[m]}.experts.{e}.lora_B.weight"] = t(leaf["lora_B"][e])
    config = MixLoraConfig.from_config({
        "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "peft_type": "MIXLORA",
        "r": ac.rank, "lora_alpha": int(ac.alpha), "lora_dropout": ac.dropout, "target_modules": list(PROJ.values()),
        "routing_strategy": "mixlora", "num_experts": ac.num_experts, "top_k": ac.top_k, "act_fn": "silu",
    })
    config.adapter_name_, config.dtype_ = "default", torch.float32
    config.check()
    inject_adapter_in_model(torch_model, config, weights)
    torch_model.eval()
    for layer in torch_model.model.layers:  # the experts live in a plain dict that .eval() does not reach
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return torch_model


@pytest.mark.parametrize("experts, top_k", [(4, 2), (3, 1)])
def test_mixlora_logits_match_package(tmp_path, experts, top_k):
    import torch

    hf_dir, torch_model = make_hf_llama(tmp_path / "hf", seed=7)
    config, params = load_hf_llama(hf_dir)
    # the package divides by the sum at every k, also at top-1 (gate 1): renormalize="always" is that reading
    ac = AdapterConfig(method="mixlora", rank=4, alpha=8.0, dropout=0.05, num_experts=experts, top_k=top_k,
                       renormalize="always")
    adapter = randomize(init_adapter(config, ac), seed=experts, scale=0.3)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(2, 14)).astype(np.int32)
    ours = np.asarray(LlamaForCausalLM(config, ac).apply({"params": params, "adapter": adapter}, ids))
    base = np.asarray(LlamaForCausalLM(config).apply({"params": params}, ids))
    ref_model = mixlora_torch_model(torch_model, adapter, ac, config.num_hidden_layers)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - base).max() > 1e-2
    assert np.abs(ours - ref).max() <= 1e-4
