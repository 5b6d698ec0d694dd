"""Loss functions against their PyTorch references (transformers' Mixtral, MoLA, LoRAMoE) and by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lora_jax import MoeLoraError
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.objective import Objective
from moe_lora_jax.losses import (
    RouterStat,
    cross_entropy,
    importance_cv2,
    loramoe_localized,
    milora_prompt_balance,
    router_z_loss,
    switch_aux_mixtral,
    switch_aux_mola,
    total_loss,
)

B, L = 3, 9


def _mask():
    m = np.ones((B, L), np.int64)
    m[0, :3] = 0
    m[2, 7:] = 0
    return m


def _logits(n_layers, E, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=(B, L, E))).astype(np.float32) for _ in range(n_layers)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_mixtral_matches_transformers(masked, top_k):
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    E = 6
    layers = _logits(4, E, seed=top_k)
    mask = _mask() if masked else None
    ref = load_balancing_loss_func(
        tuple(torch.tensor(x.reshape(-1, E)) for x in layers), E, top_k, None if mask is None else torch.tensor(mask)
    )
    stats = [RouterStat(i, "mlp", jnp.asarray(x), None) for i, x in enumerate(layers)]
    ours, metrics = switch_aux_mixtral(stats, top_k, None if mask is None else jnp.asarray(mask))
    assert abs(float(ours) - float(ref)) <= 1e-6
    assert float(metrics["switch_aux"]) == float(ours)


def mola_switch_reference(per_layer_logits, top_k):
    """MoLA's load_balancing_loss_func: per layer, the layer's routers concatenated as tokens."""
    import torch

    total = torch.tensor(0.0)
    for gate in per_layer_logits:
        weights = torch.softmax(gate, dim=-1)
        _, selected = torch.topk(weights, top_k[0], dim=-1)
        counts = torch.nn.functional.one_hot(selected.reshape(-1), gate.shape[-1]).sum(dim=-2)
        total += torch.sum(counts / counts.sum() * weights.mean(dim=0)) * gate.shape[-1]
    return total


def test_switch_mola_matches_reference():
    import torch

    E, modules = 5, ("q_proj", "v_proj", "k_proj")
    stats, per_layer = [], []
    for layer in range(3):
        xs = _logits(len(modules), E, seed=10 + layer)
        stats += [RouterStat(layer, m, jnp.asarray(x), None) for m, x in zip(modules, xs)]
        per_layer.append(torch.cat([torch.tensor(x.reshape(-1, E)) for x in xs], 0))
    ours, _ = switch_aux_mola(stats, 2)
    assert abs(float(ours) - float(mola_switch_reference(per_layer, [2] * 3))) <= 1e-5


def test_switch_is_minimal_for_uniform_routing_and_masks_padding():
    E = 4
    flat = np.zeros((B, L, E), np.float32)
    stats = [RouterStat(0, "mlp", jnp.asarray(flat), None)]
    # uniform probabilities: f sums to k, P = 1/E -> E * k / E = k (ties pick the first k experts)
    assert float(switch_aux_mixtral(stats, 2)[0]) == pytest.approx(2.0, abs=1e-6)
    assert float(switch_aux_mola(stats, 2)[0]) == pytest.approx(1.0, abs=1e-6)
    # garbage at padded positions changes nothing when masked
    mask = _mask()
    noisy = np.where(mask[..., None] == 0, 50.0 * np.random.default_rng(0).normal(size=flat.shape), _logits(1, E)[0])
    clean = np.where(mask[..., None] == 0, 0.0, noisy)
    a = switch_aux_mixtral([RouterStat(0, "mlp", jnp.asarray(noisy, jnp.float32), None)], 2, jnp.asarray(mask))[0]
    b = switch_aux_mixtral([RouterStat(0, "mlp", jnp.asarray(clean, jnp.float32), None)], 2, jnp.asarray(mask))[0]
    assert float(a) == pytest.approx(float(b), abs=1e-6)


def test_cross_entropy_matches_torch_with_prompt_and_padding_masked():
    import torch

    V = 11
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, L, V)).astype(np.float32)
    ids = rng.integers(0, V, size=(B, L))
    loss_mask = _mask().copy()
    loss_mask[:, :5] = 0  # prompt
    labels = np.where(loss_mask[:, 1:] == 1, ids[:, 1:], -100)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, V), torch.tensor(labels).reshape(-1), ignore_index=-100
    )
    ours, metrics = cross_entropy(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(loss_mask))
    assert abs(float(ours) - float(ref)) <= 1e-6
    assert float(metrics["tokens"]) == (labels != -100).sum()


def test_z_loss_and_importance_by_hand():
    E = 4
    x = _logits(2, E, seed=3)
    mask = _mask()
    stats = [RouterStat(i, "q_proj", jnp.asarray(v), None) for i, v in enumerate(x)]
    z_ref, imp_ref = 0.0, 0.0
    w = mask.reshape(-1).astype(np.float64)
    for v in x:
        v = v.reshape(-1, E).astype(np.float64)
        lse = np.log(np.exp(v).sum(-1))
        z_ref += (lse**2 * w).sum() / w.sum()
        p = np.exp(v) / np.exp(v).sum(-1, keepdims=True)
        imp = (p * w[:, None]).sum(0)
        imp_ref += imp.var() / imp.mean() ** 2
    assert float(router_z_loss(stats, jnp.asarray(mask))[0]) == pytest.approx(z_ref, rel=1e-5)
    assert float(importance_cv2(stats, jnp.asarray(mask))[0]) == pytest.approx(imp_ref, rel=1e-5)


def loramoe_reference(route_weight, task_types, delta):
    """LoRAMoE's blcls (Linear.forward) for one linear: cv_squared of the constrained importance."""
    import torch

    E = route_weight.shape[-1]
    t = task_types.view(-1, 1)
    importance = torch.where(
        torch.concat(((t == 1).repeat(1, E // 2), (t == 0).repeat(1, E // 2)), dim=-1), 1.0 + delta, 1.0 - delta
    )
    x = (route_weight.sum(dim=1) * importance).flatten()
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


def test_loramoe_localized_constraint_matches_reference():
    import torch

    E, delta = 6, 0.2
    x = _logits(2, E, seed=4)
    types = np.array([1, 0, 1])
    stats = [RouterStat(0, m, jnp.asarray(v), jax.nn.softmax(jnp.asarray(v), -1)) for m, v in zip(("gate_proj", "up_proj"), x)]
    ref = sum(float(loramoe_reference(torch.softmax(torch.tensor(v), -1), torch.tensor(types), delta)) for v in x)
    ours, _ = loramoe_localized(stats, jnp.asarray(types), delta)
    assert float(ours) == pytest.approx(ref, rel=1e-5)


def test_milora_prompt_balance_by_hand():
    M = 7
    rng = np.random.default_rng(5)
    x = [rng.normal(size=(5, M)).astype(np.float32) for _ in range(2)]
    ref = 0.0
    for v in x:
        p = np.exp(v) / np.exp(v).sum(-1, keepdims=True)
        f = np.bincount(p.argmax(-1), minlength=M) / len(p)
        ref += M * (f * p.mean(0)).sum()
    ours, _ = milora_prompt_balance([RouterStat(i, "milora_router", jnp.asarray(v), None) for i, v in enumerate(x)])
    assert float(ours) == pytest.approx(ref, rel=1e-5)


def _intermediates(n_layers, E, modules=("q_proj", "k_proj")):
    tree = {}
    for i, x in enumerate(_logits(n_layers * len(modules), E, seed=9)):
        layer, m = divmod(i, len(modules))
        tree.setdefault(f"layers_{layer}", {}).setdefault("self_attn", {})[modules[m]] = {
            "router_logits": (jnp.asarray(x),), "router_gates": (jax.nn.softmax(jnp.asarray(x), -1),)
        }
    return {"intermediates": tree}


def test_total_loss_adds_configured_terms():
    V, E = 13, 4
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(B, L, V)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, V, size=(B, L)))
    mask = jnp.asarray(_mask())
    batch = {"input_ids": ids, "attention_mask": mask}
    inter = _intermediates(2, E)
    ac = AdapterConfig(method="mola", num_experts=E)
    loss, metrics = total_loss(logits, batch, inter, ac, Objective(z_loss_coef=1e-2, importance_coef=0.5))
    ce = cross_entropy(logits, ids, mask)[0]
    from moe_lora_jax.losses import router_stats

    stats = router_stats(inter)
    expected = ce + 1e-3 * switch_aux_mola(stats, 2, mask)[0] + 1e-2 * router_z_loss(stats, mask)[0] \
        + 0.5 * importance_cv2(stats, mask)[0]
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert {"ce", "switch_aux", "z_loss", "importance_cv2", "loss"} <= set(metrics)
    # mixlora defaults to the Mixtral form
    loss_m, _ = total_loss(logits, batch, inter, AdapterConfig(method="mixlora", num_experts=E))
    assert float(loss_m) == pytest.approx(float(ce + 1e-3 * switch_aux_mixtral(stats, 2, mask)[0]), rel=1e-6)


def test_loramoe_without_task_labels_is_one_clear_error():
    V = 13
    logits = jnp.zeros((B, L, V))
    batch = {"input_ids": jnp.zeros((B, L), jnp.int32)}
    with pytest.raises(MoeLoraError, match="task type"):
        total_loss(logits, batch, _intermediates(1, 4), AdapterConfig(method="loramoe"))
    loss, metrics = total_loss(logits, dict(batch, task_types=jnp.array([1, 0, 1])), _intermediates(1, 4),
                               AdapterConfig(method="loramoe"))
    assert "loramoe_blc" in metrics and np.isfinite(float(loss))
