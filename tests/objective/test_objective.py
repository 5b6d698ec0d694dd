"""The objective section: loss weights apart from the adapter (config, presets, checkpoint identity)."""

from __future__ import annotations

import pytest

from moe_lora_jax import MoeLoraError
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.presets import apply_preset, format_presets, presets_as_dict, preset_objective
from moe_lora_jax.objective import Objective, resolve_objective
from moe_lora_jax.train.checkpoint import CheckpointStore, resume_changes
from moe_lora_jax.train.config import dump_config, load_config
from moe_lora_jax.train.loop import _refuse_adapter_weights, run_objective

# An adapter_config.json as the library wrote it while loss weights were adapter fields.
OLD_MOLA = {
    "method": "mola", "rank": 4, "alpha": 16.0, "dropout": 0.0, "target_modules": None, "num_experts": 3, "top_k": 2,
    "allocation": None, "use_rslora": False, "renormalize": True, "router_init": None, "router_init_range": 0.02,
    "router_jitter": 0.0, "loramoe_delta": 0.1, "milora_pooling": "attention", "milora_router_dim": 64,
    "switch_coef": None, "switch_form": None, "importance_coef": 0.0, "z_loss_coef": 0.0, "loramoe_coef": 0.1,
    "milora_coef": 0.01, "milora_activation": "rational", "milora_activation_deep": None, "mov_routing": "head",
    "lora_init": None, "contrastive_coef": 0.0, "contrastive_temperature": 0.07, "loramoe_form": "code",
}


def test_objective_section_from_yaml_and_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("adapter:\n  method: mola\nobjective:\n  switch_coef: 2e-3\n  switch_form: mixtral\n")
    cfg = load_config(path, ["objective.z_loss_coef=1e-3"])
    assert cfg.objective == Objective(switch_coef=2e-3, switch_form="mixtral", z_loss_coef=1e-3)
    obj = run_objective(cfg, "mola")
    assert (obj.switch_coef, obj.switch_form, obj.z_loss_coef, obj.importance_coef, obj.loramoe_coef) == (
        2e-3, "mixtral", 1e-3, 0.0, 0.0)
    assert "objective:\n  switch_coef: 0.002" in dump_config(cfg)  # the resolved config.yaml records the section
    with pytest.raises(MoeLoraError, match="unknown config key 'objective.z_loss'"):
        load_config(None, ["objective.z_loss=1"])
    with pytest.raises(MoeLoraError, match=r"objective.z_loss_coef=-1.0 is negative"):
        load_config(None, ["objective.z_loss_coef=-1"])
    with pytest.raises(MoeLoraError, match=r"objective.switch_coef=0.1 does not apply to method lora \(only to mola"):
        run_objective(load_config(None, ["objective.switch_coef=0.1"]), "lora")


def test_adapter_section_weights_are_refused_naming_the_new_key():
    with pytest.raises(MoeLoraError) as e:
        _refuse_adapter_weights(load_config(None, ["adapter.method=mola", "adapter.switch_coef=1e-3"]).adapter)
    msg = str(e.value)
    assert "\n" not in msg and "adapter.switch_coef" in msg and "objective.switch_coef" in msg
    with pytest.raises(TypeError):  # not an adapter field any more
        AdapterConfig(method="mola", z_loss_coef=1e-3)


def test_presets_carry_objective_defaults_that_the_section_overrides():
    assert "switch_coef" not in apply_preset({"preset": "mixlora"})
    assert preset_objective({"preset": "mixlora"}) == {"switch_coef": 1e-3}
    assert preset_objective({"preset": "mola"}) == {"switch_coef": 0.0}  # MoLA's released commands: off
    cfg = load_config(None, ["adapter.preset=mola"])
    assert run_objective(cfg, "mola").switch_coef == 0.0  # the preset's value, not the library default 1e-3
    assert run_objective(cfg.replace(objective=Objective(switch_coef=5e-3)), "mola").switch_coef == 5e-3
    assert resolve_objective(None, "mola").switch_coef == 1e-3
    listing = format_presets()
    assert "  objective.switch_coef = 0.001  # TUDB-Labs/MoE-PEFT" in listing
    assert presets_as_dict()["mixlora"]["objective"] == {"switch_coef": 1e-3}
    assert "switch_coef" not in presets_as_dict()["mixlora"]["values"]


def test_identity_holds_shapes_and_routing_only(tmp_path):
    """An old checkpoint (weights in its adapter_config) resumes under a run with other weights and dropout;
    the changes are listed; a changed rank is still refused, naming the field."""
    new_ac = AdapterConfig.from_dict(OLD_MOLA).replace(dropout=0.1)
    assert AdapterConfig.from_dict(OLD_MOLA) == AdapterConfig(method="mola", rank=4, num_experts=3)
    new_meta = {"adapter_config": new_ac.to_dict(), "objective": resolve_objective({"z_loss_coef": 1e-3}, "mola").to_dict()}
    store = CheckpointStore(tmp_path / "ck", async_save=False, meta=new_meta)
    try:
        store._check_identity({"adapter_config": OLD_MOLA}, tmp_path)  # no error: same shapes and routing
        assert resume_changes({"adapter_config": OLD_MOLA}, new_meta) == [
            "objective.z_loss_coef 0.0 -> 0.001", "adapter.dropout 0.0 -> 0.1"]
        with pytest.raises(MoeLoraError, match=r"adapter.rank 8 -> 4.*nothing was written") as e:
            store._check_identity({"adapter_config": {**OLD_MOLA, "rank": 8}}, tmp_path)
        assert "z_loss" not in str(e.value) and "dropout" not in str(e.value)
    finally:
        store.close()
