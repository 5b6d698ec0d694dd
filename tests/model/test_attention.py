"""grouped_query_attention matches jax.nn.dot_product_attention (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lora_jax.model.llama import grouped_query_attention


@pytest.mark.parametrize(
    "B,L,S,N,K,H",
    [(2, 7, 7, 4, 4, 8), (2, 7, 7, 6, 2, 16), (3, 5, 5, 4, 1, 8), (2, 1, 12, 6, 3, 8), (1, 9, 13, 9, 3, 64)],
    ids=["mha", "gqa", "mqa", "decode-step", "smollm2-heads"],
)
def test_matches_jax_dot_product_attention(B, L, S, N, K, H):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, L, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    causal_LxS = np.tril(np.ones((L, S), bool), k=S - L)
    keys_BxS = np.ones((B, S), bool)
    keys_BxS[0, :2] = False  # left padding in the first row
    mask = jnp.asarray(causal_LxS[None, None] & keys_BxS[:, None, None, :])
    g = jnp.asarray(rng.normal(size=(B, L, N, H)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * g)

    ours = grouped_query_attention(q, k, v, mask)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    assert ours.shape == (B, L, N, H)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    grads = jax.grad(loss(lambda q, k, v: grouped_query_attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_fully_masked_rows_match():
    """Rows whose every key is masked (padding queries) give jax's uniform average, not NaN."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32) for _ in range(3))
    mask = jnp.zeros((1, 1, 4, 4), bool).at[:, :, 2:, :2].set(True)
    ours = grouped_query_attention(q, k, v, mask)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, jax.nn.dot_product_attention(q, k, v, mask=mask), atol=1e-6, rtol=0)
