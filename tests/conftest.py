"""Shared fixtures: tiny random transformers LLaMAs on disk, and the embedded SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest


def make_hf_llama(tmp_dir, seed: int = 0, dtype: str = "float32", max_shard_size: str | None = None, **overrides):
    """Build a random transformers LlamaForCausalLM, save it under tmp_dir, return (dir, torch model).

    `model_type="mistral"` (with `sliding_window=W`) builds a MistralForCausalLM instead."""
    import torch
    import transformers

    model_type = overrides.pop("model_type", "llama")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]

    kwargs = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=70,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # transformers initialises norms to 1: randomise them so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_dir, **save_kwargs)
    return tmp_dir, model


@pytest.fixture
def hf_llama_factory(tmp_path):
    counter = iter(range(1000))

    def factory(**kwargs):
        return make_hf_llama(tmp_path / f"hf{next(counter)}", **kwargs)

    return factory


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(input_ids), attention_mask=mask).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm2():
    """(config, params, tokenizer, hf_dir) of the embedded SmolLM2-135M, loaded once per session."""
    from moe_lora_jax import load_hf_llama
    from moe_lora_jax.convert import resolve_hf_dir
    from moe_lora_jax.embedded import default_model_path
    from moe_lora_jax.tokenizer import load_tokenizer

    path = default_model_path()
    config, params = load_hf_llama(path)
    return config, params, load_tokenizer(path), resolve_hf_dir(path)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2[3], dtype=torch.float32).eval()
