"""The routing analyses' pure functions on constructed cases whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.analysis import applicable_analyses, check_analyses
from moe_lora_jax.analysis.redundancy import expert_banks, expert_redundancy_result
from moe_lora_jax.analysis.results import (
    RoutingTotals, expert_load_result, loramoe_groups_result, milora_modules_result,
)
from moe_lora_jax.analysis.stats import (
    delta_gram, loads, milora_task_counts, pairwise_distances, routing_task_sums, selection_weights, task_separation,
)
from moe_lora_jax.errors import MoeLoraError


def _intermediates(logits_BxLxE, module="q_proj", block="self_attn", layer=0):
    return {"intermediates": {f"layers_{layer}": {block: {module: {"router_logits": (logits_BxLxE,),
                                                                  "router_gates": (logits_BxLxE,)}}}}}


def test_applicability_table():
    assert applicable_analyses("mola") == ["expert_load", "expert_redundancy"]
    assert applicable_analyses(AdapterConfig(method="loramoe", num_experts=4)) == [
        "expert_load", "loramoe_groups", "expert_redundancy"]
    assert applicable_analyses("milora") == ["milora_modules"]
    assert applicable_analyses("mov") == ["expert_load"]
    assert applicable_analyses("mixlora") == ["expert_load", "expert_redundancy"]
    assert applicable_analyses("lora") == []
    assert check_analyses(None, "molora") == ["expert_load", "expert_redundancy"]


@pytest.mark.parametrize("names, method, match", [
    (["milora_modules"], "mola", r"applies to milora, not to method mola: for mola use expert_load, expert_redundancy"),
    (["loramoe_groups"], "mov", r"applies to loramoe, not to method mov"),
    (["expert_redundancy"], "mov", r"not to method mov"),
    (["specialisation"], "mola", r"unknown routing analysis 'specialisation'"),
    (None, "lora", r"no routing analysis applies to method lora"),
])
def test_analyses_that_do_not_apply_are_refused_in_one_line(names, method, match):
    with pytest.raises(MoeLoraError, match=match) as e:
        check_analyses(names, method)
    assert "\n" not in str(e.value)


def test_two_tasks_routed_to_two_experts_give_the_identity_load():
    # task A (id 0) rows favour expert 0, task B (id 1) expert 1; padding tokens favour the other expert
    a_tok, b_tok = [4.0, -4.0], [-4.0, 4.0]
    logits = np.array([[a_tok, a_tok, b_tok], [b_tok, b_tok, a_tok], [a_tok, a_tok, a_tok]], np.float32)  # [3, 3, 2]
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]], np.int32)
    task_id = np.array([0, 1, 0])
    ac = AdapterConfig(method="mola", num_experts=2, top_k=1)
    sums = routing_task_sums(_intermediates(logits), ac, mask, task_id, 2)
    s, t = sums["0/q_proj"]
    np.testing.assert_allclose(np.asarray(s), [[3, 0], [0, 2]])
    np.testing.assert_allclose(np.asarray(t), [3, 2])
    totals = RoutingTotals(("A", "B"), np.array([2, 1]), {k: tuple(np.asarray(x) for x in v) for k, v in sums.items()})
    doc = expert_load_result(totals, ac)
    assert doc["routers"][0]["load"] == [[1.0, 0.0], [0.0, 1.0]]
    assert doc["routers"][0]["task_separation"] == 1.0 and doc["routers"][0]["top_k"] == 1
    assert doc["layers"] == [{"layer": 0, "modules": ["q_proj"], "load": [[1.0, 0.0], [0.0, 1.0]], "task_separation": 1.0}]
    assert doc["examples_per_task"] == {"A": 2, "B": 1} and doc["weighting"] == "fraction of the top-k selections"


def test_top_k_selections_and_dense_probabilities():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    np.testing.assert_allclose(np.asarray(selection_weights(logits, 2)), [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(np.asarray(selection_weights(logits, None)), [[0.5, 0.3, 0.2]], rtol=1e-6)
    # a dense router's load is the mean probability: tokens 0.5/0.3/0.2 and 0.1/0.1/0.8 -> 0.3/0.2/0.5
    lg = np.log(np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], np.float32))
    ac = AdapterConfig(method="molora", num_experts=3)
    s, t = routing_task_sums(_intermediates(lg), ac, np.ones((1, 2)), np.array([0]), 1)["0/q_proj"]
    np.testing.assert_allclose(loads(s, t), [[0.3, 0.2, 0.5]], rtol=1e-6)


def test_mov_head_routers_average_over_heads():
    # [K=2, B=1, L=1, E=2]: head 0 all on expert 0, head 1 all on expert 1 -> 0.5 / 0.5
    lg = np.array([[[[30.0, -30.0]]], [[[-30.0, 30.0]]]], np.float32)
    s, t = routing_task_sums(_intermediates(lg, "k_proj"), AdapterConfig(method="mov"), np.ones((1, 1)), np.array([0]), 1)["0/k_proj"]
    np.testing.assert_allclose(loads(s, t), [[0.5, 0.5]], atol=1e-6)


def test_task_separation():
    assert task_separation([[1, 0], [0, 1]]) == 1.0
    assert task_separation([[0.5, 0.5], [0.5, 0.5], [np.nan, np.nan]]) == 0.0
    assert task_separation([[1, 0, 0], [0, 1, 0], [0.5, 0.5, 0]]) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert task_separation([[1, 0]]) is None


def test_milora_module_counts_by_hand():
    # 3 prompts, 2 layers, M=3 modules, top-2: gates are non-zero on the selected modules
    routing = np.array([
        [[0.6, 0.4, 0.0], [0.0, 0.5, 0.5]],   # task 0
        [[0.7, 0.0, 0.3], [0.0, 0.5, 0.5]],   # task 0
        [[0.0, 0.9, 0.1], [0.2, 0.8, 0.0]],   # task 1
        [[0.9, 0.1, 0.0], [0.9, 0.1, 0.0]],   # filler row: not counted
    ], np.float32)
    counts, prompts = milora_task_counts(routing, np.array([1, 1, 1, 0]), np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(np.asarray(prompts), [2, 1])
    ac = AdapterConfig(method="milora", target_modules=("q", "v", "down"), top_k=2)
    doc = milora_modules_result(RoutingTotals(("a", "b"), np.array([2, 1]), milora=(np.asarray(counts), np.asarray(prompts))), ac)
    assert doc["modules"] == ["q", "v", "down"] and doc["top_k"] == 2
    assert doc["selection_rate"]["a"] == [[1.0, 0.5, 0.5], [0.0, 1.0, 1.0]]
    assert doc["selection_rate"]["b"] == [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    np.testing.assert_allclose(doc["all_tasks"], [[2 / 3, 2 / 3, 2 / 3], [1 / 3, 1.0, 2 / 3]])
    # layer 0: a = (.5,.25,.25), b = (0,.5,.5): TV 0.5; layer 1: (0,.5,.5) vs (.5,.5,0): TV 0.5
    assert doc["task_separation"] == [0.5, 0.5]


def test_loramoe_group_mass_by_task_type():
    # E=4: experts 0,1 are the world-knowledge group. Task "facts" (type 1): 8 tokens, 0.75 of the mass on
    # the group; "math": 2 tokens, 0.25; "code": 6 tokens, 0.5.
    sums = np.array([[4.0, 2.0, 1.0, 1.0], [0.25, 0.25, 1.0, 0.5], [1.5, 1.5, 1.5, 1.5]])
    tokens = np.array([8.0, 2.0, 6.0])
    totals = RoutingTotals(("facts", "math", "code"), np.array([1, 1, 1]), {"0/gate_proj": (sums, tokens)})
    ac = AdapterConfig(method="loramoe", num_experts=4)
    doc = loramoe_groups_result(totals, ac, ["facts"])
    assert doc["task_types"] == {"facts": 1, "math": 0, "code": 0}
    assert doc["layers"][0]["world_knowledge_mass"] == {"facts": 0.75, "math": 0.25, "code": 0.5}
    # other type pooled over its 8 tokens: (0.5 + 3) / 8
    assert doc["by_type"] == {"world_knowledge": 0.75, "other": pytest.approx(3.5 / 8)}
    unknown = loramoe_groups_result(totals, ac, None)
    assert unknown["by_type"] == {"world_knowledge": None, "other": None}
    with pytest.raises(MoeLoraError, match=r"world-knowledge tasks \['trivia'\] are not in the data"):
        loramoe_groups_result(totals, ac, ["trivia"])


def _bank(a_list, b_list):
    return np.stack(a_list)[..., None].astype(np.float32), np.stack(b_list)[:, None, :].astype(np.float32)


def test_redundancy_identical_orthogonal_opposite_and_dead_experts():
    e = np.eye(4)
    # experts: 0 = e0 e0^T, 1 = the same, 2 = e1 e1^T (orthogonal), 3 = -e0 e0^T (opposite), 4 = B zero
    a, b = _bank([e[0], e[0], e[1], e[0], e[2]], [e[0], e[0], e[1], -e[0], 0 * e[0]])
    cos, frob = pairwise_distances(delta_gram(a, b, 2.0))
    assert cos[0, 1] == 0.0 and frob[0, 1] == 0.0
    assert cos[0, 2] == 1.0 and frob[0, 2] == 1.0
    assert cos[0, 3] == 2.0 and frob[0, 3] == pytest.approx(np.sqrt(2.0))
    assert np.isnan(cos[0, 4]) and np.isnan(frob[4, 4])
    adapter = {"layers_0": {"self_attn": {"q_proj": {"lora_A": a[:3], "lora_B": b[:3], "router": np.zeros((4, 3))}}},
               "layers_1": {"self_attn": {"q_proj": {"lora_A": a[3:], "lora_B": b[3:], "router": np.zeros((4, 2))}}}}
    doc = expert_redundancy_result(adapter, AdapterConfig(method="mola", num_experts=3, top_k=1))
    assert [(r["layer"], r["module"], r["num_experts"]) for r in doc["linears"]] == [(0, "q_proj", 3), (1, "q_proj", 2)]
    assert doc["linears"][0]["mean_cosine_distance"] == pytest.approx(2 / 3)  # pairs 0-1: 0, 0-2: 1, 1-2: 1
    assert doc["linears"][1]["cosine_distance"] == [[0.0, None], [None, None]]  # expert 4's B is zero
    assert doc["layers"][1]["mean_cosine_distance"] is None and doc["mean_cosine_distance"] == pytest.approx(2 / 3)
    assert doc["linears"][0]["norms"] == pytest.approx([2.0, 2.0, 2.0])  # scale 2 * |e e^T|


def test_delta_gram_matches_the_explicit_products():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 5))
    dw = 0.5 * np.einsum("edr,ero->edo", a, b)
    np.testing.assert_allclose(delta_gram(a, b, 0.5), np.einsum("edo,fdo->ef", dw, dw), rtol=1e-12)
    cos, frob = pairwise_distances(delta_gram(a, b, 0.5))
    flat = dw.reshape(3, -1)
    c01 = flat[0] @ flat[1] / np.linalg.norm(flat[0]) / np.linalg.norm(flat[1])
    f01 = np.linalg.norm(flat[0] - flat[1]) / np.sqrt(np.sum(flat[0] ** 2) + np.sum(flat[1] ** 2))
    assert cos[0, 1] == pytest.approx(1 - c01, rel=1e-12) and frob[0, 1] == pytest.approx(f01, rel=1e-12)


def test_expert_banks_skip_plain_lora_and_find_mixlora_ffn():
    tree = {"layers_2": {"self_attn": {"q_proj": {"lora_A": np.zeros((4, 2)), "lora_B": np.zeros((2, 4))}},
                         "mlp": {"gate_proj": {"lora_A": np.zeros((3, 4, 2)), "lora_B": np.zeros((3, 2, 5))}}}}
    assert [(l, m, a.shape) for l, m, a, _ in expert_banks(tree)] == [(2, "gate_proj", (3, 4, 2))]
    with pytest.raises(MoeLoraError, match="no bank of LoRA experts"):
        expert_redundancy_result({"layers_0": {"x": {"lora_A": np.zeros((4, 2))}}}, AdapterConfig(method="mola"))


def test_balanced_head_takes_examples_in_turn_from_each_task():
    from moe_lora_jax.analysis.runner import balanced_head

    rows = [{"task": t, "i": i} for i, t in enumerate("aaaabcbb")]
    assert [r["i"] for r in balanced_head(rows, 5)] == [0, 4, 5, 1, 6]
    assert [r["i"] for r in balanced_head(rows, 100)] == [0, 4, 5, 1, 6, 2, 7, 3]
