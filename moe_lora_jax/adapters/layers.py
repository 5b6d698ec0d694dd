"""Adapter computations that the LLaMA modules call from their hooks.

Each function takes the Flax module that owns the adapter (`mdl`), declares its
weights in the `adapter` collection of that module's scope (so they sit next to
the frozen kernel they adapt: `layers_3/self_attn/q_proj/lora_A`), and returns
the adapted activation. Router statistics are sown into `intermediates`.

Shapes: T tokens (any leading dims), D in-features, O out-features, E experts,
r rank, M LoRA modules per layer (MiLoRA).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moe_lora_jax import layout
from moe_lora_jax.adapters.config import AdapterConfig

ADAPTER = "adapter"

# Safe Pade activation R(x) = sum_{j<=6} a_j x^j / (1 + |sum_{1<=k<=5} b_k x^k|), least-squares fitted to
# GELU (erf form) on [-4, 4]: max error 1.7e-3 there (see tests/adapters/test_adapters_methods.py, which refits it).
RATIONAL_GELU_NUM = (
    -9.6439498221082963e-04,
    5.1628140990027360e-01,
    4.3151592886207696e-01,
    1.1346631504516899e-01,
    -1.1130867536423016e-04,
    -4.5743340675147336e-03,
    -5.4676347223301964e-04,
)
RATIONAL_GELU_DEN = (
    1.5059364221509419e-01,
    4.1021678791530673e-02,
    8.9476501821794271e-02,
    -2.7840190793426603e-02,
    1.4281903885862606e-03,
)


class AdapterContext(struct.PyTreeNode):
    """Per-call adapter inputs threaded through the decoder.

    deterministic: no dropout / router jitter (static).
    pool_mask_BxL: tokens MiLoRA pools over (the prompt, padding excluded).
    routing_BxNxM: MiLoRA gates for every layer, reused instead of running the routers.
    layer_gates_BxM: this layer's MiLoRA gates (set by the decoder layer).
    expert_valid, expert_top_k: under scanned layers with per-layer expert counts (model/scan.py),
        target -> this layer's real expert count and top-k (int32 scalars): experts past the count
        are padding, their router logits are masked to -inf.
    """

    deterministic: bool = struct.field(pytree_node=False, default=True)
    pool_mask_BxL: Any = None
    routing_BxNxM: Any = None
    layer_gates_BxM: Any = None
    expert_valid: Any = None
    expert_top_k: Any = None


# ------------------------------------------------------------------ initialisers
def fan_in_uniform(key, shape, dtype=jnp.float32):
    """torch's kaiming_uniform_(a=sqrt(5)) for a weight whose second-to-last dim is fan-in: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def router_init(cfg: AdapterConfig):
    if cfg.resolved_router_init == "kaiming":
        return fan_in_uniform
    return nn.initializers.normal(stddev=cfg.router_init_range)


LORA_NORMAL_STD = 0.02  # for-ai/parameter-efficient-moe src/molora.py: lora_init_A = normal(stddev=2e-2)


def lora_a_init(cfg: AdapterConfig):
    """LoRA A's initialiser: kaiming-uniform (PEFT, MoLA, LoRAMoE, MixLoRA) or normal(0.02) (MoLoRA's reference)."""
    if cfg.resolved_lora_init == "normal":
        return nn.initializers.normal(stddev=LORA_NORMAL_STD)
    return fan_in_uniform


