"""Pure loss functions: the task loss and every balance term. Each returns (scalar, metrics dict).

Router statistics come from the model's `intermediates` collection
(`model.apply(..., mutable=["intermediates"])`): every routed linear sows
`router_logits` [B, L, E] and `router_gates` [B, L, E] (MixLoRA: one per FFN, under
`mlp`), MiLoRA sows `milora_logits` [B, M] per layer. `router_stats` flattens that tree
into a list of `RouterStat`; the balance terms are functions of that list and a token
mask, so any of them can be swapped by editing one function. Their weights come from the
train config's `objective` section (`moe_lora_jax.objective.Objective`). With
objective.contrastive_coef > 0 (adapter sow_expert_outputs) the expert banks also sow `expert_gram` [B, L, E, E] (inner products of the experts'
outputs), read by `expert_stats` for the contrastive expert loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moe_lora_jax.adapters.layers import topk_mask
from moe_lora_jax.adapters.registry import STATS_PREFIX, get_method
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.objective import resolve_objective

_EPS = 1e-10


@dataclass(frozen=True)
class RouterStat:
    """One router's output: layer index, owning module name ("q_proj", "mlp", ...), logits and gates [..., E]."""

    layer: int
    module: str
    logits: jax.Array
    gates: jax.Array | None


@dataclass(frozen=True)
class StackedRouterStat:
    """The routers of one module across layers, stacked: layers (N layer indices), logits [N, ..., E]
    and gates [N, ..., E] padded to the largest expert count E (logits -inf, gates 0 past each
    layer's own count `num_experts[n]`). Vectorised consumers (routing metrics) use it so that
    their cost does not grow with the number of routers."""

    layers: tuple[int, ...]
    module: str
    logits: jax.Array
    gates: jax.Array | None
    num_experts: tuple[int, ...]


def stack_router_stats(stats: list[RouterStat]) -> list[StackedRouterStat]:
    """Group `stats` by module (and router shape) across layers and stack each group (see StackedRouterStat)."""
    groups: dict[tuple, list[RouterStat]] = {}
    for s in stats:
        groups.setdefault((s.module, tuple(s.logits.shape[:-1]), s.gates is None), []).append(s)
    out = []
    for (module, _, no_gates), group in groups.items():
        E = max(s.logits.shape[-1] for s in group)

        def pad(x, value):
            e = x.shape[-1]
            return x if e == E else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, E - e)], constant_values=value)

        logits = jnp.stack([pad(s.logits.astype(jnp.float32), -jnp.inf) for s in group])
        gates = None if no_gates else jnp.stack([pad(s.gates, 0) for s in group])
        out.append(StackedRouterStat(tuple(s.layer for s in group), module, logits, gates,
                                     tuple(s.logits.shape[-1] for s in group)))
    return out


