"""The method registry: every method runs through its spec's hooks; a method defined in this file alone
trains through the model and the train step; the shared code names no method; derived tables hold."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, batch, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM, MoeLoraError
from moe_lora_jax.adapters import AdapterConfig, layers
from moe_lora_jax.adapters.registry import (
    LAYER_ROUTING_KEY, REGISTRY, STATS_PREFIX, MethodSpec, coef_methods, get_method, method_names, register,
    registry_table, unregister,
)
from moe_lora_jax.losses import router_stats, total_loss
from moe_lora_jax.objective import COEF_DEFAULTS, COEF_METHODS, resolve_objective
from moe_lora_jax.train.state import TrainState
from moe_lora_jax.train.step import make_train_step

ONE_LAYER = TINY.replace(num_hidden_layers=1)  # one compile per method: the hooks, not depth, are under test
PACKAGE = Path(__file__).resolve().parents[2] / "moe_lora_jax"


@pytest.fixture(scope="module")
def base1():
    """(config, params, the base model's logits on `_batch`)."""
    config, params = tiny_base(ONE_LAYER)
    ids, mask = batch(config, B=3, L=8)
    return config, params, jax.jit(LlamaForCausalLM(config).apply)({"params": params}, ids, mask)


def _batch(spec: MethodSpec, config=ONE_LAYER) -> dict:
    ids, mask = batch(config, B=3, L=8)
    out = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    if "task_types" in spec.batch_needs:
        out["task_types"] = jnp.asarray([1, 0, 1], jnp.int32)
    return out


def _leaf_names(tree) -> set[str]:
    return {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_runs_forward_and_backward_through_its_hooks(base1, method):
    """Built, applied and differentiated from the registry entry alone; the declared facts hold:
    the router statistics sown are the declared kind, the layer router's decision is sown iff it has
    one, expert banks hold [E, D, r] matrices, and every kind of adapter weight gets a gradient."""
    spec = get_method(method)
    config, params, base_logits = base1
    ac = AdapterConfig(method=method, rank=2, num_experts=2, top_k=1)
    model = LlamaForCausalLM(config, ac)
    adapter = randomize(init_adapter(config, ac), seed=3)
    b = _batch(spec)

    def loss_fn(adapter):
        logits, state = model.apply({"params": params, "adapter": adapter}, b["input_ids"], b["attention_mask"],
                                    mutable=["intermediates"])
        inter = state.get("intermediates", {})  # plain LoRA sows nothing
        loss, metrics = total_loss(logits, b, inter, ac)
        return loss, (logits, inter, metrics)

    (loss, (logits, inter, metrics)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(adapter)
    assert logits.shape == (3, 8, config.vocab_size) and np.isfinite(float(loss))
    assert float(jnp.max(jnp.abs(logits - base_logits))) > 1e-4  # the adapter changed the output
    # the statistics the spec declares, and no other kind
    for kind, prefix in STATS_PREFIX.items():
        assert bool(router_stats(inter, prefix)) == (spec.router_stats == kind), (method, kind)
    assert (LAYER_ROUTING_KEY in inter) == (spec.layer_router is not None)
    if spec.expert_bank:
        for t in ac.targets:
            block = "mlp" if t in ("gate", "up", "down") else "self_attn"
            assert adapter["layers_0"][block][f"{t}_proj"]["lora_A"].shape[0] == 2  # [E, D, r]
    # every kind of adapter weight reaches the loss (a hook that drops one leaves its gradient 0)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(np.isfinite(np.asarray(g)).all() for _, g in flat)
    moved = {str(p[-1].key) for p, g in flat if float(jnp.max(jnp.abs(g))) > 0}
    assert moved == _leaf_names(adapter), (method, _leaf_names(adapter) - moved)
    # the balance terms that ran are among those the spec declares
    ran = {"switch_aux": "switch_coef", "importance_cv2": "importance_coef", "z_loss": "z_loss_coef",
           "loramoe_blc": "loramoe_coef", "milora_balance": "milora_coef"}
    assert {ran[k] for k in metrics if k in ran} <= set(spec.balance_terms)


# ----------------------------------------------------------------------------- a method in this file only
def _scaled_lora_adapt(linear, x, y, ctx):
    """LoRA with a learned scalar gain on its delta: y + gain * scale * x @ A @ B (gain starts at 1)."""
    ac = linear.adapter_config
    gain = layers.adapter_var(linear, "gain", nn.initializers.ones, (1,), (None,))
    delta = layers.lora_delta(linear, x, linear.features, linear.kernel_axes, ac, ctx, linear.dtype)
    return y + (gain[0] * delta).astype(y.dtype)


SCALED_LORA = MethodSpec(
    name="scaled_lora",
    paper="LoRA with a learned gain (a test method)",
    allowed_targets=("q", "k", "v", "o", "gate", "up", "down"),
    default_targets=("q", "v"),
    wraps="linears: LoRA times a learned scalar",
    adapt_linear=_scaled_lora_adapt,
    defaults={"router_init": "kaiming", "lora_init": "kaiming"},
)


@pytest.fixture
def scaled_lora():
    spec = register(SCALED_LORA)
    yield spec
    unregister(spec.name)


def test_a_method_defined_in_one_file_trains_with_no_other_edit(scaled_lora, tmp_path):
    """Registered here alone, "scaled_lora" is a valid AdapterConfig, builds its weights next to the kernels,
    gives plain LoRA's logits at gain 1 and the base's at gain 0, and `make_train_step` trains its gain."""
    config, params = tiny_base()
    ac = AdapterConfig(method="scaled_lora", rank=2)
    assert ac.targets == ("q", "v") and not ac.routed and "scaled_lora" in method_names()
    model = LlamaForCausalLM(config, ac)
    adapter = randomize(init_adapter(config, ac), seed=4)
    q = adapter["layers_0"]["self_attn"]["q_proj"]
    assert set(q) == {"lora_A", "lora_B", "gain"} and q["gain"].shape == (1,)
    ids, mask = batch(config, B=2, L=8)
    b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}

    def with_gain(g):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.full_like(x, g) if str(p[-1].key) == "gain" else x, adapter)

    lora_ac = AdapterConfig(method="lora", rank=2, target_modules=("q", "v"))
    plain = jax.tree_util.tree_map(lambda x: x, with_gain(1.0))
    for layer in plain.values():
        for leaf in layer["self_attn"].values():
            leaf.pop("gain")
    apply = jax.jit(lambda a: model.apply({"params": params, "adapter": a}, b["input_ids"], b["attention_mask"]))
    want = jax.jit(LlamaForCausalLM(config, lora_ac).apply)({"params": params, "adapter": plain}, b["input_ids"],
                                                             b["attention_mask"])
    # jit fuses the graphs differently: float32 rounding, <= 2.5e-7 measured (logits are ~0.1-0.4)
    np.testing.assert_allclose(np.asarray(apply(with_gain(1.0))), np.asarray(want), rtol=0, atol=1e-6)
    base_logits = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, b["input_ids"], b["attention_mask"])
    np.testing.assert_allclose(np.asarray(apply(with_gain(0.0))), np.asarray(base_logits), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(apply(with_gain(1.0)) - base_logits))) > 1e-4  # and the gain matters

    tx = optax.adam(5e-2)
    step = jax.jit(make_train_step(model, ac, tx, deterministic=True))
    state = TrainState.create(with_gain(1.0), tx)
    losses = []
    for _ in range(3):
        state, m = step(state, params, b)
        losses.append(float(m["loss"]))
    gains = [float(l["self_attn"][t]["gain"][0]) for l in state.adapter.values() for t in ("q_proj", "v_proj")]
    assert all(abs(g - 1.0) > 1e-3 for g in gains), gains  # the gain is trained
    assert losses[-1] < losses[0], losses
    # the native format holds it; PEFT's does not (the spec declares native only)
    from moe_lora_jax.adapters import load_adapter, save_adapter

    save_adapter(tmp_path / "a", state.adapter, ac, config)
    ac2, back = load_adapter(tmp_path / "a", config)
    assert ac2 == ac
    np.testing.assert_array_equal(back["layers_1"]["self_attn"]["v_proj"]["gain"], state.adapter["layers_1"]["self_attn"]["v_proj"]["gain"])
    with pytest.raises(MoeLoraError, match="PEFT's format holds plain LoRA, not scaled_lora"):
        save_adapter(tmp_path / "b", state.adapter, ac, config, format="peft")
    # no balance term applies to it; the unknown-method error lists it while it is registered
    assert all("scaled_lora" not in ms for ms in COEF_METHODS.values())
    assert resolve_objective(None, "scaled_lora").switch_coef == 0.0
    with pytest.raises(MoeLoraError, match="use one of lora, molora, mov, mola, loramoe, mixlora, milora, scaled_lora$"):
        AdapterConfig(method="no_such_method")


