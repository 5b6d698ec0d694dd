"""Decoding with the KV cache: one jitted prefill, then a `lax.while_loop` of single-token steps.

`generate` does greedy decoding (temperature 0) and temperature / top-p
sampling; `beam_search` reproduces transformers' vectorised beam search
(length penalty, `early_stopping` True / False / "never"). Prompts are
left-padded batches; positions follow transformers' `cumsum(mask) - 1`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from moe_lora_jax.model import KVCache, LlamaForCausalLM

NEG_INF = -1.0e9  # transformers' "impossible" score in beam search


def positions_from_mask(attention_mask_BxL: jax.Array) -> jax.Array:
    """Position ids for left-padded prompts, as transformers' `generate` computes them."""
    positions = jnp.cumsum(attention_mask_BxL.astype(jnp.int32), axis=-1) - 1
    return jnp.where(attention_mask_BxL.astype(bool), positions, 1)


def _prefill(model, variables, input_ids_BxL, attention_mask_BxL, max_new_tokens):
    B, L = input_ids_BxL.shape
    cache = KVCache.init(model.config, B, L + max_new_tokens)
    positions_BxL = positions_from_mask(attention_mask_BxL)
    logits, cache = model.apply(variables, input_ids_BxL, attention_mask_BxL, positions_BxL, cache=cache)
    return logits[:, -1], cache, positions_BxL[:, -1] + 1


def _decode_step(model, variables, token_B, position_B, cache):
    B = token_B.shape[0]
    logits, cache = model.apply(variables, token_B[:, None], jnp.ones((B, 1), bool), position_B[:, None], cache=cache)
    return logits[:, -1], cache