def adapter_var(mdl: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> jax.Array:
    """A float32 weight in the `adapter` collection of `mdl`, with logical axis names."""
    boxed = nn.with_logical_partitioning(init, axes)
    return mdl.variable(ADAPTER, name, lambda: boxed(mdl.make_rng("params"), shape, jnp.float32)).value


# ------------------------------------------------------------------ shared pieces
def dropout(mdl: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(mdl.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def jitter(mdl: nn.Module, x: jax.Array, amount: float, deterministic: bool) -> jax.Array:
    if deterministic or amount == 0.0:
        return x
    noise = jax.random.uniform(mdl.make_rng("dropout"), x.shape, x.dtype, 1.0 - amount, 1.0 + amount)
    return x * noise


def renormalizes(renormalize: bool | str, k: int) -> bool:
    """Whether top-k gates are divided by their sum: True renormalises when k > 1, "always" also at k = 1."""
    return renormalize == "always" or (renormalize is True and k > 1)


def topk_mask(probs: jax.Array, k: int, dtype: Any = None) -> jax.Array:
    """1 at the k largest entries of the last axis, else 0 (the selection of routers and of the Switch term)."""
    _, idx = jax.lax.top_k(probs, k)
    return jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=dtype or probs.dtype), axis=-2)


def topk_gates(probs: jax.Array, k: int, renormalize: bool | str = True) -> jax.Array:
    """Keep the k largest probabilities (exactly k non-zero), renormalised to sum to 1 when k > 1.

    At k = 1 the gate stays the router probability, as in Switch: renormalised it would be exactly
    1 and the router would get no gradient from the task loss (only from balance terms);
    renormalize="always" does that anyway (the references' code).
    """
    gates = probs * topk_mask(probs, k)
    if renormalizes(renormalize, k):
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates


def topk_gates_masked(probs: jax.Array, k_max: int, k: jax.Array, renormalize: bool | str = True) -> jax.Array:
    """`topk_gates` with a traced k <= k_max (scanned layers): the ranks past k are dropped, and
    the renormalisation follows `renormalizes` for that k."""
    _, idx = jax.lax.top_k(probs, k_max)
    keep = (jnp.arange(k_max) < k).astype(probs.dtype)
    mask = jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype) * keep[:, None], axis=-2)
    gates = probs * mask
    renorm = renormalize == "always" or (renormalize is True and k_max > 1)
    if not renorm:
        return gates
    renorm = jnp.asarray(True) if renormalize == "always" else k > 1
    return jnp.where(renorm, gates / jnp.sum(gates, axis=-1, keepdims=True), gates)


