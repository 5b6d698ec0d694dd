"""Pure functions from router statistics to per-task sums, and from sums to loads.

The model sows every token router's `router_logits` [B, L, E] (MoV per head: [K, B, L, E]) into
`intermediates` (read with `moe_lora_jax.losses.router_stats`) and MiLoRA's per-prompt decision as
`intermediates["milora_routing"]` [B, N, M]. These functions turn one batch of them into sums per
task, which add up over batches; the finalisers turn the totals into loads (fractions).

Shapes: B examples, L tokens, E experts, T tasks, N layers, M MiLoRA modules, K MoV heads.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax.adapters.layers import topk_mask
from moe_lora_jax.losses import router_stats


def router_top_k(adapter_config: Any, layer: int, module: str, num_experts: int) -> int | None:
    """Experts a token is routed to by this router: its top-k for the sparse routers (MoLA / AlphaLoRA:
    the layer's own k; MixLoRA: top_k), None for the dense softmax routers (MoLoRA, MoV, LoRAMoE)."""
    ac = adapter_config
    if ac.method == "mola":
        return ac.layer_top_k(module.removesuffix("_proj"), layer, num_experts)
    if ac.method == "mixlora":
        return min(ac.top_k, num_experts)
    return None


def selection_weights(logits_xE: jax.Array, top_k: int | None) -> jax.Array:
    """Each token's share of its routing per expert, summing to 1 over E: 1/k on each of the k selected
    experts (top-k routers: a fraction of the selections), else the softmax probability (dense routers)."""
    probs = jax.nn.softmax(jnp.asarray(logits_xE, jnp.float32), axis=-1)
    if top_k is None:
        return probs
    return topk_mask(probs, top_k) / jnp.float32(top_k)


def task_sums(weights_BxLxE: jax.Array, mask_BxL: jax.Array, task_id_B: jax.Array,
              num_tasks: int) -> tuple[jax.Array, jax.Array]:
    """(sums [T, E], tokens [T]): the weights of task t's counted tokens summed per expert, and their number."""
    m_BxL = jnp.asarray(mask_BxL, jnp.float32)
    per_example_BxE = jnp.einsum("ble,bl->be", jnp.asarray(weights_BxLxE, jnp.float32), m_BxL)
    onehot_BxT = jax.nn.one_hot(jnp.asarray(task_id_B), num_tasks, dtype=jnp.float32)
    return onehot_BxT.T @ per_example_BxE, onehot_BxT.T @ jnp.sum(m_BxL, axis=1)


def router_key(layer: int, module: str) -> str:
    return f"{layer}/{module}"


def parse_router_key(key: str) -> tuple[int, str]:
    layer, module = key.split("/", 1)
    return int(layer), module


def routing_task_sums(intermediates: Mapping[str, Any], adapter_config: Any, mask_BxL: jax.Array,
                      task_id_B: jax.Array, num_tasks: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """`task_sums` of every token router, keyed "layer/module" ("3/q_proj", MixLoRA "3/mlp", MoV's FFN "3/ffn_ia3").
    MoV's per-head routers ([K, B, L, E]) are averaged over the K heads, which share the tokens."""
    out = {}
    for s in router_stats(intermediates, "router"):
        E = s.logits.shape[-1]
        w = selection_weights(s.logits, router_top_k(adapter_config, s.layer, s.module, E))
        if w.ndim == 4:
            w = jnp.mean(w, axis=0)
        out[router_key(s.layer, s.module)] = task_sums(w, mask_BxL, task_id_B, num_tasks)
    return out


def milora_task_counts(routing_BxNxM: jax.Array, row_valid_B: jax.Array, task_id_B: jax.Array,
                       num_tasks: int) -> tuple[jax.Array, jax.Array]:
    """(counts [T, N, M], prompts [T]): how many of task t's prompts select module m in layer n (a non-zero
    gate), and how many prompts task t has. Rows with row_valid 0 (an eval batch's filler) do not count."""
    selected_BxNxM = (jnp.asarray(routing_BxNxM) > 0).astype(jnp.float32)
    v_B = jnp.asarray(row_valid_B, jnp.float32)
    onehot_BxT = jax.nn.one_hot(jnp.asarray(task_id_B), num_tasks, dtype=jnp.float32) * v_B[:, None]
    return jnp.einsum("bt,bnm->tnm", onehot_BxT, selected_BxNxM), jnp.sum(onehot_BxT, axis=0)


# ------------------------------------------------------------------ finalisers (numpy)
def loads(sums_TxE: Any, tokens_T: Any) -> np.ndarray:
    """Per-task load [T, E] (rows sum to 1); NaN rows for tasks without counted tokens."""
    sums, tokens = np.asarray(sums_TxE, np.float64), np.asarray(tokens_T, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tokens[:, None] > 0, sums / tokens[:, None], np.nan)


def task_separation(load_TxE: Any) -> float | None:
    """Mean total-variation distance 0.5 * |p_s - p_t|_1 over pairs of tasks with a load: 0 when every
    task uses the experts alike, 1 when no two tasks share an expert. None with fewer than two tasks."""
    p = np.asarray(load_TxE, np.float64)
    p = p[~np.isnan(p).any(axis=1)]
    if len(p) < 2:
        return None
    i, j = np.triu_indices(len(p), k=1)
    return float(np.mean(0.5 * np.abs(p[i] - p[j]).sum(axis=1)))


def group_mass(load_TxE: Any) -> tuple[np.ndarray, np.ndarray]:
    """LoRAMoE's two groups: (mass on the first E/2 experts, the world-knowledge group that task type 1
    is steered to by `losses.loramoe_localized`; mass on the other E/2), each [T]."""
    p = np.asarray(load_TxE, np.float64)
    half = p.shape[-1] // 2
    return p[..., :half].sum(axis=-1), p[..., half:].sum(axis=-1)


def delta_gram(a_ExDxR: Any, b_ExRxO: Any, scale: float) -> np.ndarray:
    """Frobenius inner products <dW_e, dW_f> of the experts' dW_e = scale * A_e @ B_e, [E, E] in float64,
    as sum((A_e^T A_f) * (B_e B_f^T)): r x r products, never the [D, O] matrices."""
    a, b = np.asarray(a_ExDxR, np.float64), np.asarray(b_ExRxO, np.float64)
    ata_ExExRxR = np.einsum("edr,fds->efrs", a, a)
    bbt_ExExRxR = np.einsum("ero,fso->efrs", b, b)
    return np.einsum("efrs,efrs->ef", ata_ExExRxR, bbt_ExExRxR) * (scale * scale)


def pairwise_distances(gram_ExE: Any) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distance 1 - <W_e, W_f> / (|W_e| |W_f|), normalised Frobenius |W_e - W_f| / sqrt(|W_e|^2 + |W_f|^2)),
    each [E, E]: 0 for identical experts, 1 for orthogonal ones (cosine up to 2, Frobenius up to sqrt 2 for
    opposite ones). NaN where an expert's dW is zero (B still at its zero init): no direction to compare."""
    g = np.asarray(gram_ExE, np.float64)
    sq = np.diag(g)
    norm = np.sqrt(np.maximum(sq, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = g / (norm[:, None] * norm[None, :])
        frob2 = (sq[:, None] + sq[None, :] - 2.0 * g) / (sq[:, None] + sq[None, :])
    dead = (sq <= 0.0)[:, None] | (sq <= 0.0)[None, :]
    cos_dist = np.where(dead, np.nan, 1.0 - np.clip(cos, -1.0, 1.0))
    frob = np.where(dead, np.nan, np.sqrt(np.clip(frob2, 0.0, 2.0)))
    np.fill_diagonal(cos_dist, np.where(sq > 0, 0.0, np.nan))
    np.fill_diagonal(frob, np.where(sq > 0, 0.0, np.nan))
    return cos_dist, frob


def mean_offdiagonal(d_ExE: Any) -> float | None:
    """Mean over the pairs e < f that are defined (None when no pair is)."""
    d = np.asarray(d_ExE, np.float64)
    i, j = np.triu_indices(d.shape[0], k=1)
    vals = d[i, j]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else None
