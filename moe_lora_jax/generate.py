"""Decoding with the KV cache: one jitted prefill, then a `lax.while_loop` of single-token steps."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from moe_lora_jax.model import KVCache, LlamaForCausalLM


def positions_from_mask(attention_mask_BxL: jax.Array) -> jax.Array:
    """Position ids for left-padded prompts, as transformers' `generate` computes them."""
    positions = jnp.cumsum(attention_mask_BxL.astype(jnp.int32), axis=-1) - 1
    return jnp.where(attention_mask_BxL.astype(bool), positions, 1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_ids", "pad_token_id"))
def greedy_generate(
    model: LlamaForCausalLM,
    variables: dict[str, Any],
    input_ids_BxL: jax.Array,
    attention_mask_BxL: jax.Array,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
) -> jax.Array:
    """Greedy continuation [B, max_new_tokens] of left-padded prompts; after EOS a row gets `pad_token_id`."""
    B, L = input_ids_BxL.shape
    cache = KVCache.init(model.config, B, L + max_new_tokens)
    positions_BxL = positions_from_mask(attention_mask_BxL)
    logits, cache = model.apply(variables, input_ids_BxL, attention_mask_BxL, positions_BxL, cache=cache)
    eos = jnp.asarray(tuple(eos_token_ids) or (-1,), jnp.int32)

    def pick(logits_BxV, done_B):
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        token_B = jnp.where(done_B, pad_token_id, token_B)
        return token_B, done_B | jnp.isin(token_B, eos)

    token_B, done_B = pick(logits[:, -1], jnp.zeros((B,), bool))
    out_BxN = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token_B)
    position_B = positions_BxL[:, -1] + 1

    def cond(state):
        step, _, _, done_B, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        step, token_B, position_B, done_B, cache, out_BxN = state
        logits, cache = model.apply(
            variables, token_B[:, None], jnp.ones((B, 1), bool), position_B[:, None], cache=cache
        )
        token_B, done_B = pick(logits[:, -1], done_B)
        return step + 1, token_B, position_B + 1, done_B, cache, out_BxN.at[:, step].set(token_B)

    state = (jnp.ones((), jnp.int32), token_B, position_B, done_B, cache, out_BxN)
    return jax.lax.while_loop(cond, body, state)[-1]