def _intermediates(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    return tree["intermediates"] if "intermediates" in tree else tree


def router_stats(intermediates: Mapping[str, Any], kind: str = "router") -> list[RouterStat]:
    """One kind of router statistics, in layer order. `kind` is a value of `adapters.registry.STATS_PREFIX`:
    router (token routers, the default) or milora (MiLoRA's per-prompt layer routers)."""
    flat = traverse_util.flatten_dict(dict(_intermediates(intermediates)))
    found: dict[tuple, dict[str, jax.Array]] = {}
    for path, value in flat.items():
        leaf = path[-1]
        if leaf not in (f"{kind}_logits", f"{kind}_gates"):
            continue
        arr = value[0] if isinstance(value, tuple) and len(value) == 1 else (
            jnp.concatenate(value, axis=0) if isinstance(value, tuple) else value
        )
        found.setdefault(path[:-1], {})[leaf.split("_")[-1]] = arr
    out = []
    for path, d in found.items():
        layer = next((int(m.group(1)) for p in path if (m := re.fullmatch(r"layers_(\d+)", str(p)))), -1)
        module = str(path[-1]) if path else ""
        out.append(RouterStat(layer, module, d["logits"], d.get("gates")))
    return sorted(out, key=lambda s: (s.layer, s.module))


def _token_weights(stat_logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mask [B, L] (or None) flattened to one weight per router row."""
    rows = stat_logits.reshape(-1, stat_logits.shape[-1]).shape[0]
    if mask is None:
        return jnp.ones((rows,), jnp.float32)
    return jnp.broadcast_to(mask.astype(jnp.float32), stat_logits.shape[:-1]).reshape(-1)


def _topk_onehot(probs: jax.Array, k: int) -> jax.Array:
    return topk_mask(probs, k, jnp.float32)


def _stat_k(top_k: Any, stat: RouterStat, num_experts: int) -> int:
    """Router `stat`'s top-k: `top_k` is one int for every router (capped by its expert count) or a
    function (stat, num_experts) -> k, for per-layer top-k (MoLA / AlphaLoRA allocations)."""
    return int(top_k(stat, num_experts)) if callable(top_k) else min(int(top_k), num_experts)


def _layer_top_k(adapter_config: Any) -> Any:
    """The top_k argument of the Switch terms: an int, or per router from the adapter's Allocation."""
    ac = adapter_config
    if ac.allocation is not None and get_method(ac.method).uses_allocation:
        return lambda s, E: ac.layer_top_k(s.module.removesuffix("_proj"), s.layer, E)
    return ac.top_k


# ------------------------------------------------------------------ task loss
def cross_entropy(logits_BxLxV: jax.Array, input_ids_BxL: jax.Array, loss_mask_BxL: jax.Array | None = None):
    """Causal-LM cross-entropy: position t predicts token t+1, counted where loss_mask[t+1] is set
    (loss_mask marks response tokens: prompt and padding are 0). Mean over counted tokens."""
    logits = logits_BxLxV[:, :-1].astype(jnp.float32)
    targets = input_ids_BxL[:, 1:]
    mask = jnp.ones(targets.shape, jnp.float32) if loss_mask_BxL is None else loss_mask_BxL[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    n = jnp.sum(mask)
    loss = jnp.sum(nll * mask) / jnp.maximum(n, 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / jnp.maximum(n, 1.0)
    return loss, {"ce": loss, "tokens": n, "accuracy": acc}


# ------------------------------------------------------------------ balance terms
def switch_aux_mola(stats: list[RouterStat], top_k: int | Callable[[RouterStat, int], int], mask_BxL: jax.Array | None = None):
    """Switch aux in MoLA's form: per layer (the layer's routers with the same expert count
    concatenated as tokens), E * sum_i f_i P_i with f_i the share of top-k assignments
    that go to expert i and P_i the mean router probability; summed over layers.

    Computed for all layers of a module at once on its stacked statistics (`stack_router_stats`;
    padded experts have probability 0 and are never selected), then summed into the groups."""
    groups: dict[tuple[int, int, int], int] = {}  # (layer, E, k) -> group index
    parts = []
    for g in stack_router_stats(stats):
        N, E_max = g.logits.shape[0], g.logits.shape[-1]
        k = np.array([_stat_k(top_k, RouterStat(layer, g.module, g.logits[0], None), E)
                      for layer, E in zip(g.layers, g.num_experts)])
        probs = jax.nn.softmax(g.logits.reshape(N, -1, E_max), -1)
        w = _token_weights(g.logits[0], mask_BxL)  # the same tokens for every layer
        _, chosen = jax.lax.top_k(probs, int(k.max()))
        keep = (np.arange(int(k.max()))[None, :] < k[:, None]).astype(np.float32)
        sel = jnp.sum(jax.nn.one_hot(chosen, E_max, dtype=jnp.float32) * keep[:, None, :, None], axis=2) * w[None, :, None]
        ids = np.array([groups.setdefault((layer, E, int(kk)), len(groups)) for layer, E, kk in zip(g.layers, g.num_experts, k)])
        parts.append((ids, jnp.sum(sel, 1), jnp.sum(probs * w[None, :, None], 1), jnp.sum(w)))
    if not groups:
        return jnp.zeros((), jnp.float32), {"switch_aux": jnp.zeros((), jnp.float32)}
    E_all = max(p[1].shape[-1] for p in parts)
    G = len(groups)
    sel_G = jnp.zeros((G, E_all), jnp.float32)
    prob_G = jnp.zeros((G, E_all), jnp.float32)
    w_G = jnp.zeros((G,), jnp.float32)
    for ids, sel_sum, prob_sum, w_sum in parts:
        pad = [(0, 0), (0, E_all - sel_sum.shape[-1])]
        sel_G = sel_G.at[ids].add(jnp.pad(sel_sum, pad))
        prob_G = prob_G.at[ids].add(jnp.pad(prob_sum, pad))
        w_G = w_G.at[ids].add(w_sum)
    f = sel_G / jnp.maximum(jnp.sum(sel_G, -1, keepdims=True), _EPS)
    p = prob_G / jnp.maximum(w_G, _EPS)[:, None]
    E_G = np.array([E for (_, E, _) in sorted(groups, key=groups.get)], np.float32)
    total = jnp.sum(E_G * jnp.sum(f * p, -1))
    return total, {"switch_aux": total}


def switch_aux_mixtral(stats: list[RouterStat], top_k: int | Callable[[RouterStat, int], int], mask_BxL: jax.Array | None = None):
    """Switch aux in Mixtral's (transformers') form: all layers' tokens pooled, f_i = top-k
    assignments to i per token (sums to k), P_i mean probability, E * sum_i f_i P_i.
    Routers with different expert counts are pooled per count and the terms summed."""
    groups: dict[int, list[RouterStat]] = {}
    for s in stats:
        groups.setdefault(s.logits.shape[-1], []).append(s)
    total = jnp.zeros((), jnp.float32)
    for E, group in sorted(groups.items()):
        probs_per = [jax.nn.softmax(s.logits.reshape(-1, E).astype(jnp.float32), -1) for s in group]
        probs = jnp.concatenate(probs_per)
        w = jnp.concatenate([_token_weights(s.logits, mask_BxL) for s in group])
        n = jnp.maximum(jnp.sum(w), _EPS)
        onehot = jnp.concatenate([_topk_onehot(p, _stat_k(top_k, s, E)) for p, s in zip(probs_per, group)])
        f = jnp.sum(onehot * w[:, None], 0) / n
        p = jnp.sum(probs * w[:, None], 0) / n
        total = total + E * jnp.sum(f * p)
    return total, {"switch_aux": total}


def cv_squared(x: jax.Array, ddof: int = 0) -> jax.Array:
    """Squared coefficient of variation var/mean^2 of a flat sample (0 for one element)."""
    x = x.reshape(-1).astype(jnp.float32)
    if x.shape[0] <= 1:
        return jnp.zeros((), jnp.float32)
    return jnp.var(x, ddof=ddof) / (jnp.mean(x) ** 2 + _EPS)


def importance_cv2(stats: list[RouterStat], mask_BxL: jax.Array | None = None):
    """Shazeer et al. (2017) importance loss: CV^2 of each router's gate sums over tokens, summed over routers."""
    total = jnp.zeros((), jnp.float32)
    for s in stats:
        E = s.logits.shape[-1]
        gates = s.gates if s.gates is not None else jax.nn.softmax(s.logits.astype(jnp.float32), -1)
        w = _token_weights(s.logits, mask_BxL)
        total = total + cv_squared(jnp.sum(gates.reshape(-1, E).astype(jnp.float32) * w[:, None], 0))
    return total, {"importance_cv2": total}


def router_z_loss(stats: list[RouterStat], mask_BxL: jax.Array | None = None):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 per router, summed over routers."""
    total = jnp.zeros((), jnp.float32)
    for s in stats:
        E = s.logits.shape[-1]
        z = jax.nn.logsumexp(s.logits.reshape(-1, E).astype(jnp.float32), axis=-1) ** 2
        w = _token_weights(s.logits, mask_BxL)
        total = total + jnp.sum(z * w) / jnp.maximum(jnp.sum(w), _EPS)
    return total, {"z_loss": total}


def loramoe_localized(stats: list[RouterStat], task_types_B: jax.Array, delta: float,
                      mask_BxL: jax.Array | None = None, form: str = "code"):
    """LoRAMoE's localized balancing constraint, summed over routers, of Z = I * Q, where Q [B, E] sums
    each example's gates over its tokens and I is 1+delta on the expert group matching the example's
    task type (type 1: first half of the experts, type 0: second half) and 1-delta on the other group.

    form="code": CV^2 = var(Z) / mean(Z)^2, as the authors' code (the default).
    form="paper": var(Z) / mean(Z), the paper's equation. Both use the unbiased variance, so the two
    differ by exactly the factor mean(Z) (about the tokens per example over E/2: large)."""
    if form not in ("code", "paper"):
        raise MoeLoraError(f"loramoe form {form!r}: use code (var/mean^2) or paper (var/mean)")
    total = jnp.zeros((), jnp.float32)
    t = task_types_B.reshape(-1, 1)
    for s in stats:
        B, E = s.logits.shape[0], s.logits.shape[-1]
        gates = s.gates if s.gates is not None else jax.nn.softmax(s.logits.astype(jnp.float32), -1)
        gates = gates.reshape(B, -1, E).astype(jnp.float32)
        if mask_BxL is not None:
            gates = gates * mask_BxL.reshape(B, -1, 1).astype(jnp.float32)
        q = jnp.sum(gates, axis=1)
        first = jnp.arange(E) < E // 2
        match = jnp.where(t == 1, first[None, :], ~first[None, :])
        importance = jnp.where(match, 1.0 + delta, 1.0 - delta)
        z = (importance * q).reshape(-1)
        if form == "paper":
            total = total + jnp.var(z, ddof=1) / (jnp.mean(z) + _EPS)
        else:
            total = total + cv_squared(z, ddof=1)
    return total, {"loramoe_blc": total}


def milora_prompt_balance(stats: list[RouterStat], mask_B: jax.Array | None = None):
    """MiLoRA's prompt-level balance: per layer M * sum_i f_i P_i with f_i the share of prompts
    whose top (argmax) module is i and P_i the mean probability over prompts; summed over layers.
    `mask_B` (optional) marks the prompts that count (an eval batch's empty filler rows do not)."""
    total = jnp.zeros((), jnp.float32)
    for s in stats:
        M = s.logits.shape[-1]
        probs = jax.nn.softmax(s.logits.reshape(-1, M).astype(jnp.float32), -1)
        w = _token_weights(s.logits, mask_B)[:, None]
        n = jnp.maximum(jnp.sum(w), _EPS)
        f = jnp.sum(jax.nn.one_hot(jnp.argmax(probs, -1), M, dtype=jnp.float32) * w, 0) / n
        total = total + M * jnp.sum(f * jnp.sum(probs * w, 0) / n)
    return total, {"milora_balance": total}


# ------------------------------------------------------------------ contrastive expert loss
@dataclass(frozen=True)
class ExpertStat:
    """One routed expert bank: layer, module, the Gram matrix of its experts' ungated outputs [..., E, E]
    (`expert_gram`, sown only with sow_expert_outputs) and its router's gates [..., E]."""

    layer: int
    module: str
    gram: jax.Array
    gates: jax.Array


def expert_stats(intermediates: Mapping[str, Any]) -> list[ExpertStat]:
    """Every module that sowed both `expert_gram` and `router_gates`, in layer order."""
    flat = traverse_util.flatten_dict(dict(_intermediates(intermediates)))
    found: dict[tuple, dict[str, jax.Array]] = {}
    for path, value in flat.items():
        if path[-1] in ("expert_gram", "router_gates"):
            arr = value[0] if isinstance(value, tuple) and len(value) == 1 else (
                jnp.concatenate(value, axis=0) if isinstance(value, tuple) else value
            )
            found.setdefault(path[:-1], {})[path[-1]] = arr
    out = []
    for path, d in found.items():
        if "expert_gram" not in d or "router_gates" not in d:
            continue
        layer = next((int(m.group(1)) for p in path if (m := re.fullmatch(r"layers_(\d+)", str(p)))), -1)
        out.append(ExpertStat(layer, str(path[-1]) if path else "", d["expert_gram"], d["router_gates"]))
    return sorted(out, key=lambda s: (s.layer, s.module))


def gram_of_outputs(outputs_TxExO: jax.Array) -> jax.Array:
    """<o_e, o_f> of explicit per-expert outputs [..., E, O] -> [..., E, E] (the model sows the same
    Gram matrix without materialising the outputs)."""
    o = outputs_TxExO.astype(jnp.float32)
    return jnp.einsum("...eo,...fo->...ef", o, o, precision=jax.lax.Precision.HIGHEST)


def cosine_from_gram(gram_TxExE: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine similarities of the experts' outputs, each output normalised as o / max(||o||, eps)
    (torch.nn.functional.normalize): an all-zero output (B = 0 at init) has similarity 0 to everything."""
    g = gram_TxExE.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.maximum(jnp.diagonal(g, axis1=-2, axis2=-1), eps * eps))  # [..., E]
    return g * inv[..., :, None] * inv[..., None, :]


def contrastive_expert_terms(gram_TxExE: jax.Array, gates_TxE: jax.Array, top_k: int | None, temperature: float,
                             weights_T: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
    """The contrastive expert loss of one expert bank: a weighted mean over tokens of

        L_t = 1/|P_t| sum_{(i, j) in P_t} -log( exp(c_ij / tau) / (exp(c_ij / tau) + sum_{u in U_t} exp(c_iu / tau)) )

    c_ij: cosine similarity of experts i and j's (ungated) outputs on token t (`cosine_from_gram`);
    S_t: the experts token t is routed to: the top `top_k` gates (dense routers: molora, loramoe), or
    with top_k=None the experts with a non-zero gate (sparse routers: mola, mixlora); U_t: the others;
    P_t: ordered pairs (i, j), i != j, both in S_t (anchor i, positive j), each against the anchor's
    negatives U_t. A token with fewer than two selected experts contributes 0; with no unselected
    expert every pair's term is exactly 0. An expert whose output on the token has norm <= eps
    (its B still zero) takes no part on that token, as positive or negative: the cosine's gradient
    there is 1/eps. Selection is not differentiated: the gradient reaches the experts, not the router.
    """
    E = gates_TxE.shape[-1]
    gram = gram_TxExE.reshape(-1, E, E)
    gates = gates_TxE.reshape(-1, E).astype(jnp.float32)
    w = jnp.ones((gates.shape[0],), jnp.float32) if weights_T is None else weights_T.reshape(-1).astype(jnp.float32)
    routed = (gates > 0) if top_k is None else (_topk_onehot(gates, min(top_k, E)) > 0)  # [T, E]
    alive = jnp.diagonal(gram, axis1=-2, axis2=-1) > eps * eps
    sel, unsel = routed & alive, ~routed & alive
    s = cosine_from_gram(gram, eps) / jnp.float32(temperature)  # [T, E, E]
    neg = sel[:, :, None] & unsel[:, None, :]
    pos = sel[:, :, None] & sel[:, None, :] & ~jnp.eye(E, dtype=bool)[None]
    # a large finite stand-in for -inf keeps gradients finite where an anchor has no negative
    neg_lse_TxE = jax.nn.logsumexp(jnp.where(neg, s, -1e30), axis=-1)
    pair = jnp.logaddexp(s, neg_lse_TxE[:, :, None]) - s  # -log(exp(s_ij) / (exp(s_ij) + sum_u exp(s_iu)))
    n_pos = jnp.sum(pos, axis=(1, 2)).astype(jnp.float32)
    per_token = jnp.sum(jnp.where(pos, pair, 0.0), axis=(1, 2)) / jnp.maximum(n_pos, 1.0)
    return jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), _EPS)


def contrastive_expert_loss(stats: list[ExpertStat], top_k: int | None, temperature: float,
                            mask_BxL: jax.Array | None = None):
    """`contrastive_expert_terms` of every expert bank (padding tokens masked), averaged over banks: an
    InfoNCE value is O(log E) per bank, and the mean keeps a coefficient's meaning across model depths
    (a sum over SmolLM2's 210 linears would be ~200x a 1-layer model's)."""
    total = jnp.zeros((), jnp.float32)
    for s in stats:
        w = _token_weights(s.gates, mask_BxL)
        total = total + contrastive_expert_terms(s.gram, s.gates, top_k, temperature, w)
    total = total / max(len(stats), 1)
    return total, {"contrastive": total}


# ------------------------------------------------------------------ everything
def total_loss(logits_BxLxV: jax.Array, batch: Mapping[str, Any], intermediates: Mapping[str, Any] | None,
               adapter_config: Any | None, objective: Any = None):
    """Task CE plus every balance term whose weight in `objective` is non-zero.

    objective: an `Objective` (moe_lora_jax.objective) or a mapping of its fields; None or a field left at
    None takes the method's default (resolved by `resolve_objective`, which refuses a weight the method's
    routers do not define). Switch, importance and z-loss read the token routers, or for MiLoRA its prompt
    routers (one decision per prompt: the terms are taken over the batch's prompts).

    batch: input_ids [B, L]; attention_mask [B, L] (optional; masks routers' padding tokens);
    loss_mask [B, L] (optional; defaults to attention_mask); task_types [B] (LoRAMoE).
    The contrastive expert loss (objective.contrastive_coef > 0) reads `expert_gram` from the intermediates.
    """
    input_ids = batch["input_ids"]
    attn = batch.get("attention_mask")
    loss_mask = batch.get("loss_mask", attn)
    loss, metrics = cross_entropy(logits_BxLxV, input_ids, loss_mask)
    ac = adapter_config
    spec = None if ac is None else get_method(ac.method)
    if spec is None or not spec.routed:
        metrics["loss"] = loss
        return loss, metrics
    inter = intermediates or {}
    stats = router_stats(inter, STATS_PREFIX[spec.router_stats])
    mask = attn
    if spec.router_stats == "prompt":
        # MiLoRA's routers decide once per prompt: the token-level terms are taken over prompts
        # (logits [B, M]), counting every row that holds a token (eval batches pad with empty rows).
        mask = None if attn is None else jnp.any(jnp.asarray(attn).astype(bool), axis=1)

    obj = resolve_objective(objective, ac.method)
    terms = []
    if obj.switch_coef and stats:
        fn = switch_aux_mixtral if obj.switch_form == "mixtral" else switch_aux_mola
        terms.append((obj.switch_coef, fn(stats, _layer_top_k(ac), mask)))
    if obj.importance_coef and stats:
        terms.append((obj.importance_coef, importance_cv2(stats, mask)))
    if obj.z_loss_coef and stats:
        terms.append((obj.z_loss_coef, router_z_loss(stats, mask)))
    if "loramoe_coef" in spec.balance_terms and obj.loramoe_coef:
        if batch.get("task_types") is None:
            raise MoeLoraError(
                "LoRAMoE's localized balancing constraint needs a per-example task type: add 'task_types' "
                "(1 = world knowledge, 0 = other) to the batch, or set objective.loramoe_coef=0"
            )
        terms.append((obj.loramoe_coef, loramoe_localized(stats, jnp.asarray(batch["task_types"]), obj.loramoe_delta, attn,
                                                          form=obj.loramoe_form)))
    if obj.contrastive_coef:
        ex = expert_stats(inter)
        if not ex:
            raise MoeLoraError(
                "objective.contrastive_coef > 0 but the model sowed no expert_gram: build the model with "
                "adapter_config.replace(sow_expert_outputs=True) and apply it with mutable=['intermediates']"
            )
        sel_k = None if spec.sparse_router else ac.top_k  # sparse routers: their own selection
        terms.append((obj.contrastive_coef, contrastive_expert_loss(ex, sel_k, obj.contrastive_temperature, attn)))
    if "milora_coef" in spec.balance_terms and obj.milora_coef:
        terms.append((obj.milora_coef, milora_prompt_balance(stats, mask)))
    for coef, (value, m) in terms:
        loss = loss + coef * value
        metrics.update(m)
    metrics["loss"] = loss
    return loss, metrics