def route(mdl: nn.Module, x: jax.Array, num_experts: int, cfg: AdapterConfig, ctx: "AdapterContext",
          top_k: int | None, name: str = "router", valid: jax.Array | None = None,
          dyn_top_k: jax.Array | None = None) -> jax.Array:
    """Token router: float32 logits x @ W [D, E], softmax, optional top-k. Sows logits and gates; returns gates.

    `valid` (scanned, padded layers): experts >= valid are padding, their logits are -inf;
    `dyn_top_k`: this layer's top-k (<= the static `top_k`)."""
    w = adapter_var(mdl, name, router_init(cfg), (x.shape[-1], num_experts), (None, "expert"))
    x32 = jitter(mdl, x.astype(jnp.float32), cfg.router_jitter, ctx.deterministic)
    logits = jnp.dot(x32, w, precision=jax.lax.Precision.HIGHEST)
    if valid is not None:
        logits = jnp.where(jnp.arange(num_experts) < valid, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if top_k is not None and dyn_top_k is not None:
        gates = topk_gates_masked(probs, top_k, dyn_top_k, cfg.renormalize)
    else:
        gates = probs if top_k is None else topk_gates(probs, top_k, cfg.renormalize)
    mdl.sow("intermediates", "router_logits", logits)
    mdl.sow("intermediates", "router_gates", gates)
    return gates


# ------------------------------------------------------------------ linear-level adapters
def lora_delta(mdl: nn.Module, x: jax.Array, out_features: int, axes: tuple[str, str], cfg: AdapterConfig,
               ctx: AdapterContext, dtype: Any) -> jax.Array:
    """scale * dropout(x) @ A @ B with A [D, r] (`lora_a_init`: kaiming-uniform unless lora_init says normal) and B [r, O] (zeros)."""
    a = adapter_var(mdl, "lora_A", lora_a_init(cfg), (x.shape[-1], cfg.rank), (axes[0], "rank"))
    b = adapter_var(mdl, "lora_B", nn.initializers.zeros, (cfg.rank, out_features), ("rank", axes[1]))
    xd = dropout(mdl, x, cfg.dropout, ctx.deterministic)
    h = jnp.dot(xd, a.astype(dtype))
    return jnp.dot(h, b.astype(dtype)) * jnp.asarray(cfg.scale, dtype)


def expert_bank_delta(mdl: nn.Module, x: jax.Array, out_features: int, axes: tuple[str, str], num_experts: int,
                      cfg: AdapterConfig, ctx: AdapterContext, dtype: Any, top_k: int | None) -> jax.Array:
    """E LoRA experts in the dense concatenated form: (dropout(x) @ [A_1..A_E]) * gates @ [B_1; ..; B_E].

    A [E, D, r], B [E, r, O]; the first product is one GEMM of width E*r, each r-block is
    scaled by its gate (zero where the expert is not selected), the second contracts E*r.
    """
    E, r = num_experts, cfg.rank
    a = adapter_var(mdl, "lora_A", lora_a_init(cfg), (E, x.shape[-1], r), ("expert", axes[0], "rank"))
    b = adapter_var(mdl, "lora_B", nn.initializers.zeros, (E, r, out_features), ("expert", "rank", axes[1]))
    target = getattr(mdl, "target", None)
    valid = None if ctx.expert_valid is None else ctx.expert_valid.get(target)
    dyn_top_k = None if ctx.expert_top_k is None or top_k is None else ctx.expert_top_k.get(target)
    gates = route(mdl, x, E, cfg, ctx, top_k, valid=valid, dyn_top_k=dyn_top_k)
    xd = dropout(mdl, x, cfg.dropout, ctx.deterministic)
    h = jnp.einsum("...d,edr->...er", xd, a.astype(dtype))
    if cfg.sow_expert_outputs:  # static: with coefficient 0 nothing below is traced
        mdl.sow("intermediates", "expert_gram", lora_expert_gram(h, b, cfg.scale))
    h = h * gates[..., None].astype(dtype)
    return jnp.einsum("...er,ero->...o", h, b.astype(dtype)) * jnp.asarray(cfg.scale, dtype)


def lora_expert_gram(h_TxExR: jax.Array, b_ExRxO: jax.Array, scale: float) -> jax.Array:
    """Inner products <o_e, o_f> of the E experts' ungated outputs o_e = scale * h_e @ B_e, [..., E, E] in float32.

    Computed as h_e (B_e B_f^T) h_f with the r x r blocks B_e B_f^T, so the per-expert outputs
    [..., E, O] are never materialised: per token E^2 r^2 products instead of E r O.
    """
    hi = jax.lax.Precision.HIGHEST
    b32 = b_ExRxO.astype(jnp.float32)
    bb_ExExRxR = jnp.einsum("ero,fso->efrs", b32, b32, precision=hi)
    h32 = h_TxExR.astype(jnp.float32)
    hg = jnp.einsum("...er,efrs->...efs", h32, bb_ExExRxR, precision=hi)
    return jnp.einsum("...efs,...fs->...ef", hg, h32, precision=hi) * jnp.float32(scale * scale)


def ia3_mixture(mdl: nn.Module, y: jax.Array, axis: str, num_experts: int, cfg: AdapterConfig,
                ctx: AdapterContext) -> jax.Array:
    """MoV: y * (softmax(router(y)) @ V) with E IA3 vectors V [E, O] initialised to ones."""
    v = adapter_var(mdl, "ia3", nn.initializers.ones, (num_experts, y.shape[-1]), ("expert", axis))
    gates = route(mdl, y, num_experts, cfg, ctx, None)
    scale = jnp.dot(gates, v, precision=jax.lax.Precision.HIGHEST)
    return y * scale.astype(y.dtype)


def ia3_head_mixture(mdl: nn.Module, y: jax.Array, num_heads: int, num_experts: int, cfg: AdapterConfig,
                     ctx: AdapterContext) -> jax.Array:
    """MoV per attention head, as the reference's MoVAttention: y [..., K*H] is read as K heads of H;
    one router W [H, E] (shared by the heads) routes each head's slice, and head k's scale is
    softmax(y_k @ W) @ V_k with vectors V [K, E, H] initialised to ones."""
    K, E = num_heads, num_experts
    H = y.shape[-1] // K
    y_KxH = y.reshape(*y.shape[:-1], K, H)
    v = adapter_var(mdl, "ia3", nn.initializers.ones, (K, E, H), (None, "expert", None))
    w = adapter_var(mdl, "router", router_init(cfg), (H, E), (None, "expert"))
    x32 = jitter(mdl, y_KxH.astype(jnp.float32), cfg.router_jitter, ctx.deterministic)
    logits = jnp.einsum("...kh,he->...ke", x32, w, precision=jax.lax.Precision.HIGHEST)
    gates = jax.nn.softmax(logits, axis=-1)
    # heads first, so the statistics read as [K, B, L, E]: K routers' worth of token rows, and a [B, L]
    # token mask broadcasts against their leading dims
    mdl.sow("intermediates", "router_logits", jnp.moveaxis(logits, -2, 0))
    mdl.sow("intermediates", "router_gates", jnp.moveaxis(gates, -2, 0))
    scale = jnp.einsum("...ke,keh->...kh", gates, v, precision=jax.lax.Precision.HIGHEST)
    return (y_KxH * scale.astype(y.dtype)).reshape(y.shape)


# ------------------------------------------------------------------ MixLoRA FFN
class FFNKernel(nn.Module):
    """Declares a frozen FFN kernel [in, out] exactly as TargetLinear does (same name, init, axes) and,
    when `num_experts` > 0, that linear's per-expert LoRA A [E, in, r], B [E, r, out]; returns them."""

    in_features: int
    features: int
    kernel_axes: tuple[str, str]
    param_dtype: Any = jnp.float32
    num_experts: int = 0
    rank: int = 0

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), self.kernel_axes)
        kernel = self.param("kernel", init, (self.in_features, self.features), self.param_dtype)
        if not self.num_experts:
            return kernel, None, None
        E, r = self.num_experts, self.rank
        a = adapter_var(self, "lora_A", fan_in_uniform, (E, self.in_features, r), ("expert", self.kernel_axes[0], "rank"))
        b = adapter_var(self, "lora_B", nn.initializers.zeros, (E, r, self.features), ("expert", "rank", self.kernel_axes[1]))
        return kernel, a, b


