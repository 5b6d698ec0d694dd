"""Rotary position embeddings in Hugging Face's rotate-half layout.

The head dimension is split into two halves [x1, x2]; a position p rotates the
pair (x1[i], x2[i]) by angle p * inv_freq[i]. Tables are built in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from moe_lora_jax.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """inv_freq[head_dim // 2] after the configured rope scaling (numpy: it is a constant)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions_BxL: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables [B, L, head_dim] (float32) for integer positions."""
    angles_BxLxH2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles_BxLxH = jnp.concatenate([angles_BxLxH2, angles_BxLxH2], axis=-1)
    return jnp.cos(angles_BxLxH), jnp.sin(angles_BxLxH)


def apply_rope(x_BxLxNxH: jnp.ndarray, cos_BxLxH: jnp.ndarray, sin_BxLxH: jnp.ndarray) -> jnp.ndarray:
    """Rotate every head of x; the result keeps x's dtype (tables are cast to it, as in HF)."""
    half = x_BxLxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxLxNxH[..., half:], x_BxLxNxH[..., :half]], axis=-1)
    cos = cos_BxLxH[:, :, None, :].astype(x_BxLxNxH.dtype)
    sin = sin_BxLxH[:, :, None, :].astype(x_BxLxNxH.dtype)
    return x_BxLxNxH * cos + rotated * sin
