"""The contrastive expert loss: by hand, against a PyTorch transcription, through the model, and its cost at 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, batch, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM, MoeLoraError
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.layers import lora_expert_gram
from moe_lora_jax.objective import Objective, resolve_objective
from moe_lora_jax.losses import (
    ExpertStat,
    contrastive_expert_loss,
    contrastive_expert_terms,
    cross_entropy,
    expert_stats,
    gram_of_outputs,
    total_loss,
)

B, L = 3, 9
# jitted: one compile per call signature instead of one per eager op (CPU test time)
terms = jax.jit(contrastive_expert_terms, static_argnums=(2, 3))


def _mask():
    m = np.ones((B, L), np.int64)
    m[0, :3] = 0
    m[2, 7:] = 0
    return m


def test_three_experts_by_hand():
    # expert outputs on two tokens: o1 = (1, 0), o2 = (2, 0), o3 = (0, 1): c12 = 1, c13 = c23 = 0
    o = jnp.asarray([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]] * 2)
    tau = 0.5
    # token 0 routed to {1, 2}: both ordered pairs give -log(e^2 / (e^2 + e^0)) = log(1 + e^-2)
    # token 1 routed to {1, 3}: anchor 1 -> positive 3 against negative 2: log(1 + e^2); anchor 3 -> 1 against 2: log 2
    t0 = np.log1p(np.exp(-2.0))
    t1 = (np.log1p(np.exp(2.0)) + np.log(2.0)) / 2
    sparse_gates = jnp.asarray([[0.6, 0.4, 0.0], [0.7, 0.0, 0.3]])
    dense_gates = jnp.asarray([[0.5, 0.3, 0.2], [0.5, 0.1, 0.4]])  # top-2 picks the same experts
    gram = gram_of_outputs(o)
    assert float(terms(gram, sparse_gates, None, tau)) == pytest.approx((t0 + t1) / 2, abs=1e-6)
    assert float(terms(gram, dense_gates, 2, tau, jnp.ones(2))) == pytest.approx((t0 + t1) / 2, abs=1e-6)
    # token weights: only token 1 counts
    assert float(terms(gram, dense_gates, 2, tau, jnp.asarray([0.0, 1.0]))) == pytest.approx(t1, abs=1e-6)
    # all experts selected: no negatives, every term is exactly 0; one expert selected: no positive pair, 0
    assert float(terms(gram, dense_gates, 3, tau)) == 0.0
    assert float(terms(gram, dense_gates, 1, tau)) == 0.0


def torch_contrastive(outputs, gates, top_k, tau, mask):
    """The formula written out in PyTorch, loop over tokens and pairs, from explicit expert outputs [T, E, O]."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(outputs, dim=-1, eps=1e-8)
    sim = z @ z.transpose(-1, -2) / tau
    T, E = gates.shape
    per_token = []
    for t in range(T):
        routed = set(torch.topk(gates[t], top_k).indices.tolist()) if top_k else set(torch.nonzero(gates[t] > 0).flatten().tolist())
        alive = {e for e in range(E) if float(outputs[t, e].detach().norm()) > 1e-8}  # a zero output takes no part
        chosen = routed & alive
        others = [u for u in range(E) if u not in routed and u in alive]
        terms = []
        for i in chosen:
            for j in chosen:
                if i != j:
                    logits = torch.stack([sim[t, i, j]] + [sim[t, i, u] for u in others])
                    terms.append(-torch.log_softmax(logits, 0)[0])
        per_token.append(torch.stack(terms).mean() if terms else sim.new_zeros(()))
    per_token = torch.stack(per_token)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("top_k", [None, 2, 3])
def test_matches_pytorch_transcription_and_its_gradient(top_k):
    import torch

    E, O = 5, 7
    rng = np.random.default_rng(top_k or 0)
    outputs = rng.normal(size=(B, L, E, O)).astype(np.float32)
    outputs[0, 4, 1] = 0.0  # a zero output (B = 0 at init): cosine 0 with everything
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, L, E)).astype(np.float32) * 2), -1)
    gates = np.asarray(probs)
    if top_k is None:  # a sparse router: exactly two non-zero gates per token
        keep = np.argsort(-gates, -1)[..., :2]
        gates = np.where(np.eye(E)[keep].sum(-2) > 0, gates, 0.0).astype(np.float32)
    mask = _mask()
    tau = 0.1

    def ours(out):
        stat = ExpertStat(0, "q_proj", gram_of_outputs(out), jnp.asarray(gates))
        return contrastive_expert_loss([stat], top_k, tau, jnp.asarray(mask))[0]

    value, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(outputs))
    out_t = torch.tensor(outputs.reshape(-1, E, O), requires_grad=True)
    ref = torch_contrastive(out_t, torch.tensor(gates.reshape(-1, E)), top_k, tau,
                            torch.tensor(mask.reshape(-1), dtype=torch.float32))
    ref.backward()
    assert float(ref.detach()) > 0.1
    assert abs(float(value) - float(ref.detach())) <= 1e-5
    np.testing.assert_allclose(np.asarray(grad).reshape(-1, E, O), out_t.grad.numpy(), atol=1e-5)
    assert np.all(np.asarray(grad)[0, 4, 1] == 0.0) and np.all(np.isfinite(np.asarray(grad)))