def mixlora_ffn(mdl: nn.Module, x_BxLxD: jax.Array, config: Any, cfg: AdapterConfig, ctx: AdapterContext,
                dtype: Any, param_dtype: Any) -> jax.Array:
    """MixLoRA FFN: a top-k router picks k of E experts per token; expert e is the frozen SwiGLU FFN with
    its own LoRA on gate/up/down. Each token runs only its k experts' FFN (activation and down
    projection on [T, k] rows); the frozen gate/up products are shared by all experts and computed
    once, and each expert's LoRA uses the dense concatenated form masked to the chosen expert,
    which is exact (every other expert's block contributes exact zeros)."""
    B, L, D = x_BxLxD.shape
    F, E, k, r = config.intermediate_size, cfg.num_experts, cfg.top_k, cfg.rank
    targets = cfg.targets
    spec = {m: (*layout.dims(m, config), layout.linear(m).axes) for m in layout.FFN}
    w, lora = {}, {}
    for m, (din, dout, axes) in spec.items():
        kern = FFNKernel(din, dout, axes, param_dtype, num_experts=E if m in targets else 0, rank=r, name=f"{m}_proj")
        w[m], a, b = kern()
        if a is not None:
            lora[m] = (a.reshape(E, din, r).transpose(1, 0, 2).reshape(din, E * r).astype(dtype),
                       b.reshape(E * r, dout).astype(dtype))

    x = x_BxLxD.reshape(B * L, D).astype(dtype)
    router_w = adapter_var(mdl, "router", router_init(cfg), (D, E), ("embed", "expert"))
    x32 = jitter(mdl, x.astype(jnp.float32), cfg.router_jitter, ctx.deterministic)
    logits = jnp.dot(x32, router_w, precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k)  # [T, k]
    # top-1 keeps the probability (Switch; MoE-PEFT's mixlora-switch): a renormalised gate of 1 has no router gradient
    weights = top_p / jnp.sum(top_p, axis=-1, keepdims=True) if renormalizes(cfg.renormalize, k) else top_p
    mdl.sow("intermediates", "router_logits", logits.reshape(B, L, E))
    mdl.sow("intermediates", "router_gates",
            jnp.sum(jax.nn.one_hot(top_i, E, dtype=weights.dtype) * weights[..., None], axis=-2).reshape(B, L, E))
    onehot_TxKxE = jax.nn.one_hot(top_i, E, dtype=dtype)
    scale = jnp.asarray(cfg.scale, dtype)

    def expert_lora(m: str, inp_TxD: jax.Array, per_slot: bool) -> jax.Array:
        a_cat, b_cat = lora[m]
        h = jnp.dot(dropout(mdl, inp_TxD, cfg.dropout, ctx.deterministic), a_cat)  # [T(,k), E*r]
        if per_slot:
            h = h.reshape(*h.shape[:-1], E, r) * onehot_TxKxE[..., None]
        else:
            h = h.reshape(h.shape[0], 1, E, r) * onehot_TxKxE[..., None]
        return jnp.dot(h.reshape(*h.shape[:2], E * r), b_cat) * scale  # [T, k, out]

    if cfg.sow_expert_outputs:  # static: the contrastive loss needs every expert's output on every token
        gates_TxE = jnp.sum(jax.nn.one_hot(top_i, E, dtype=jnp.float32) * weights[..., None], axis=-2)
        out_TxExD, base_TxD = _mixlora_every_expert(mdl, x, w, lora, E, r, cfg, ctx, dtype)
        contrib_TxExD = out_TxExD.astype(jnp.float32) - base_TxD.astype(jnp.float32)[:, None, :]
        gram = jnp.einsum("ted,tfd->tef", contrib_TxExD, contrib_TxExD, precision=jax.lax.Precision.HIGHEST)
        mdl.sow("intermediates", "expert_gram", gram.reshape(B, L, E, E))
        out = jnp.einsum("te,ted->td", gates_TxE.astype(dtype), out_TxExD)
        return out.reshape(B, L, D)

    gate = jnp.dot(x, w["gate"].astype(dtype))[:, None, :]  # shared frozen products [T, 1, F]
    up = jnp.dot(x, w["up"].astype(dtype))[:, None, :]
    if "gate" in lora:
        gate = gate + expert_lora("gate", x, per_slot=False)
    if "up" in lora:
        up = up + expert_lora("up", x, per_slot=False)
    gate = jnp.broadcast_to(gate, (B * L, k, F))
    up = jnp.broadcast_to(up, (B * L, k, F))
    act = nn.silu(gate) * up  # [T, k, F]: only the k chosen experts per token
    out = jnp.dot(act, w["down"].astype(dtype))
    if "down" in lora:
        out = out + expert_lora("down", act, per_slot=True)
    out = jnp.sum(out * weights[..., None].astype(dtype), axis=1)
    return out.reshape(B, L, D)


