"""MoV per-head routing, MoLoRA's initialisation, and the paper presets (`adapter.preset`, `info --presets`)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import adapter_shapes, batch, tiny_base
from conftest import init_adapter as filled_adapter

from moe_lora_jax import LlamaForCausalLM, MoeLoraError
from moe_lora_jax.adapters import AdapterConfig, load_adapter, save_adapter
from moe_lora_jax.adapters.layers import AdapterContext, expert_bank_delta, ia3_head_mixture
from moe_lora_jax.adapters.presets import PRESETS, apply_preset
from moe_lora_jax.cli import main as cli_main
from moe_lora_jax.losses import router_stats
from moe_lora_jax.objective import OBJECTIVE_FIELDS
from moe_lora_jax.train.config import load_config
from moe_lora_jax.train.loop import adapter_config_from


@pytest.fixture(scope="module")
def base():
    return tiny_base()


# ----------------------------------------------------------------------------- MoV per head
class _HeadMoV(nn.Module):
    cfg: AdapterConfig
    heads: int
    experts: int

    @nn.compact
    def __call__(self, y):
        return ia3_head_mixture(self, y, self.heads, self.experts, self.cfg, AdapterContext())


def test_mov_per_head_equals_a_per_head_loop():
    K, H, E = 3, 5, 4
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 6, K * H)).astype(np.float32)
    mod = _HeadMoV(AdapterConfig(method="mov", num_experts=E), K, E)
    shapes = nn.unbox(jax.eval_shape(mod.init, jax.random.key(0), y)["adapter"])
    assert shapes["ia3"].shape == (K, E, H) and shapes["router"].shape == (H, E)
    v = (1.0 + 0.5 * rng.normal(size=(K, E, H))).astype(np.float32)
    w = rng.normal(size=(H, E)).astype(np.float32)
    out, state = mod.apply({"adapter": {"ia3": v, "router": w}}, y, mutable=["intermediates"])
    want = np.empty_like(y)
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            for k in range(K):
                head = y[b, t, k * H:(k + 1) * H].astype(np.float64)
                logits = head @ w
                p = np.exp(logits - logits.max())
                p /= p.sum()
                want[b, t, k * H:(k + 1) * H] = head * (p @ v[k])
    assert float(np.abs(np.asarray(out) - want).max()) <= 1e-6
    # statistics read heads-first: [K, B, L, E]
    assert state["intermediates"]["router_gates"][0].shape == (K, 2, 6, E)


def test_mov_default_routes_kv_per_head_and_token_stays_an_option(base):
    config, params = base
    K, H, E = config.num_key_value_heads, config.head_dim, 3
    head = AdapterConfig(method="mov", num_experts=E)
    assert head.mov_routing == "head"
    for ac, kv_shapes in ((head, ((K, E, H), (H, E))), (head.replace(mov_routing="token"), ((E, K * H), (K * H, E)))):
        shapes = adapter_shapes(config, ac)
        k = shapes["layers_0"]["self_attn"]["k_proj"]
        assert (k["ia3"].shape, k["router"].shape) == kv_shapes
        ffn = shapes["layers_0"]["mlp"]["ffn_ia3"]  # the FFN keeps one route per token, as the reference's MoV
        assert ffn["ia3"].shape == (E, config.intermediate_size)
    # vectors at 1 and random routers: the model is the base model, whatever the routers say
    ids, mask = batch(config)
    adapter = filled_adapter(config, head)
    ours, state = LlamaForCausalLM(config, head).apply({"params": params, "adapter": adapter}, ids, mask,
                                                        mutable=["intermediates"])
    ref = LlamaForCausalLM(config).apply({"params": params}, ids, mask)
    assert float(jnp.abs(ours - ref)[mask.astype(bool)].max()) <= 2e-6
    stats = router_stats(state)
    assert len(stats) == 3 * config.num_hidden_layers
    for s in stats:
        np.testing.assert_allclose(np.asarray(s.gates).sum(-1), 1.0, atol=1e-6)
    with pytest.raises(MoeLoraError, match="mov_routing"):
        AdapterConfig(method="mov", mov_routing="layer")


def test_mov_adapter_saved_before_per_head_routing_still_loads(tmp_path, base):
    config, _ = base
    ac = AdapterConfig(method="mov", num_experts=3, mov_routing="token")
    adapter = filled_adapter(config, ac)
    out = save_adapter(tmp_path / "old", adapter, ac, config)
    meta = json.loads((out / "adapter_config.json").read_text())
    del meta["adapter_config"]["mov_routing"], meta["adapter_config"]["lora_init"]  # as an older version wrote it
    (out / "adapter_config.json").write_text(json.dumps(meta))
    loaded, tree = load_adapter(out, config)  # checks every tensor's shape against the config it reads
    assert loaded.mov_routing == "token"
    assert tree["layers_0"]["self_attn"]["v_proj"]["ia3"].shape == (3, config.num_key_value_heads * config.head_dim)


# ----------------------------------------------------------------------------- MoLoRA init
class _Bank(nn.Module):
    cfg: AdapterConfig
    experts: int

    @nn.compact
    def __call__(self, x):
        return expert_bank_delta(self, x, 8, ("embed", "mlp"), self.experts, self.cfg, AdapterContext(), jnp.float32, None)


def _bank_init(method: str, D: int = 256, E: int = 16, r: int = 16) -> dict:
    x = jnp.zeros((1, 2, D), jnp.float32)
    init = jax.jit(_Bank(AdapterConfig(method=method, rank=r), E).init)  # one compile instead of op-by-op
    return nn.unbox(init(jax.random.key(7), x)["adapter"])


def test_molora_router_and_a_start_normal_002_and_b_zero():
    w = _bank_init("molora")  # the expert bank MoLoRA's linears call, with MoLoRA's method defaults
    a, router, b = (np.asarray(w[n]).ravel() for n in ("lora_A", "router", "lora_B"))
    assert a.size == 16 * 256 * 16 and router.size == 256 * 16
    # a uniform +-1/sqrt(256) draw (PEFT's kaiming) would have std 0.036 and no value beyond 0.0625
    assert abs(float(a.std()) - 0.02) < 0.02 * 0.03 and abs(float(a.mean())) < 5e-4
    assert abs(float(router.std()) - 0.02) < 0.02 * 0.06 and abs(float(router.mean())) < 2e-3
    assert float(np.abs(a).max()) > 0.07  # normal tails
    assert not np.any(b)
    # MoLA's code keeps PEFT's init for both, so its bank is unchanged
    mola = _bank_init("mola")
    assert float(np.abs(mola["lora_A"]).max()) <= 1 / 16 and float(np.abs(mola["router"]).max()) <= 1 / 16
    assert abs(float(np.asarray(mola["lora_A"]).std()) - 1 / 16 / np.sqrt(3)) < 0.002


# ----------------------------------------------------------------------------- presets
def _plain(v):
    return list(v) if isinstance(v, tuple) else v


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"mola", "alphalora"}))
def test_preset_values_reach_the_adapter_config(name):
    from moe_lora_jax.adapters.presets import preset_objective
    from moe_lora_jax.objective import OBJECTIVE_FIELDS, resolve_objective

    ac = AdapterConfig(**apply_preset({"preset": name}, num_layers=2))
    objective = resolve_objective(None, ac.method, preset_objective({"preset": name}))
    for key, value in PRESETS[name].values.items():  # loss weights reach the objective, the rest the adapter
        assert _plain(getattr(objective if key in OBJECTIVE_FIELDS else ac, key)) == _plain(value), key


def test_preset_allocation_recipes_and_key_by_key_override(base):
    config, params = base
    ac = adapter_config_from({"preset": "mola", "rank": 4, "dropout": 0.1}, params, config)
    from moe_lora_jax.train.loop import run_objective

    switch = run_objective(load_config(None, ["adapter.preset=mola"]), ac.method).switch_coef
    assert (ac.method, ac.rank, ac.alpha, ac.dropout, ac.top_k, switch) == ("mola", 4, 16.0, 0.1, 2, 0.0)
    counts = ac.expert_counts("q", config.num_hidden_layers)
    assert sum(counts) == 5 * config.num_hidden_layers and counts[0] < counts[-1]  # more experts higher up
    alpha = apply_preset({"preset": "AlphaLoRA"}, num_layers=30)
    assert alpha["allocation"] == {"method": "alphalora", "beta": 2.5, "total": 150}
    own = apply_preset({"preset": "alphalora", "allocation": {"method": "uniform", "total": 8}}, num_layers=30)
    assert own["allocation"] == {"method": "uniform", "total": 8} and own["rank"] == 8


def test_preset_from_yaml_and_set_overrides(tmp_path, base):
    config, params = base
    path = tmp_path / "run.yaml"
    path.write_text("adapter:\n  preset: mixlora\n  num_experts: 4\n")
    raw = load_config(path, ["adapter.rank=4"]).adapter
    ac = adapter_config_from(raw, params, config)
    assert (ac.method, ac.rank, ac.alpha, ac.num_experts, ac.top_k, ac.dropout) == ("mixlora", 4, 32.0, 4, 2, 0.05)
    assert "preset" not in ac.to_dict()  # the saved adapter records values, not the preset's name


def test_unknown_preset_is_one_line_naming_the_presets():
    with pytest.raises(MoeLoraError) as e:
        apply_preset({"preset": "moela"}, num_layers=2)
    msg = str(e.value)
    assert "\n" not in msg and "'moela'" in msg and all(n in msg for n in PRESETS)


def test_info_presets_lists_every_preset_with_its_values(capsys):
    assert cli_main(["info", "--presets"]) == 0
    listed: dict[str, dict] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("preset "):
            current = line.split()[1].rstrip(":")
            listed[current] = {}
        elif current and line.startswith("  ") and " = " in line and "  # " in line:
            key, rest = line.strip().split(" = ", 1)
            value, source = rest.split("  # ", 1)
            assert source.strip()
            listed[current][key] = json.loads(value)
    assert set(listed) == set(PRESETS)
    for name, preset in PRESETS.items():
        assert listed[name] == {(f"objective.{k}" if k in OBJECTIVE_FIELDS else k): _plain(v) for k, v in preset.values.items()}
    assert cli_main(["info", "--presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(PRESETS) and data["mixlora"]["values"]["num_experts"] == 8
    assert set(data["loramoe"]["sources"]) == set(data["loramoe"]["values"])
    assert data["mixlora"]["objective"] == {"switch_coef": 1e-3} and "switch_coef" not in data["mixlora"]["values"]


def test_checkpoint_written_before_the_new_fields_still_resumes(tmp_path):
    from moe_lora_jax.train.checkpoint import CheckpointStore

    for ac, same in ((AdapterConfig(method="molora", rank=4), True),
                     (AdapterConfig(method="mov", mov_routing="token"), True),
                     (AdapterConfig(method="mov"), False)):  # per-head vectors: not the old per-token tensors
        old = ac.replace(mov_routing="token").to_dict() if ac.method == "mov" else ac.to_dict()
        del old["mov_routing"], old["lora_init"]  # as the previous version wrote its metadata
        store = CheckpointStore.__new__(CheckpointStore)
        store.meta = {"adapter_config": ac.to_dict()}
        if same:
            store._check_identity({"adapter_config": old}, tmp_path)
        else:
            with pytest.raises(MoeLoraError, match="another adapter"):
                store._check_identity({"adapter_config": old}, tmp_path)