def top_p_filter(logits_BxV: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of tokens whose probability reaches `top_p` (transformers' TopPLogitsWarper)."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)  # ascending
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - top_p
    remove_sorted = remove_sorted.at[:, -1].set(False)  # always keep the most likely token
    threshold_B = jnp.max(jnp.where(remove_sorted, sorted_BxV, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV <= threshold_B, -jnp.inf, logits_BxV)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_ids", "pad_token_id", "temperature", "top_p")
)
def generate(
    model: LlamaForCausalLM,
    variables: dict[str, Any],
    input_ids_BxL: jax.Array,
    attention_mask_BxL: jax.Array,
    rng: jax.Array | None = None,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> jax.Array:
    """Continuations [B, max_new_tokens]: greedy when temperature is 0, else sampled (needs `rng`).

    After a row emits one of `eos_token_ids` it is filled with `pad_token_id`;
    the loop stops early when every row is done.
    """
    B = input_ids_BxL.shape[0]
    eos = jnp.asarray(tuple(eos_token_ids) or (-1,), jnp.int32)
    if rng is None:
        rng = jax.random.key(0)

    def pick(logits_BxV, done_B, key):
        if temperature == 0.0:
            token_B = jnp.argmax(logits_BxV, axis=-1)
        else:
            scaled = logits_BxV.astype(jnp.float32) / temperature
            token_B = jax.random.categorical(key, top_p_filter(scaled, top_p) if top_p < 1.0 else scaled)
        token_B = jnp.where(done_B, pad_token_id, token_B.astype(jnp.int32))
        return token_B, done_B | jnp.isin(token_B, eos)

    logits_BxV, cache, position_B = _prefill(model, variables, input_ids_BxL, attention_mask_BxL, max_new_tokens)
    token_B, done_B = pick(logits_BxV, jnp.zeros((B,), bool), jax.random.fold_in(rng, 0))
    out_BxN = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token_B)

    def cond(state):
        step, _, _, done_B, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        step, token_B, position_B, done_B, cache, out_BxN = state
        logits_BxV, cache = _decode_step(model, variables, token_B, position_B, cache)
        token_B, done_B = pick(logits_BxV, done_B, jax.random.fold_in(rng, step))
        return step + 1, token_B, position_B + 1, done_B, cache, out_BxN.at[:, step].set(token_B)

    state = (jnp.ones((), jnp.int32), token_B, position_B, done_B, cache, out_BxN)
    return jax.lax.while_loop(cond, body, state)[-1]


def greedy_generate(model, variables, input_ids_BxL, attention_mask_BxL, **kwargs) -> jax.Array:
    """`generate` with temperature 0."""
    return generate(model, variables, input_ids_BxL, attention_mask_BxL, **kwargs)


@functools.partial(
    jax.jit,
    static_argnames=("model", "num_beams", "max_new_tokens", "eos_token_ids", "pad_token_id", "length_penalty", "early_stopping"),
)
def beam_search(
    model: LlamaForCausalLM,
    variables: dict[str, Any],
    input_ids_BxL: jax.Array,
    attention_mask_BxL: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> tuple[jax.Array, jax.Array]:
    """Best beam per prompt: (tokens [B, max_new_tokens], score [B]), as transformers' `generate(num_beams=K)`.

    Each step takes the top 2K (more with several EOS ids) continuations over all
    K beams; those ending in EOS (or at the length limit) among the first K
    become finished hypotheses scored logp / generated_len**length_penalty, the
    best K unfinished ones keep running, and the KV cache rows follow their beams.
    """
    B, K, N = input_ids_BxL.shape[0], num_beams, max_new_tokens
    eos = jnp.asarray(tuple(eos_token_ids) or (-1,), jnp.int32)
    keep = max(2, 1 + len(eos_token_ids)) * K
    top_k_mask = jnp.arange(keep) < K

    logits_BxV, cache, position_B = _prefill(model, variables, input_ids_BxL, attention_mask_BxL, N)
    V = logits_BxV.shape[-1]
    expand = lambda x: jnp.repeat(x, K, axis=0)  # noqa: E731  [B, ...] -> [B*K, ...], beams of a prompt adjacent
    cache = jax.tree.map(lambda x: expand(x) if x.ndim else x, cache)
    gather_rows = jax.vmap(lambda x, i: x[i])  # per prompt, pick rows i of x

    state = dict(
        step=jnp.zeros((), jnp.int32),
        logits=expand(logits_BxV),
        position=expand(position_B),
        cache=cache,
        running=jnp.full((B, K, N), pad_token_id, jnp.int32),
        running_scores=jnp.zeros((B, K)).at[:, 1:].set(NEG_INF),
        finished=jnp.full((B, K, N), pad_token_id, jnp.int32),
        finished_scores=jnp.full((B, K), NEG_INF),
        is_finished=jnp.zeros((B, K), bool),
        improvable=jnp.ones((B, 1), bool),
        go=jnp.ones((), bool),
    )

    def body(s):
        t = s["step"]
        log_probs = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1).reshape(B, K, V)
        total_BxKV = (log_probs + s["running_scores"][:, :, None]).reshape(B, K * V)
        cand_scores, cand_idx = jax.lax.top_k(total_BxKV, keep)
        cand_beam, cand_token = cand_idx // V, (cand_idx % V).astype(jnp.int32)
        cand_seqs = gather_rows(s["running"], cand_beam).at[:, :, t].set(cand_token)
        hits = jnp.isin(cand_token, eos) | (t + 1 >= N)

        # the best K candidates that did not stop keep running
        run_scores, run_pick = jax.lax.top_k(cand_scores + hits * NEG_INF, K)
        running = gather_rows(cand_seqs, run_pick)
        parent_beam = gather_rows(cand_beam, run_pick)

        # stopped candidates among the first K may replace worse finished hypotheses
        just_finished = hits & top_k_mask[None, :]
        fin_scores = cand_scores / ((t + 1).astype(jnp.float32) ** length_penalty)
        full = jnp.all(s["is_finished"], axis=-1, keepdims=True) & (early_stopping is True)
        fin_scores = fin_scores + (full | ~s["improvable"] | ~just_finished) * NEG_INF
        merged_scores = jnp.concatenate([s["finished_scores"], fin_scores], axis=1)
        best_scores, best = jax.lax.top_k(merged_scores, K)
        finished = gather_rows(jnp.concatenate([s["finished"], cand_seqs], axis=1), best)
        is_finished = gather_rows(jnp.concatenate([s["is_finished"], just_finished], axis=1), best)

        # can a running beam still beat the worst finished one?
        generated = (t + 1).astype(jnp.float32)
        best_len = float(N) if (early_stopping == "never" and length_penalty > 0.0) else generated
        best_possible = run_scores[:, :1] / best_len**length_penalty
        worst_finished = jnp.where(is_finished, jnp.min(best_scores, axis=1, keepdims=True), NEG_INF)
        improvable = s["improvable"] & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        go = jnp.any(improvable) & ~(jnp.all(is_finished) & (early_stopping is True)) & ~jnp.all(hits)

        # advance the running beams by one token, the cache rows following their parents
        rows = (jnp.arange(B)[:, None] * K + parent_beam).reshape(B * K)
        cache = jax.tree.map(lambda x: x[rows] if x.ndim else x, s["cache"])
        tokens = jax.lax.dynamic_index_in_dim(running, t, axis=2, keepdims=False).reshape(B * K)
        logits, cache = _decode_step(model, variables, tokens, s["position"], cache)
        return dict(
            step=t + 1, logits=logits, position=s["position"] + 1, cache=cache, running=running,
            running_scores=run_scores, finished=finished, finished_scores=best_scores,
            is_finished=is_finished, improvable=improvable, go=go,
        )

    final = jax.lax.while_loop(lambda s: s["go"] & (s["step"] < N), body, state)
    return final["finished"][:, 0], final["finished_scores"][:, 0]