def _mixlora_every_expert(mdl: nn.Module, x_TxD: jax.Array, w: dict, lora: dict, E: int, r: int, cfg: AdapterConfig,
                          ctx: AdapterContext, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Every MixLoRA expert's FFN output on every token, [T, E, D], and the frozen FFN's [T, D].

    Used only when the contrastive expert loss is on: it costs E/k times the top-k FFN.
    """
    T = x_TxD.shape[0]
    scale = jnp.asarray(cfg.scale, dtype)

    def lora_all(m: str, inp: jax.Array) -> jax.Array:  # inp [T, din] (shared) or [T, E, din] (per expert)
        a_cat, b_cat = lora[m]
        din, dout = a_cat.shape[0], b_cat.shape[1]
        xd = dropout(mdl, inp, cfg.dropout, ctx.deterministic)
        a_DxExR = a_cat.reshape(din, E, r)
        h = jnp.einsum("td,der->ter", xd, a_DxExR) if inp.ndim == 2 else jnp.einsum("ted,der->ter", xd, a_DxExR)
        return jnp.einsum("ter,ero->teo", h, b_cat.reshape(E, r, dout)) * scale

    gate = jnp.dot(x_TxD, w["gate"].astype(dtype))
    up = jnp.dot(x_TxD, w["up"].astype(dtype))
    base = jnp.dot(nn.silu(gate) * up, w["down"].astype(dtype))
    gate_TxExF = gate[:, None, :] + (lora_all("gate", x_TxD) if "gate" in lora else 0)
    up_TxExF = up[:, None, :] + (lora_all("up", x_TxD) if "up" in lora else 0)
    gate_TxExF = jnp.broadcast_to(gate_TxExF, (T, E, gate.shape[-1]))
    act = nn.silu(gate_TxExF) * up_TxExF
    out = jnp.dot(act, w["down"].astype(dtype))
    if "down" in lora:
        out = out + lora_all("down", act)
    return out, base


# ------------------------------------------------------------------ MiLoRA router
def rational(x: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
    """Safe Pade activation: P(x) / (1 + |Q(x)|), P of degree len(num)-1, Q of degree len(den) without constant."""
    p = jnp.zeros_like(x) + num[-1]
    for c in num[-2::-1]:
        p = p * x + c
    q = jnp.zeros_like(x) + den[-1]
    for c in den[-2::-1]:
        q = q * x + c
    q = q * x
    return p / (1.0 + jnp.abs(q))


def pool(h_BxLxD: jax.Array, mask_BxL: jax.Array, how: str, query_D: jax.Array | None = None) -> jax.Array:
    """Pool the hidden states of the masked tokens (the prompt) into [B, D]."""
    mask = mask_BxL.astype(bool)
    any_tok = jnp.any(mask, axis=1, keepdims=True)
    mask = jnp.where(any_tok, mask, True)  # a row with no prompt token pools over everything
    h = h_BxLxD.astype(jnp.float32)
    if how == "attention":
        scores = jnp.einsum("bld,d->bl", h, query_D, precision=jax.lax.Precision.HIGHEST)
        scores = jnp.where(mask, scores, -1e30)
        return jnp.einsum("bl,bld->bd", jax.nn.softmax(scores, axis=1), h, precision=jax.lax.Precision.HIGHEST)
    if how == "mean":
        m = mask.astype(jnp.float32)
        return jnp.sum(h * m[..., None], axis=1) / jnp.sum(m, axis=1, keepdims=True)
    if how == "max":
        return jnp.max(jnp.where(mask[..., None], h, -jnp.inf), axis=1)
    # last: the last masked position of every row
    L = mask.shape[1]
    last = L - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]


def router_activation(mdl: nn.Module, activation: str):
    """MiLoRA's router activation as a function: the learnable rational (its coefficients, declared
    here, start at the GELU fit), or a fixed GELU (erf form) or ReLU without weights (the paper's
    ablations MiLoRA-3..5)."""
    if activation == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if activation == "relu":
        return jax.nn.relu
    if activation != "rational":
        raise ValueError(f"unknown MiLoRA router activation {activation!r}")
    num = adapter_var(mdl, "rational_num", lambda k, s, d: jnp.asarray(RATIONAL_GELU_NUM, d), (7,), (None,))
    den = adapter_var(mdl, "rational_den", lambda k, s, d: jnp.asarray(RATIONAL_GELU_DEN, d), (5,), (None,))
    return lambda x: rational(x, num, den)


def milora_route(mdl: nn.Module, h_BxLxD: jax.Array, mask_BxL: jax.Array, num_modules: int,
                 cfg: AdapterConfig, activation: str = "rational") -> jax.Array:
    """MiLoRA's prompt-aware router: pool the prompt, W1 -> activation (rational by default) -> W2, softmax,
    top-k. Returns gates [B, M]."""
    D, H = h_BxLxD.shape[-1], cfg.milora_router_dim
    query = adapter_var(mdl, "pool_query", nn.initializers.normal(0.02), (D,), ("embed",)) \
        if cfg.milora_pooling == "attention" else None
    pooled = pool(h_BxLxD, mask_BxL, cfg.milora_pooling, query)
    w1 = adapter_var(mdl, "w1", fan_in_uniform, (D, H), ("embed", None))
    b1 = adapter_var(mdl, "b1", nn.initializers.zeros, (H,), (None,))
    act = router_activation(mdl, activation)
    w2 = adapter_var(mdl, "w2", router_init(cfg), (H, num_modules), (None, "expert"))
    hi = jax.lax.Precision.HIGHEST
    z = act(jnp.dot(pooled, w1, precision=hi) + b1)
    logits = jnp.dot(z, w2, precision=hi)
    gates = topk_gates(jax.nn.softmax(logits, axis=-1), cfg.top_k, cfg.renormalize)
    mdl.sow("intermediates", "milora_logits", logits)
    mdl.sow("intermediates", "milora_gates", gates)
    return gates