def test_lora_gram_equals_the_outputs_gram_without_materialising_them():
    E, r, O = 4, 3, 50
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(B, L, E, r)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(E, r, O)).astype(np.float32))
    explicit = gram_of_outputs(2.0 * jnp.einsum("bler,ero->bleo", h, b))
    np.testing.assert_allclose(np.asarray(lora_expert_gram(h, b, 2.0)), np.asarray(explicit), rtol=1e-5, atol=1e-4)
    text = str(jax.make_jaxpr(lambda h, b: lora_expert_gram(h, b, 2.0))(h, b))
    assert f"[{B},{L},{E},{O}]" not in text and f"[{B},{L},{E},{E}]" in text


# ------------------------------------------------------------------ through the model
ONE_LAYER = TINY.replace(num_hidden_layers=1)
E_MODEL = 3


@pytest.fixture(scope="module")
def base():
    return tiny_base(ONE_LAYER)


def _configs(method):
    targets = ("gate", "up", "down") if method == "mixlora" else ("q", "down")
    ac0 = AdapterConfig(method=method, num_experts=E_MODEL, top_k=2, rank=4, target_modules=targets)
    return ac0, ac0.replace(sow_expert_outputs=True)  # what the loop sets for objective.contrastive_coef > 0


@pytest.mark.parametrize("method", ["mola", "mixlora"])
def test_gradient_reaches_every_expert_and_the_output_is_unchanged(base, method):
    config, params = base
    ac0, ac = _configs(method)
    adapter = randomize(init_adapter(config, ac0))
    ids, mask = batch(config, B=B, L=L)

    @jax.jit
    def run(ad):
        def contrastive(a):
            logits, state = LlamaForCausalLM(config, ac).apply({"params": params, "adapter": a}, ids, mask,
                                                               mutable=["intermediates"])
            top_k = None  # mola and mixlora: the router's own top-2
            return contrastive_expert_loss(expert_stats(state), top_k, 0.07, jnp.asarray(mask))[0], logits

        (value, logits), grads = jax.value_and_grad(contrastive, has_aux=True)(ad)
        logits0 = LlamaForCausalLM(config, ac0).apply({"params": params, "adapter": ad}, ids, mask)
        return value, grads, logits, logits0

    # at initialisation (every B = 0) every expert output is zero: no expert takes part, value and gradient 0
    value0, grads0, _, _ = run(init_adapter(config, ac0))
    assert float(value0) == 0.0 and all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads0))
    value, grads, logits, logits0 = run(adapter)
    assert np.isfinite(float(value)) and float(value) > 0.1
    # the forward pass is the same function with the loss on (MixLoRA computes it from every expert's output)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits0), atol=1e-5)
    flat = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    expert_leaves = {k: g for k, g in flat.items() if k.endswith("['lora_A']") or k.endswith("['lora_B']")}
    experts = {k: g for k, g in expert_leaves.items() if g.shape[0] == E_MODEL}
    assert len(experts) == (6 if method == "mixlora" else 4)  # A and B of mixlora: gate, up, down; mola: q, down
    for k, g in experts.items():
        assert np.all(np.isfinite(g)), k
        per_expert = np.abs(g.reshape(E_MODEL, -1)).max(axis=1)
        assert np.all(per_expert > 1e-6), (k, per_expert)


@pytest.mark.parametrize("method", ["mola", "mixlora"])
def test_coefficient_zero_computes_and_sows_no_expert_outputs(base, method):
    config, params = base
    ac0, ac = _configs(method)
    adapter = randomize(init_adapter(config, ac0))
    ids, mask = batch(config, B=B, L=L)
    T, D, F = B * L, config.hidden_size, config.intermediate_size
    per_expert_shapes = [f"[{B},{L},{E_MODEL},{E_MODEL}]", f"[{T},{E_MODEL},{E_MODEL}]", f"[{T},{E_MODEL},{D}]",
                         f"[{T},{E_MODEL},{F}]"]

    def jaxpr_text(cfg):
        fn = lambda a: LlamaForCausalLM(config, cfg).apply({"params": params, "adapter": a}, ids, mask,  # noqa: E731
                                                           mutable=["intermediates"])
        return str(jax.make_jaxpr(fn)(adapter))

    off, on = jaxpr_text(ac0), jaxpr_text(ac)
    assert not [s for s in per_expert_shapes if s in off]
    assert [s for s in per_expert_shapes if s in on]  # the check sees them when the loss is on
    def sown(cfg):
        fn = lambda a: LlamaForCausalLM(config, cfg).apply({"params": params, "adapter": a}, ids, mask,  # noqa: E731
                                                           mutable=["intermediates"])[1]
        return str(jax.tree_util.tree_structure(jax.eval_shape(fn, adapter)))

    assert "expert_gram" not in sown(ac0) and "router_gates" in sown(ac0)
    assert "expert_gram" in sown(ac)


