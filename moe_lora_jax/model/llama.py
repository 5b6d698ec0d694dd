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
carries logical axis names (see `moe_lora_jax.parallel.axes`). The seven adapter
targets go through `TargetLinear`, the one place adapters attach.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.model.rope import apply_rope, inverse_frequencies, rope_cos_sin

TARGET_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
_init = nn.initializers.normal(stddev=0.02)


class KVCache(struct.PyTreeNode):
    """Decoding cache: per-layer keys/values [B, S, K, H], valid-slot mask [B, S], next slot."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask_BxS: jax.Array
    index: jax.Array  # int32 scalar: slot where the next token is written

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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_init, self.kernel_axes), (x.shape[-1], self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        return self.adapt(x, jnp.dot(x, kernel.astype(self.dtype)))

    def adapt(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return y


class Attention(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        mask_Bx1xLxS: jax.Array,
        kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        B, L, _ = x_BxLxD.shape
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = dict(layer=self.layer, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        q = TargetLinear(N * H, "q", ("embed", "heads"), name="q_proj", **dense)(x_BxLxD).reshape(B, L, N, H)
        k = TargetLinear(K * H, "k", ("embed", "kv"), name="k_proj", **dense)(x_BxLxD).reshape(B, L, K, H)
        v = TargetLinear(K * H, "v", ("embed", "kv"), name="v_proj", **dense)(x_BxLxD).reshape(B, L, K, H)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        new_kv = None
        if kv is not None:  # write this chunk into the cache at `index`, attend over all slots
            k_cache, v_cache, index = kv
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            k, v, new_kv = k_cache, v_cache, (k_cache, v_cache)
        out_BxLxNxH = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask_Bx1xLxS)
        out = TargetLinear(cfg.hidden_size, "o", ("heads", "embed"), name="o_proj", **dense)
        return out(out_BxLxNxH.reshape(B, L, N * H)), new_kv


class MLP(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(layer=self.layer, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        gate = TargetLinear(cfg.intermediate_size, "gate", ("embed", "mlp"), name="gate_proj", **dense)(x_BxLxD)
        up = TargetLinear(cfg.intermediate_size, "up", ("embed", "mlp"), name="up_proj", **dense)(x_BxLxD)
        return TargetLinear(cfg.hidden_size, "down", ("mlp", "embed"), name="down_proj", **dense)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x_BxLxD, cos_sin, mask_Bx1xLxS, kv=None):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = RMSNorm(name="input_layernorm", **norm)(x_BxLxD)
        attn_out, new_kv = Attention(cfg, self.layer, name="self_attn")(h, cos_sin, mask_Bx1xLxS, kv)
        x_BxLxD = x_BxLxD + attn_out
        h = RMSNorm(name="post_attention_layernorm", **norm)(x_BxLxD)
        return x_BxLxD + MLP(cfg, self.layer, name="mlp")(h), new_kv


class LlamaForCausalLM(nn.Module):
    """LLaMA causal LM. `apply({"params": p}, input_ids)` returns float32 logits [B, L, V].

    attention_mask [B, L] (1 = token, 0 = padding) masks keys; position_ids
    [B, L] default to 0..L-1 (or continue from the cache). With `cache` the
    call returns (logits, updated cache): prefill and decode are the same path.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids_BxL: jax.Array,
        attention_mask_BxL: jax.Array | None = None,
        position_ids_BxL: jax.Array | None = None,
        cache: KVCache | None = None,
    ):
        cfg = self.config
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
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        new_k, new_v = [], []
        for i in range(cfg.num_hidden_layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], start)
            x_BxLxD, layer_kv = layer_cls(cfg, i, name=f"layers_{i}")(x_BxLxD, cos_sin, mask_Bx1xLxS, kv)
            if layer_kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
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
        return logits, KVCache(k=tuple(new_k), v=tuple(new_v), mask_BxS=kv_mask_BxS, index=start + L)
