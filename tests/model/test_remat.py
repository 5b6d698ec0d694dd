"""Remat policies (model.remat: none, dots, dots_no_batch, full; old booleans = full/none): the same
gradients under every policy, unrolled and scanned, and the config values they accept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, batch, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.model.remat import REMAT_POLICIES, normalize_remat, remat_policy
from moe_lora_jax.train.config import load_config


def test_every_policy_gives_the_same_gradients():
    ac = AdapterConfig(method="lora", rank=2, target_modules=("q", "down"))
    config, params = tiny_base(TINY, seed=3)
    adapter = randomize(init_adapter(config, ac), seed=4, scale=0.2)
    ids, mask = batch(config, B=2, L=8)

    def grads(remat, scan_layers=False):
        model = LlamaForCausalLM(config.replace(remat=remat, scan_layers=scan_layers), ac)

        def loss(a):
            logits = model.apply({"params": params, "adapter": a}, ids, mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

        return jax.jit(jax.grad(loss))(adapter)

    ref = grads("none")
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ref)) > 1e-3  # gradients that can differ
    # every policy in the unrolled loop (nn.remat), and a save-the-matmuls one in the scanned body (jax.checkpoint)
    for policy, scan_layers in [(p, False) for p in REMAT_POLICIES[1:]] + [("dots_no_batch", True)]:
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(grads(policy, scan_layers))):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6, err_msg=f"{policy} scan_layers={scan_layers}")


def test_config_accepts_policy_names_and_old_booleans():
    assert load_config(None).model.remat == "none"
    for given, want in [("true", "full"), ("false", "none"), ("yes", "full"), ("dots", "dots"), ("DOTS_NO_BATCH", "dots_no_batch"),
                        ("full", "full")]:
        assert load_config(None, [f"model.remat={given}"]).model.remat == want
    assert TINY.replace(remat="none").remat is False and TINY.replace(remat="full").remat is True  # `if cfg.remat` = on
    assert TINY.replace(remat="dots").remat == "dots" and TINY.replace(remat=True) == TINY.replace(remat="full")
    with pytest.raises(MoeLoraError, match=r"model.remat='maybe' is not a remat policy: use one of none, dots, dots_no_batch, full"):
        load_config(None, ["model.remat=maybe"])
    assert normalize_remat(True) == "full" and remat_policy("full") is None
    assert remat_policy("dots") is jax.checkpoint_policies.dots_saveable
