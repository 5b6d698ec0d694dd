"""Decoding: greedy against step-by-step argmax, beam search and top-p against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.infer.generate import beam_search, generate, top_p_filter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_llama

    hf_dir, torch_model = make_hf_llama(tmp_path_factory.mktemp("tiny"), seed=7, vocab_size=61)
    config, params = load_hf_llama(hf_dir)
    return config, params, torch_model


def _prompts(vocab, lengths=(5, 9, 7), seed=0):
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.zeros((len(lengths), L), np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):  # left padding
        ids[row, L - n:] = rng.integers(3, vocab, size=n)
        mask[row, L - n:] = 1
    return ids, mask


def test_greedy_equals_argmax_of_full_forward(tiny):
    config, params, _ = tiny
    model = LlamaForCausalLM(config)
    ids, mask = _prompts(config.vocab_size)
    out = np.asarray(generate(model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6))
    forward = jax.jit(model.apply)
    from moe_lora_jax.infer.generate import positions_from_mask

    seq, seq_mask = ids, mask
    for step in range(6):  # recompute the whole sequence every step, no cache
        positions = positions_from_mask(jnp.asarray(seq_mask))
        logits = forward({"params": params}, jnp.asarray(seq), jnp.asarray(seq_mask), positions)
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)
        np.testing.assert_array_equal(out[:, step], token, err_msg=f"step {step}")
        seq = np.concatenate([seq, token[:, None]], axis=1)
        seq_mask = np.concatenate([seq_mask, np.ones_like(token)[:, None]], axis=1)


def test_eos_stops_rows_and_pads(tiny):
    config, params, _ = tiny
    ids, mask = _prompts(config.vocab_size)
    model = LlamaForCausalLM(config)
    free = np.asarray(generate(model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=8))
    eos = int(free[0, 2])  # make the token row 0 emits third an EOS
    out = np.asarray(
        generate(model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=0)
    )
    for row in range(len(out)):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] + 1 if len(hits) else 8
        np.testing.assert_array_equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == 0).all()


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), (True, 1.0), ("never", 2.0), (False, 0.0)])
def test_beam_search_matches_transformers_on_tiny_model(tiny, early_stopping, length_penalty):
    import torch

    config, params, torch_model = tiny
    ids, mask = _prompts(config.vocab_size, seed=3)
    model = LlamaForCausalLM(config)
    # pad 1, not 0: transformers fills with `pad_token_id or eos[0]`, so a pad id of 0 becomes EOS there
    kwargs = dict(num_beams=3, max_new_tokens=10, pad_token_id=1, length_penalty=length_penalty, early_stopping=early_stopping)
    free, _ = beam_search(model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask), **kwargs)
    eos = (int(free[0, 2]), int(free[1, 4]))  # EOS ids the beams meet, so finishing is exercised
    ours, score = beam_search(
        model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask), eos_token_ids=eos, **kwargs
    )
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=10, num_beams=3,
            do_sample=False, eos_token_id=list(eos), pad_token_id=1, length_penalty=length_penalty,
            early_stopping=early_stopping, output_scores=True, return_dict_in_generate=True,
        )
    seq = ref.sequences[:, ids.shape[1]:].numpy()
    seq = np.pad(seq, ((0, 0), (0, 10 - seq.shape[1])), constant_values=1)
    np.testing.assert_array_equal(np.asarray(ours), seq)
    np.testing.assert_allclose(np.asarray(score), ref.sequences_scores.numpy(), atol=1e-4)
    assert (np.asarray(ours) != np.asarray(free)).any(), "the EOS ids changed nothing: the test lost its point"


def test_top_p_filter_matches_transformers():
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for top_p in (0.1, 0.5, 0.9):
        ours = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        ref = TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
        np.testing.assert_array_equal(ours[np.isfinite(ours)], ref[np.isfinite(ref)])


def test_sampling_is_seeded_and_top_p_zero_is_greedy(tiny):
    config, params, _ = tiny
    ids, mask = _prompts(config.vocab_size)
    model = LlamaForCausalLM(config)
    args = (model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    a = generate(*args, jax.random.key(1), max_new_tokens=8, temperature=1.0)
    b = generate(*args, jax.random.key(1), max_new_tokens=8, temperature=1.0)
    c = generate(*args, jax.random.key(2), max_new_tokens=8, temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    nucleus_of_one = generate(*args, jax.random.key(3), max_new_tokens=8, temperature=0.7, top_p=1e-6)
    np.testing.assert_array_equal(nucleus_of_one, generate(*args, max_new_tokens=8))


def test_smollm2_beam_search_matches_transformers(smollm2, smollm2_torch):
    import torch

    config, params, tokenizer, _ = smollm2
    tokenizer.padding_side = "left"
    enc = tokenizer(["The capital of France is", "Q: What is 2+2?\nA:"], return_tensors="np", padding=True)
    ours, _ = beam_search(
        LlamaForCausalLM(config), {"params": params}, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
        num_beams=3, max_new_tokens=12, eos_token_ids=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    with torch.no_grad():
        ref = smollm2_torch.generate(
            torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]), max_new_tokens=12,
            num_beams=3, do_sample=False, length_penalty=1.0, early_stopping=False, pad_token_id=config.pad_token_id,
        )[:, enc["input_ids"].shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(ours)[:, : ref.shape[1]], ref)


def test_smollm2_greedy_32_tokens_matches_transformers(smollm2, smollm2_torch):
    import torch

    config, params, tokenizer, _ = smollm2
    tokenizer.padding_side = "left"
    prompts = ["Once upon a time, in a small village by the sea,", "The three primary colors are"]
    enc = tokenizer(prompts, return_tensors="np", padding=True)
    ours = generate(
        LlamaForCausalLM(config), {"params": params}, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
        max_new_tokens=32, eos_token_ids=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    with torch.no_grad():
        ref = smollm2_torch.generate(
            torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]), max_new_tokens=32,
            do_sample=False, pad_token_id=config.pad_token_id,
        )[:, enc["input_ids"].shape[1]:].numpy()
    assert ref.shape == (2, 32)
    np.testing.assert_array_equal(np.asarray(ours), ref)
