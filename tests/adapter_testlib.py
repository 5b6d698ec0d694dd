"""Helpers shared by the adapter tests: a tiny random LLaMA in both frameworks, random adapters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=97, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
)


def _fill(shapes, seed: int, rule):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rule(str(path[-1].key), leaf.shape, rng)) for path, leaf in leaves]
    )


def tiny_base(config: LlamaConfig = TINY, seed: int = 0):
    """(config, params) of a random tiny LLaMA, filled with numpy (XLA compiles of `init` are slow on small CPUs)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0), ids)["params"])

    def rule(name, shape, rng):
        if name == "scale":
            return (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        return (0.02 * rng.normal(size=shape)).astype(np.float32)

    return config, _fill(shapes, seed, rule)


def adapter_shapes(config, adapter_config):
    ids = jnp.zeros((1, 4), jnp.int32)
    return nn.unbox(jax.eval_shape(LlamaForCausalLM(config, adapter_config).init, jax.random.key(0), ids)["adapter"])


def init_adapter(config, adapter_config, seed: int = 1):
    """An adapter in its initial state (B = 0, IA3 = 1, rational = GELU fit) without compiling `init`."""
    from moe_lora_jax.adapters.layers import RATIONAL_GELU_DEN, RATIONAL_GELU_NUM

    def rule(name, shape, rng):
        if name == "lora_B":
            return np.zeros(shape, np.float32)
        if name == "ia3":
            return np.ones(shape, np.float32)
        if name == "rational_num":
            return np.asarray(RATIONAL_GELU_NUM, np.float32)
        if name == "rational_den":
            return np.asarray(RATIONAL_GELU_DEN, np.float32)
        bound = 1.0 / np.sqrt(shape[-2]) if len(shape) >= 2 else 0.02
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return _fill(adapter_shapes(config, adapter_config), seed, rule)


def randomize(tree, seed: int = 2, scale: float = 0.1, keep=("ia3", "rational_num", "rational_den")):
    """Replace every adapter leaf by N(0, scale) noise (IA3 vectors: 1 + noise), so B != 0 and routers matter."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = str(path[-1].key) if hasattr(path[-1], "key") else ""
        noise = rng.normal(0, scale, leaf.shape).astype(np.float32)
        if name == "ia3":
            out.append(jnp.asarray(1.0 + noise))
        elif name in keep:
            out.append(leaf)
        else:
            out.append(jnp.asarray(noise))
    return jax.tree_util.tree_unflatten(treedef, out)


def batch(config, B: int = 3, L: int = 12, seed: int = 0, pad: bool = True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, size=(B, L)).astype(np.int32)
    mask = np.ones_like(ids)
    if pad and B > 1:
        mask[1, :3] = 0  # left padding
    if pad and B > 2:
        mask[2, L - 2 :] = 0  # right padding
    return ids, mask