def test_total_loss_adds_the_weighted_term():
    V, E = 13, 4
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(B, L, V)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, V, size=(B, L)))
    mask = jnp.asarray(_mask())
    gram = gram_of_outputs(jnp.asarray(rng.normal(size=(B, L, E, 6)).astype(np.float32)))
    gates = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, L, E)).astype(np.float32)), -1)
    gram2 = gram_of_outputs(jnp.asarray(rng.normal(size=(B, L, E, 6)).astype(np.float32)))
    inter = {"intermediates": {"layers_0": {"mlp": {
        "up_proj": {"router_logits": (jnp.log(gates),), "router_gates": (gates,), "expert_gram": (gram,)},
        "down_proj": {"router_logits": (jnp.log(gates),), "router_gates": (gates,), "expert_gram": (gram2,)}}}}}
    ac = AdapterConfig(method="molora", num_experts=E, top_k=2)
    obj = Objective(contrastive_coef=0.3, contrastive_temperature=0.2)
    loss, metrics = jax.jit(total_loss, static_argnums=(3, 4))(logits, {"input_ids": ids, "attention_mask": mask}, inter, ac, obj)
    term = (terms(gram, gates, 2, 0.2, mask) + terms(gram2, gates, 2, 0.2, mask)) / 2  # the mean over banks
    _, metrics_off = jax.jit(total_loss, static_argnums=(3, 4))(logits, {"input_ids": ids, "attention_mask": mask}, inter,
                                                                ac, obj.replace(contrastive_coef=0.0))
    assert "contrastive" not in metrics_off
    assert float(metrics["contrastive"]) == pytest.approx(float(term), rel=1e-6)
    assert float(loss) == pytest.approx(float(cross_entropy(logits, ids, mask)[0] + 0.3 * term), rel=1e-6)
    for m in ("up_proj", "down_proj"):
        del inter["intermediates"]["layers_0"]["mlp"][m]["expert_gram"]
    with pytest.raises(MoeLoraError, match="no expert_gram"):
        total_loss(logits, {"input_ids": ids, "attention_mask": mask}, inter, ac, obj)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lora", contrastive_coef=0.1), "objective.contrastive_coef=0.1 does not apply to method lora"),
        (dict(method="mov", contrastive_coef=0.1), "objective.contrastive_coef=0.1 does not apply to method mov"),
        (dict(method="milora", contrastive_coef=0.1), "objective.contrastive_coef=0.1 does not apply to method milora"),
        (dict(method="mola", contrastive_coef=-1.0), r"objective.contrastive_coef=-1.0 is negative"),
        (dict(method="mola", contrastive_temperature=0.0), "objective.contrastive_temperature=0.0 must be positive"),
        (dict(method="loramoe", loramoe_form="cv"), "objective.loramoe_form='cv': use one of code, paper"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(MoeLoraError, match=message) as e:
        resolve_objective(kwargs, method)
    assert "\n" not in str(e.value)
    if "contrastive_coef" in kwargs and kwargs["contrastive_coef"] > 0:  # the model flag it sets is refused alike
        with pytest.raises(MoeLoraError, match=f"sow_expert_outputs does not apply to method {method}"):
            AdapterConfig(method=method, sow_expert_outputs=True)


def test_settings_round_trip_through_json():
    import json

    obj = Objective(contrastive_coef=0.05, contrastive_temperature=0.2, loramoe_form="paper")
    back = Objective.from_dict(json.loads(json.dumps(obj.to_dict())))
    assert back == obj and back.contrastive_coef == 0.05 and back.loramoe_form == "paper"
    restored = resolve_objective({}, "mola")  # every term option at its default
    assert (restored.contrastive_coef, restored.contrastive_temperature, restored.loramoe_form) == (0.0, 0.07, "code")
    ac = AdapterConfig(method="loramoe", sow_expert_outputs=True)
    assert AdapterConfig.from_dict(json.loads(json.dumps(ac.to_dict()))) == ac
    # coefficient 0 is allowed on every method
    assert resolve_objective({"contrastive_coef": 0.0}, "lora").contrastive_coef == 0.0
