"""The analytic FLOP count of one train step, term by term: what the compiled count is checked against.

A matmul [M, K] @ [K, N] is 2*M*K*N FLOPs. With T = batch x length tokens and a frozen base:

- base forward: 2 * N_matmul * T, where N_matmul counts the kernels of the seven linears in every
  layer plus lm_head (the embedding lookup is a gather, not a matmul);
- base backward: 2 * N_matmul * T for the activation gradients, and no weight gradient (the base is
  frozen). Layer 0's input-side linears (q, k, v, gate, up) need no input gradient (the embeddings
  are frozen); an unrolled step may drop those products (the count is then up to ~3% high for a
  small model, 5/(7 * num_layers) of the base backward at most), a scanned one cannot (one body
  serves every layer), so they are counted;
- attention: scores q.k and the weighted sum p.v are each 2*B*L*L*(heads*head_dim) per layer in the
  forward (the full L x L square: the causal mask is applied, not skipped), twice that in the backward
  (d probs, d v, d q, d k);
- adapters (trainable): forward 2*T*(D_in*E*r + E*r*D_out) per adapted linear with E experts computed
  densely (LoRA: E = 1) plus the router 2*T*D_in*E; backward twice the forward (input and weight
  gradients);
- remat recomputation per policy (model/remat.py): full recomputes every layer's forward except its
  last product (down_proj and its adapter: the layer's output is not needed for its own backward),
  dots_no_batch the attention products, dots and none nothing (elementwise work only).

Not counted: elementwise work (norms, RoPE, SiLU, softmax, the optimizer), which the compiler's count
includes; for billion-parameter models it is well under 1% of the total. Adapter terms are exact for
lora, molora, loramoe and mola (real per-layer expert counts; a scanned step that pads layers to the
largest count computes more), estimates for mov, mixlora and milora (`exact_adapters` is False).
"""

from __future__ import annotations

from typing import Any

from moe_lora_jax import layout
from moe_lora_jax.model.remat import normalize_remat


def linear_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each of the seven adapted linears of one layer."""
    return layout.all_dims(cfg)


def base_matmul_params(cfg: Any) -> int:
    """Parameters that take part in matmuls: the seven linears of every layer plus the output head."""
    per_layer = sum(i * o for i, o in linear_shapes(cfg).values())
    return cfg.num_hidden_layers * per_layer + cfg.hidden_size * cfg.vocab_size


def _adapter_forward(cfg: Any, ac: Any, layer: int, tokens: int) -> tuple[float, float]:
    """(forward FLOPs of this layer's adapters, the part of it on down_proj, the layer's last product)."""
    if ac is None:
        return 0.0, 0.0
    shapes = linear_shapes(cfg)
    total = last = 0.0
    r = ac.rank
    for target in ac.targets:
        if target not in shapes:
            continue
        d_in, d_out = shapes[target]
        if ac.method == "lora":
            flops = 2.0 * tokens * r * (d_in + d_out)
        else:
            E = ac.expert_counts(target, cfg.num_hidden_layers)[layer]
            flops = 2.0 * tokens * (E * r * (d_in + d_out) + d_in * E)
        total += flops
        last += flops if target == "down" else 0.0
    return total, last


def analytic_flops(cfg: Any, ac: Any, batch: int, length: int, remat: Any = "none") -> dict[str, Any]:
    """FLOPs of one train step over batch x length tokens (whole step, all chips), term by term."""
    policy = normalize_remat(remat)
    T = batch * length
    L, q_width = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
    shapes = linear_shapes(cfg)
    layer_params = sum(i * o for i, o in shapes.values())
    head = 2.0 * T * cfg.hidden_size * cfg.vocab_size
    base_fwd = 2.0 * T * layer_params * L + head
    base_bwd = 2.0 * T * layer_params * L + head
    attn_fwd_layer = 4.0 * batch * length * length * q_width
    attn_fwd, attn_bwd = attn_fwd_layer * L, 2 * attn_fwd_layer * L
    adapter_fwd = adapter_last = 0.0
    for layer in range(L):
        fwd, last = _adapter_forward(cfg, ac, layer, T)
        adapter_fwd, adapter_last = adapter_fwd + fwd, adapter_last + last
    adapter_bwd = 2 * adapter_fwd
    if policy == "full":
        down = shapes["down"][0] * shapes["down"][1]
        remat_flops = 2.0 * T * (layer_params - down) * L + attn_fwd + adapter_fwd - adapter_last
    elif policy == "dots_no_batch":
        remat_flops = attn_fwd
    else:
        remat_flops = 0.0
    terms = {"base_forward": base_fwd, "base_backward": base_bwd, "attention_forward": attn_fwd,
             "attention_backward": attn_bwd, "adapter_forward": adapter_fwd, "adapter_backward": adapter_bwd,
             "remat_recompute": remat_flops}
    total = sum(terms.values())
    exact = ac is None or ac.method in ("lora", "molora", "loramoe", "mola")
    return {"total": total, "per_token": total / T, "tokens": T, "terms": terms, "remat": policy,
            "base_matmul_params": base_matmul_params(cfg), "exact_adapters": exact}