def test_registry_refuses_bad_specs_and_taken_names(scaled_lora):
    with pytest.raises(MoeLoraError, match="already registered"):
        register(SCALED_LORA.replace(paper="another"))
    with pytest.raises(AssertionError, match="default_targets"):
        SCALED_LORA.replace(name="bad", default_targets=("ffn",))
    with pytest.raises(AssertionError, match="routed method"):
        SCALED_LORA.replace(name="bad", routed=True)
    with pytest.raises(AssertionError, match="cannot be merged"):
        SCALED_LORA.replace(name="bad", routed=True, router_stats="token", mergeable=True)


def test_unknown_method_error_lists_the_registered_methods():
    with pytest.raises(MoeLoraError) as err:
        AdapterConfig(method="lorax")
    assert str(err.value) == "unknown adapter method 'lorax': use one of lora, molora, mov, mola, loramoe, mixlora, milora"
    with pytest.raises(MoeLoraError, match="unknown adapter method 'lorax'"):
        get_method("lorax")


# ----------------------------------------------------------------------------- derived tables
def test_objective_tables_are_derived_from_the_specs():
    assert dict(COEF_METHODS) == coef_methods()
    # the table as it was written by hand before the registry
    assert dict(COEF_METHODS) == {
        "switch_coef": ("mola", "mixlora", "milora"),
        "importance_coef": ("molora", "mov", "mola", "loramoe", "mixlora", "milora"),
        "z_loss_coef": ("molora", "mov", "mola", "loramoe", "mixlora", "milora"),
        "loramoe_coef": ("loramoe",),
        "milora_coef": ("milora",),
        "contrastive_coef": ("molora", "mola", "loramoe", "mixlora"),
    }
    assert dict(COEF_DEFAULTS) == {"switch_coef": {"mola": 1e-3, "mixlora": 1e-3}, "loramoe_coef": {"loramoe": 0.1},
                                   "milora_coef": {"milora": 1e-2}}


