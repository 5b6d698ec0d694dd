"""Mistral bases: config fields, the sliding-window mask (forward, cached decode, greedy generate)
against transformers' MistralForCausalLM, conversion back out, and an adapter on top."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_adapter, randomize
from conftest import make_hf_llama, torch_logits

from moe_lora_jax import LlamaConfig, LlamaForCausalLM, load_hf_llama
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.infer.generate import greedy_generate

WINDOW = 8


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """(hf_dir, config, params, torch model) of a random 2-layer Mistral with a window of 8."""
    hf_dir, torch_model = make_hf_llama(tmp_path_factory.mktemp("mistral"), seed=1, model_type="mistral", sliding_window=WINDOW)
    config, params = load_hf_llama(hf_dir)
    return hf_dir, config, params, torch_model


def _left_padded(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids, mask = np.zeros((len(lengths), L), np.int32), np.zeros((len(lengths), L), np.int32)
    for row, n in enumerate(lengths):
        ids[row, L - n:] = rng.integers(3, vocab, size=n)
        mask[row, L - n:] = 1
    return ids, mask


def _forward(config, params, ids, mask):
    return np.asarray(jax.jit(LlamaForCausalLM(config).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))


def test_mistral_logits_match_transformers_past_the_window(mistral):
    _, config, params, torch_model = mistral
    assert (config.model_type, config.sliding_window) == ("mistral", WINDOW)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, size=(3, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # left padding: transformers counts the window in slots, pads included
    mask[2, 31:] = 0  # right padding
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, ids, mask)
    err = {w: np.abs(_forward(config.replace(sliding_window=w), params, ids, mask) - ref)[valid].max()
           for w in (WINDOW - 1, WINDOW, WINDOW + 1)}
    assert err[WINDOW] <= 1e-4, err
    # the parity pins the window exactly: one key more or one less is far off
    assert min(err[WINDOW - 1], err[WINDOW + 1]) > 1e-2, err


def test_mistral_greedy_past_the_window_matches_transformers_generate(mistral):
    import torch

    _, config, params, torch_model = mistral
    # prompts of 12 (longer than the window: the prefill slides too), 6 and 3 tokens, left-padded to 12
    ids, mask = _left_padded(config.vocab_size, (12, 6, 3), seed=1)
    ours = np.asarray(greedy_generate(LlamaForCausalLM(config), {"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                      max_new_tokens=20, pad_token_id=0))
    with torch.no_grad():
        out = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=20,
                                   do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                                   return_dict_in_generate=True)
    ref = out.sequences[:, ids.shape[1]:].numpy()
    assert ref.shape == (3, 20)
    top2 = np.sort(torch.stack(out.scores, 1).numpy(), axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-5  # no near-ties: exact equality is a fair demand
    np.testing.assert_array_equal(ours, ref)
    torch_model.config.sliding_window = None  # transformers without the window decodes other tokens
    try:
        with torch.no_grad():
            unwindowed = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                              max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    finally:
        torch_model.config.sliding_window = WINDOW
    assert (unwindowed[:, ids.shape[1]:].numpy() != ref).any(), "the window changed no token: the test lost its point"


# ------------------------------------------------------------------ config.json
def _mistral_json(**changes):
    hf = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=70, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=12, model_type="mistral", sliding_window=WINDOW).to_hf()
    hf.update(changes)
    return {k: v for k, v in hf.items() if v is not ...}


def test_mistral_config_fields_in_transformers_4_and_5_layouts():
    assert LlamaConfig.from_hf(_mistral_json()).sliding_window == WINDOW
    assert LlamaConfig.from_hf(_mistral_json(sliding_window=...)).sliding_window == 4096  # MistralConfig's default
    v02 = LlamaConfig.from_hf(_mistral_json(sliding_window=None))  # Mistral-7B-v0.2: null = no window
    assert (v02.model_type, v02.sliding_window) == ("mistral", None)
    assert v02.to_hf()["sliding_window"] is None and "sliding_window" in v02.to_hf()
    v5 = LlamaConfig.from_hf(_mistral_json(rope_theta=..., rope_scaling=..., rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert (v5.rope_theta, v5.sliding_window) == (1e6, WINDOW)
    config = LlamaConfig.from_hf(_mistral_json())
    assert LlamaConfig.from_hf(config.to_hf()) == config
    assert config.to_hf()["architectures"] == ["MistralForCausalLM"] and config.to_hf()["model_type"] == "mistral"
    assert LlamaConfig.from_hf(_mistral_json(model_type="llama", sliding_window=None)).to_hf()["model_type"] == "llama"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sliding_window=0), "sliding_window=0 (use a positive integer"),
        (dict(use_sliding_window=False), "use_sliding_window=false with sliding_window=8"),
        (dict(max_window_layers=1), "max_window_layers=1"),
        (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types with ['full_attention']"),
        (dict(model_type="llama"), "sliding_window=8 with model_type='llama'"),
    ],
)
def test_unsupported_window_fields_are_refused(change, message):
    with pytest.raises(MoeLoraError, match="unsupported architecture") as info:
        LlamaConfig.from_hf(_mistral_json(**change))
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1
    # the Qwen2 fields in the one reading that Mistral agrees with are accepted
    assert LlamaConfig.from_hf(_mistral_json(use_sliding_window=True, max_window_layers=0)).sliding_window == WINDOW


def test_llama_config_refuses_a_window_without_mistral():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=4)
    with pytest.raises(MoeLoraError, match="needs model_type='mistral'"):
        LlamaConfig(**base, sliding_window=4)
    with pytest.raises(MoeLoraError, match="is not a window"):
        LlamaConfig(**base, model_type="mistral", sliding_window=0)


def test_mistral_converts_out_as_mistral_and_info_shows_the_window(mistral, tmp_path, capsys):
    import torch
    import transformers

    from moe_lora_jax.cli import main as cli_main
    from moe_lora_jax.convert import save_hf_llama
    from moe_lora_jax.convert.orbax_io import load_orbax_config, save_orbax_llama

    hf_dir, config, params, torch_model = mistral
    save_hf_llama(config, params, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == WINDOW
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == "MistralForCausalLM" and back.config.sliding_window == WINDOW
    ids = np.random.default_rng(3).integers(3, config.vocab_size, size=(1, 20)).astype(np.int32)
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(torch_model, ids))

    save_orbax_llama(config, params, tmp_path / "orbax")
    assert load_orbax_config(tmp_path / "orbax") == config

    capsys.readouterr()
    assert cli_main(["info", "--model", str(hf_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["sliding_window", str(WINDOW)] for line in lines), lines
    assert any(line.split() == ["model_type", "mistral"] for line in lines), lines


def test_mola_adapter_on_a_mistral_base(mistral):
    _, config, params, torch_model = mistral
    ac = AdapterConfig(method="mola", num_experts=4, top_k=2)
    model = LlamaForCausalLM(config, ac)
    ids, mask = _left_padded(config.vocab_size, (20, 14), seed=2)
    apply = jax.jit(model.apply)
    adapter = init_adapter(config, ac)
    at_init = np.asarray(apply({"params": params, "adapter": adapter}, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)  # B = 0: the adapted model is the windowed base, as transformers computes it
    assert np.abs(at_init - torch_logits(torch_model, ids, mask))[valid].max() <= 1e-4

    trained = np.asarray(apply({"params": params, "adapter": randomize(adapter)}, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.isfinite(trained).all() and np.abs(trained - at_init)[valid].max() > 1e-3  # the experts act
