"""The analyses on the tiny random LLaMA: a router forced to split two tasks, every method's statistics
collected through the model, the JSON documents' shapes and the PNGs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, init_adapter, randomize, tiny_base
from flax import traverse_util

from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.analysis.collect import collect_routing, make_routing_fn
from moe_lora_jax.analysis.plots import PLOTS
from moe_lora_jax.analysis.redundancy import expert_redundancy_result
from moe_lora_jax.analysis.results import expert_load_result, loramoe_groups_result, milora_modules_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
A_TOKENS, B_TOKENS = np.arange(3, 50), np.arange(50, 97)


def two_task_batch(L: int = 8) -> dict[str, np.ndarray]:
    """Rows 0, 1 hold task A's tokens, rows 2, 3 task B's; row 1 has 3 padding tokens, row 3 is an empty filler."""
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.choice(A_TOKENS, (2, L)), rng.choice(B_TOKENS, (2, L))]).astype(np.int32)
    attn = np.ones((4, L), np.int32)
    attn[1, L - 3:] = 0
    attn[3] = 0
    prompt = np.zeros_like(attn)
    prompt[:, :4] = 1
    prompt *= attn
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": attn - prompt, "prompt_mask": prompt,
            "task_id": np.array([0, 0, 1, 1], np.int32), "example_index": np.array([0, 1, 2, -1], np.int32)}


def split_base():
    """The tiny base with embedding feature 0 at +1 for task A's tokens and -1 for task B's: every
    layer-0 input keeps that sign after the RMSNorm."""
    config, params = tiny_base(TINY)
    emb = np.array(params["embed_tokens"]["embedding"])
    emb[A_TOKENS, 0], emb[B_TOKENS, 0] = 1.0, -1.0
    params = {**params, "embed_tokens": {"embedding": jnp.asarray(emb)}}
    return config, params


def force_router(adapter, path: str, weight: float = 10.0):
    """Router W [D, E] zero but for feature 0: +weight to expert 0, -weight to expert 1 (task A -> 0, B -> 1)."""
    flat = traverse_util.flatten_dict(adapter, sep="/")
    w = np.zeros(flat[path].shape, np.float32)
    w[0, 0], w[0, 1] = weight, -weight
    flat[path] = jnp.asarray(w)
    return traverse_util.unflatten_dict(flat, sep="/")


def collect(ac, adapter, params, tokens="all", routing_fn=None):
    model = LlamaForCausalLM(TINY, ac)
    return collect_routing(model, {"params": params, "adapter": adapter}, ac, [two_task_batch()], ("A", "B"), tokens=tokens,
                           routing_fn=routing_fn)


# one compiled forward per method, shared by the tests (each compile is seconds on 2 cores)
@pytest.fixture(scope="module")
def mola_forced():
    config, params = split_base()
    ac = AdapterConfig(method="mola", num_experts=2, top_k=1, rank=2, target_modules=("q", "v"))
    adapter = force_router(randomize(init_adapter(config, ac)), "layers_0/self_attn/q_proj/router")
    fn = make_routing_fn(LlamaForCausalLM(TINY, ac), ac, 2)
    return ac, collect(ac, adapter, params, routing_fn=fn), collect(ac, adapter, params, "prompt", routing_fn=fn)


@pytest.fixture(scope="module")
def loramoe_forced():
    config, params = split_base()
    ac = AdapterConfig(method="loramoe", num_experts=2, rank=2)
    adapter = force_router(randomize(init_adapter(config, ac)), "layers_0/mlp/gate_proj/router")
    return ac, collect(ac, adapter, params)


@pytest.fixture(scope="module")
def milora_random():
    config, params = tiny_base(TINY)
    ac = AdapterConfig(method="milora", top_k=2, rank=2, target_modules=("q", "k", "v", "o", "gate", "up", "down"))
    return ac, collect(ac, randomize(init_adapter(config, ac)), params)


def test_forced_router_sends_task_a_to_expert_0_and_task_b_to_expert_1(mola_forced):
    ac, totals, prompt_totals = mola_forced
    assert totals.examples.tolist() == [2, 1]  # the filler row is not an example
    doc = expert_load_result(totals, ac)
    assert [(r["layer"], r["module"]) for r in doc["routers"]] == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    q0 = doc["routers"][0]
    assert q0["load"] == [[1.0, 0.0], [0.0, 1.0]] and q0["task_separation"] == 1.0
    assert q0["tokens_per_task"] == [8 + 5, 8]
    for r in doc["routers"]:
        np.testing.assert_allclose(np.sum(r["load"], axis=1), 1.0, rtol=1e-6)
    assert len(doc["layers"]) == 2 and np.shape(doc["layers"][0]["load"]) == (2, 2)
    prompt_only = expert_load_result(prompt_totals, ac)
    assert prompt_only["routers"][0]["tokens_per_task"] == [8, 4] and prompt_only["tokens"] == "prompt"
    assert prompt_only["routers"][0]["load"] == [[1.0, 0.0], [0.0, 1.0]]


def test_loramoe_world_knowledge_group_follows_the_forced_router(loramoe_forced):
    ac, totals = loramoe_forced
    doc = loramoe_groups_result(totals, ac, ["A"])
    gate0 = next(r for r in doc["routers"] if (r["layer"], r["module"]) == (0, "gate_proj"))
    assert gate0["world_knowledge_mass"]["A"] == pytest.approx(1.0, abs=1e-6)
    assert gate0["world_knowledge_mass"]["B"] == pytest.approx(0.0, abs=1e-6)
    assert gate0["by_type"] == {"world_knowledge": pytest.approx(1.0, abs=1e-6), "other": pytest.approx(0.0, abs=1e-6)}
    assert {r["module"] for r in doc["routers"]} == {"gate_proj", "up_proj", "down_proj"} and len(doc["layers"]) == 2
    assert doc["task_types"] == {"A": 1, "B": 0}


def test_milora_selects_top_k_modules_per_prompt(milora_random):
    ac, totals = milora_random
    doc = milora_modules_result(totals, ac)
    assert doc["prompts_per_task"] == {"A": 2.0, "B": 1.0}
    for t in ("A", "B"):
        rates = np.asarray(doc["selection_rate"][t])
        assert rates.shape == (2, 7)
        np.testing.assert_allclose(rates.sum(axis=1), 2.0)  # every prompt selects top_k = 2 modules per layer
        assert set(np.unique(rates)) <= ({0.0, 0.5, 1.0} if t == "A" else {0.0, 1.0})
    assert len(doc["task_separation"]) == 2


@pytest.mark.parametrize("method, modules", [
    ("mov", {"k_proj", "v_proj", "ffn_ia3"}),
    ("mixlora", {"mlp"}),
])
def test_expert_load_of_mov_and_mixlora(method, modules):
    config, params = tiny_base(TINY)
    ac = AdapterConfig(method=method, num_experts=3, top_k=2, rank=2)
    doc = expert_load_result(collect(ac, randomize(init_adapter(config, ac), scale=0.5), params), ac)
    assert {r["module"] for r in doc["routers"]} == modules
    for r in doc["routers"]:
        load = np.asarray(r["load"])
        assert load.shape == (2, 3)
        np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-6)
        if method == "mixlora":  # top-2 of 3: each expert gets at most half of a token's selections
            assert r["top_k"] == 2 and load.max() <= 0.5 + 1e-9


def test_redundancy_of_a_random_mola_adapter_with_per_layer_counts_and_the_plots(tmp_path):
    from moe_lora_jax.allocation import Allocation

    config, _ = tiny_base(TINY)
    alloc = Allocation.from_counts({"q": (3, 1), "v": (3, 1)})
    ac = AdapterConfig(method="mola", rank=2, target_modules=("q", "v"), allocation=alloc)
    doc = expert_redundancy_result(randomize(init_adapter(config, ac)), ac)
    assert [(r["layer"], r["module"], r["num_experts"]) for r in doc["linears"]] == [
        (0, "q_proj", 3), (0, "v_proj", 3), (1, "q_proj", 1), (1, "v_proj", 1)]
    assert np.shape(doc["linears"][0]["cosine_distance"]) == (3, 3)
    # random rank-2 deltas in 48 x 48 are nearly orthogonal; a one-expert layer has no pair
    assert 0.8 < doc["layers"][0]["mean_cosine_distance"] < 1.2 and doc["layers"][1]["mean_cosine_distance"] is None
    assert doc["scale"] == ac.scale
    json.dumps(doc, allow_nan=False)  # strict JSON: NaN became null
    out = PLOTS["expert_redundancy"](doc, tmp_path / "r.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_every_plot_writes_a_png(tmp_path, loramoe_forced, milora_random):
    docs = {}
    ac, totals = loramoe_forced
    docs["expert_load"] = expert_load_result(totals, ac)
    docs["loramoe_groups"] = loramoe_groups_result(totals, ac, ["B"])
    docs["milora_modules"] = milora_modules_result(milora_random[1], milora_random[0])
    for name, doc in docs.items():
        json.dumps(doc, allow_nan=False)
        path = PLOTS[name](doc, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000