def test_the_docs_table_is_the_registry_table():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in doc.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in REGISTRY]
    assert rows == [list(r.values()) for r in registry_table()]


def test_declared_facts_of_the_builtin_methods():
    """What the call sites used to spell as name comparisons, now declared once per method."""
    facts = {n: (s.routed, s.router_stats, s.sparse_router, s.expert_bank, s.uses_allocation, s.mergeable,
                 s.export_formats, s.batch_needs, s.ffn is not None, s.ffn_activation is not None,
                 s.layer_router is not None) for n, s in REGISTRY.items()}
    assert facts == {
        "lora": (False, "none", False, False, False, True, ("native", "peft"), (), False, False, False),
        "molora": (True, "token", False, True, True, False, ("native",), (), False, False, False),
        "mov": (True, "token", False, False, True, False, ("native",), (), False, True, False),
        "mola": (True, "token", True, True, True, False, ("native",), (), False, False, False),
        "loramoe": (True, "token", False, True, True, False, ("native",), ("task_types",), False, False, False),
        "mixlora": (True, "token", True, False, False, False, ("native", "mixlora"), (), True, False, False),
        "milora": (True, "prompt", True, False, False, False, ("native",), ("prompt_mask",), False, False, True),
    }
    ac = AdapterConfig(method="mola", top_k=2)
    assert [get_method(n).routing_top_k(ac.replace(method=n)) for n in ("lora", "molora", "mola", "mixlora")] == [1, 1, 2, 2]
    # scanned layers: uniform parameter trees, or not (MoV with per-layer counts; MiLoRA with a deep activation)
    from moe_lora_jax.adapters.config import allocation_from_dict

    alloc = allocation_from_dict({"counts": {"k": [1, 2], "v": [2, 2]}})
    assert get_method("mov").layers_uniform(AdapterConfig(method="mov", target_modules=("k", "v"), allocation=alloc), 2) is False
    assert get_method("mov").layers_uniform(AdapterConfig(method="mov"), 2) is True
    assert get_method("milora").layers_uniform(AdapterConfig(method="milora", milora_activation_deep="gelu"), 2) is False
    assert get_method("milora").layers_uniform(AdapterConfig(method="milora", milora_activation_deep="rational"), 2) is True
    # every preset a spec names exists and sets that method (AlphaLoRA is MoLA with an allocation recipe)
    from moe_lora_jax.adapters.presets import PRESETS

    named = {p: n for n, s in REGISTRY.items() for p in s.presets}
    assert set(named) == set(PRESETS)
    assert all(PRESETS[p].values["method"] == n for p, n in named.items())
    assert [p.name for p in get_method("mola").paper_presets()] == ["mola", "alphalora"]
    assert get_method("loramoe").paper_presets()[0].values["num_experts"] == 8


def test_shared_code_names_no_method():
    """The model, the objective and the train step ask the registry; none compares or quotes a method name."""
    names = "|".join(method_names())
    quoted = re.compile(rf"""["']({names})["']""")
    compared = re.compile(r"\.method\s*(==|!=|\bin\b|\bnot in\b)")
    for rel in ("model/llama.py", "losses.py", "train/step.py"):
        text = (PACKAGE / rel).read_text()
        assert not quoted.findall(text), (rel, quoted.findall(text))
        assert not compared.search(text), rel
    for rel in ("train/loop.py", "adapters/io.py", "adapters/merge.py", "convert/loader.py", "adapters/config.py",
                "objective/weights.py"):
        assert not compared.search((PACKAGE / rel).read_text()), rel
