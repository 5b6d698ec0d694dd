"""Flax Linen LLaMA decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache.

Parameter tree (mirrors Hugging Face names so conversion is a rename):

    embed_tokens/embedding              [vocab, embed]
    layers_{i}/input_layernorm/scale    [embed]
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel
    layers_{i}/post_attention_layernorm/scale
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/scale
    lm_head/kernel                      [embed, vocab]   (absent when embeddings are tied)

Kernels are [in, out] (the transpose of torch's Linear.weight). Every parameter
carries logical axis names (see `moe_lora_jax.parallel.rules`). The seven adapter
targets go through `TargetLinear`, the one place adapters attach.

With an `AdapterConfig` (`LlamaForCausalLM(config, adapter_config)`) the same
modules create adapter and router weights in the separate `adapter` collection,
next to the kernels they adapt (`layers_{i}/self_attn/q_proj/lora_A`, ...); the
`params` tree is unchanged. Router statistics are sown into `intermediates`.
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
from moe_lora_jax.adapters.layers import AdapterContext
from moe_lora_jax.adapters.registry import LAYER_ROUTING_KEY, get_method
from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.model.remat import remat_policy
from moe_lora_jax.model.scan import run_scanned_layers, scan_plan
from moe_lora_jax.model.rope import apply_rope, inverse_frequencies, rope_cos_sin

_init = nn.initializers.normal(stddev=0.02)


class KVCache(struct.PyTreeNode):
    """Decoding cache: per-layer keys/values [B, S, K, H], valid-slot mask [B, S], next slot.

    `routing` [B, num_layers, M] holds MiLoRA's per-prompt routing decision: None until the
    prefill computes it, then reused by every decode step (the routers never run on decode steps).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask_BxS: jax.Array
    index: jax.Array  # int32 scalar: slot where the next token is written
    routing: Any = None

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int) -> "KVCache":
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_hidden_layers))
        return cls(k=zeros, v=zeros, mask_BxS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class TargetLinear(nn.Module):
    """Bias-free linear layer for one of the seven adapter targets (q, k, v, o, gate, up, down).

    This is the hook where adapters attach: `__call__` computes the frozen base
    product and hands (x, y) to `adapt`, which returns y unchanged for the
    plain base model. Adapter weights live in the `adapter` collection.
    """

    features: int
    target: str
    kernel_axes: tuple[str, str]
    layer: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    adapter_config: AdapterConfig | None = None
    num_experts: int = 0  # experts of this linear in this layer (expert methods)
    num_heads: int = 0  # MoV per-head routing on k/v: the output is read as this many heads

    @nn.compact
    def __call__(self, x: jax.Array, ctx: AdapterContext | None = None) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_init, self.kernel_axes), (x.shape[-1], self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        return self.adapt(x, jnp.dot(x, kernel.astype(self.dtype)), ctx)

    def adapt(self, x: jax.Array, y: jax.Array, ctx: AdapterContext | None = None) -> jax.Array:
        ac = self.adapter_config
        if ac is None or self.target not in ac.targets:
            return y
        ctx = AdapterContext() if ctx is None else ctx
        return get_method(ac.method).adapt_linear(self, x, y, ctx)  # the method's hook (adapters/<method>.py)


def _linear_kwargs(cfg: LlamaConfig, ac: AdapterConfig | None, layer: int, target: str) -> dict[str, Any]:
    """Keyword arguments of the TargetLinear for `target` in `layer` (dtype policy and adapter wiring)."""
    kw: dict[str, Any] = dict(layer=layer, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if ac is not None:
        kw["adapter_config"] = ac
        hook = get_method(ac.method).linear_kwargs  # num_experts, num_heads: what the method's linears need
        if hook is not None and target in ac.targets:
            kw.update(hook(ac, cfg, layer, target))
    return kw


def grouped_query_attention(q_BxLxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                            mask_Bx1xLxS: jax.Array) -> jax.Array:
    """Softmax attention with K key/value heads shared by groups of N/K query heads (HF's repeat_kv order).

    The same numbers as `jax.nn.dot_product_attention` (float32 logits and softmax, masked
    logits at -0.7 * float32 max), but laid out as [B, K, G*L, H] so each score and value
    product is one plain batched GEMM: on XLA's CPU backend this made a SmolLM2 layer's
    attention backward 1.7x faster (44 -> 27 ms at 4x256); on GPU/TPU it is the XLA path anyway.
    """
    B, L, N, H = q_BxLxNxH.shape
    K = k_BxSxKxH.shape[2]
    G = N // K
    q_BxKxGLxH = jnp.transpose(q_BxLxNxH.reshape(B, L, K, G, H), (0, 2, 3, 1, 4)).reshape(B, K, G * L, H)
    k_BxKxSxH = jnp.transpose(k_BxSxKxH, (0, 2, 1, 3))
    v_BxKxSxH = jnp.transpose(v_BxSxKxH, (0, 2, 1, 3))
    logits = jnp.einsum("bkqh,bksh->bkqs", q_BxKxGLxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / np.sqrt(H))  # the scale jax.nn.dot_product_attention uses
    S = logits.shape[-1]
    logits_BxKxGxLxS = jnp.where(mask_Bx1xLxS[:, :, None], logits.reshape(B, K, G, L, S),
                                 -0.7 * float(jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxKxSxH.dtype).reshape(B, K, G * L, S)
    out_BxKxGLxH = jnp.einsum("bkqs,bksh->bkqh", probs, v_BxKxSxH)
    return jnp.transpose(out_BxKxGLxH.reshape(B, K, G, L, H), (0, 3, 1, 2, 4)).reshape(B, L, N, H)


def _from_table(target: str, config: LlamaConfig) -> dict[str, Any]:
    """TargetLinear's out features, target, kernel axes and module name, from the table of linears."""
    lin = layout.linear(target)
    return dict(features=lin.dims(config)[1], target=lin.name, kernel_axes=lin.axes, name=lin.proj)


class Attention(nn.Module):
    config: LlamaConfig
    layer: int
    adapter_config: AdapterConfig | None = None

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        mask_Bx1xLxS: jax.Array,
        kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        ctx: AdapterContext | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg, ac = self.config, self.adapter_config
        B, L, _ = x_BxLxD.shape
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = lambda t: _linear_kwargs(cfg, ac, self.layer, t)  # noqa: E731
        q = TargetLinear(**_from_table("q", cfg), **kw("q"))(x_BxLxD, ctx).reshape(B, L, N, H)
        k = TargetLinear(**_from_table("k", cfg), **kw("k"))(x_BxLxD, ctx).reshape(B, L, K, H)
        v = TargetLinear(**_from_table("v", cfg), **kw("v"))(x_BxLxD, ctx).reshape(B, L, K, H)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        new_kv = None
        if kv is not None:  # write this chunk into the cache at `index`, attend over all slots
            k_cache, v_cache, index = kv
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            k, v, new_kv = k_cache, v_cache, (k_cache, v_cache)
        out_BxLxNxH = grouped_query_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask_Bx1xLxS)
        out = TargetLinear(**_from_table("o", cfg), **kw("o"))
        return out(out_BxLxNxH.reshape(B, L, N * H), ctx), new_kv


class MLP(nn.Module):
    """SwiGLU FFN. Adapter hooks at the FFN level (the method's `MethodSpec`): `ffn` replaces it
    (MixLoRA's mixture of FFN experts); `ffn_activation` rescales the activation silu(gate) * up
    that feeds down_proj (MoV)."""

    config: LlamaConfig
    layer: int
    adapter_config: AdapterConfig | None = None

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, ctx: AdapterContext | None = None) -> jax.Array:
        cfg, ac = self.config, self.adapter_config
        spec = None if ac is None else get_method(ac.method)
        if spec is not None and spec.ffn is not None:
            return spec.ffn(self, x_BxLxD, AdapterContext() if ctx is None else ctx)
        kw = lambda t: _linear_kwargs(cfg, ac, self.layer, t)  # noqa: E731
        gate = TargetLinear(**_from_table("gate", cfg), **kw("gate"))(x_BxLxD, ctx)
        up = TargetLinear(**_from_table("up", cfg), **kw("up"))(x_BxLxD, ctx)
        act = nn.silu(gate) * up
        if spec is not None and spec.ffn_activation is not None:
            act = spec.ffn_activation(self, act, AdapterContext() if ctx is None else ctx)
        return TargetLinear(**_from_table("down", cfg), **kw("down"))(act, ctx)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    layer: int
    adapter_config: AdapterConfig | None = None

    @nn.compact
    def __call__(self, x_BxLxD, cos_sin, mask_Bx1xLxS, kv=None, ctx=None):
        """Returns (x, new_kv, the layer router's gates_BxM or None)."""
        cfg, ac = self.config, self.adapter_config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = RMSNorm(name="input_layernorm", **norm)(x_BxLxD)
        gates_BxM = None
        layer_router = None if ac is None else get_method(ac.method).layer_router
        if layer_router is not None:  # one routing decision per layer (MiLoRA), read by the layer's linears
            gates_BxM = layer_router(self, h, ctx)
            ctx = ctx.replace(layer_gates_BxM=gates_BxM)
        attn = Attention(cfg, self.layer, ac, name="self_attn")
        attn_out, new_kv = attn(h, cos_sin, mask_Bx1xLxS, kv, ctx)
        x_BxLxD = x_BxLxD + attn_out
        h = RMSNorm(name="post_attention_layernorm", **norm)(x_BxLxD)
        return x_BxLxD + MLP(cfg, self.layer, ac, name="mlp")(h, ctx), new_kv, gates_BxM


class LlamaForCausalLM(nn.Module):
    """LLaMA causal LM. `apply({"params": p}, input_ids)` returns float32 logits [B, L, V].

    attention_mask [B, L] (1 = token, 0 = padding) masks keys; position_ids
    [B, L] default to 0..L-1 (or continue from the cache). With `cache` the
    call returns (logits, updated cache): prefill and decode are the same path.

    With `adapter_config`, apply `{"params": base, "adapter": adapter}`; keyword inputs:
    deterministic (False enables LoRA dropout and router jitter: pass rngs={"dropout": key}),
    prompt_mask_BxL (MiLoRA pools only these tokens; default: all non-padding tokens),
    routing (MiLoRA gates [B, num_layers, M] to reuse instead of running the routers; with a
    cache, the cache's routing is used once the prefill has filled it). MiLoRA's decision is
    sown as intermediates["milora_routing"] and stored in the returned cache.
    """

    config: LlamaConfig
    adapter_config: AdapterConfig | None = None

    @nn.compact
    def __call__(
        self,
        input_ids_BxL: jax.Array,
        attention_mask_BxL: jax.Array | None = None,
        position_ids_BxL: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        deterministic: bool = True,
        prompt_mask_BxL: jax.Array | None = None,
        routing: jax.Array | None = None,
    ):
        cfg, ac = self.config, self.adapter_config
        if ac is not None:
            ac.validate_for(cfg)
        B, L = input_ids_BxL.shape
        if attention_mask_BxL is None:
            attention_mask_BxL = jnp.ones((B, L), bool)
        attention_mask_BxL = attention_mask_BxL.astype(bool)
        if cache is None:
            start = jnp.zeros((), jnp.int32)
            kv_mask_BxS = attention_mask_BxL
        else:
            start = cache.index
            kv_mask_BxS = jax.lax.dynamic_update_slice(cache.mask_BxS, attention_mask_BxL, (0, start))
        if position_ids_BxL is None:
            position_ids_BxL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
        # Query i sits in slot start+i and may see keys in slots <= start+i that are not padding.
        q_slot_L = start + jnp.arange(L)
        k_slot_S = jnp.arange(kv_mask_BxS.shape[1])
        causal_LxS = k_slot_S[None, :] <= q_slot_L[:, None]
        if cfg.sliding_window is not None:  # Mistral: also keys in slots > i - W (transformers counts slots, pads included)
            causal_LxS = causal_LxS & (k_slot_S[None, :] > q_slot_L[:, None] - cfg.sliding_window)
        mask_Bx1xLxS = (causal_LxS[None, :, :] & kv_mask_BxS[:, None, :])[:, None]

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="embed_tokens",
        )
        x_BxLxD = embed(input_ids_BxL)
        cos_sin = rope_cos_sin(position_ids_BxL, inverse_frequencies(cfg))
        ctx = None
        if ac is not None:
            if routing is None and cache is not None:
                routing = cache.routing
            pool_mask = attention_mask_BxL if prompt_mask_BxL is None else attention_mask_BxL & prompt_mask_BxL.astype(bool)
            ctx = AdapterContext(deterministic=deterministic, pool_mask_BxL=pool_mask, routing_BxNxM=routing)
        layer_cls = nn.remat(DecoderLayer, policy=remat_policy(cfg.remat)) if cfg.remat else DecoderLayer
        new_k, new_v, gates = [], [], []
        plan = scan_plan(cfg.num_hidden_layers, ac) if cfg.scan_layers and not self.is_initializing() else None
        if plan is not None:  # one lax.scan over the layers (init still builds the per-layer trees below)
            x_BxLxD, new_k, new_v, gates = run_scanned_layers(
                self, plan, DecoderLayer, x_BxLxD, cos_sin, mask_Bx1xLxS, cache, start, ctx, deterministic
            )
        if plan is None and not self.is_initializing() and "layers" in self.variables.get("params", {}):
            raise ValueError("params hold the layers stacked (stacking.stack_layers) but this model runs them "
                             "unrolled: pass unstack_layers(params), or set scan_layers")
        for i in range(0 if plan is not None else cfg.num_hidden_layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], start)
            x_BxLxD, layer_kv, layer_gates = layer_cls(cfg, i, ac, name=f"layers_{i}")(
                x_BxLxD, cos_sin, mask_Bx1xLxS, kv, ctx
            )
            if layer_kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
            gates.append(layer_gates)
        new_routing = None
        if ac is not None and get_method(ac.method).layer_router is not None:
            new_routing = jnp.stack(gates, axis=1)  # [B, num_layers, M]
            self.sow("intermediates", LAYER_ROUTING_KEY, new_routing)
        x_BxLxD = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x_BxLxD)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x_BxLxD)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(_init, ("embed", "vocab")),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="lm_head",
            )(x_BxLxD)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(k=tuple(new_k), v=tuple(new_v), mask_BxS=kv_mask_BxS, index=start + L, routing=new_routing)
