"""MoLA's top-k LoRA experts in the dense concatenated form against a PyTorch transcription of
MoLA's expert loop (one-hot expert mask, per-expert gather, `index_add_`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.losses import router_stats
from moe_lora_jax.model import TargetLinear


def mola_linear_torch(x, W, A, B, R, top_k, scale, divide_at_top1=True):
    """MoLA's Linear_MoE.forward (eval, no dropout), with weights stored [in, out].

    MoLA divides the top-k weights by their sum at every k; at k = 1 that makes the gate exactly 1
    (the library's renormalize="always"). divide_at_top1=False keeps the probability at k = 1
    (Switch), the library's default (docs/methods.md, Routing)."""
    import torch
    import torch.nn.functional as F

    b, l, d = x.shape
    result = x @ W
    flat = x.reshape(-1, d)
    logits = flat @ R
    weights = F.softmax(logits, dim=1, dtype=torch.float)
    weights, selected = torch.topk(weights, top_k, dim=-1)
    if top_k > 1 or divide_at_top1:
        weights /= weights.sum(dim=-1, keepdim=True)
    mask = F.one_hot(selected, num_classes=A.shape[0]).permute(2, 1, 0)
    final = torch.zeros((b * l, W.shape[1]), dtype=x.dtype)
    for e in range(A.shape[0]):
        idx, top_x = torch.where(mask[e])
        if top_x.shape[0] == 0:
            continue
        out = (flat[top_x] @ A[e]) @ B[e] * scale
        final.index_add_(0, top_x, out * weights[top_x, idx, None])
    return result + final.reshape(b, l, -1), logits


@pytest.mark.parametrize("experts, top_k", [(5, 2), (3, 1), (8, 2)])
def test_mola_dense_form_matches_expert_loop(experts, top_k):
    import torch

    rng = np.random.default_rng(experts)
    D, O, r = 24, 20, 4
    x = rng.normal(size=(3, 7, D)).astype(np.float32)
    W = (0.2 * rng.normal(size=(D, O))).astype(np.float32)
    A = (0.3 * rng.normal(size=(experts, D, r))).astype(np.float32)
    B = (0.3 * rng.normal(size=(experts, r, O))).astype(np.float32)
    R = rng.normal(size=(D, experts)).astype(np.float32)
    ac = AdapterConfig(method="mola", rank=r, alpha=8.0, top_k=top_k, target_modules=("q",))
    lin = TargetLinear(O, "q", ("embed", "heads"), layer=0, adapter_config=ac, num_experts=experts)
    variables = {"params": {"kernel": W}, "adapter": {"lora_A": A, "lora_B": B, "router": R}}
    ours, state = lin.apply(variables, jnp.asarray(x), mutable=["intermediates"])
    ref, ref_logits = mola_linear_torch(*(torch.tensor(a) for a in (x, W, A, B, R)), top_k, ac.scale, False)
    assert np.abs(np.asarray(ours) - ref.numpy()).max() <= 1e-5
    # MoLA's code as written: renormalised also at top-1
    literal = TargetLinear(O, "q", ("embed", "heads"), layer=0, adapter_config=ac.replace(renormalize="always"),
                           num_experts=experts).apply(variables, jnp.asarray(x))
    ref_literal, _ = mola_linear_torch(*(torch.tensor(a) for a in (x, W, A, B, R)), top_k, ac.scale)
    assert np.abs(np.asarray(literal) - ref_literal.numpy()).max() <= 1e-5
    assert (np.abs(ref_literal.numpy() - ref.numpy()).max() > 1e-3) == (top_k == 1)
    (stat,) = router_stats(state)
    assert np.abs(np.asarray(stat.logits).reshape(-1, experts) - ref_logits.numpy()).max() <= 1e-5
