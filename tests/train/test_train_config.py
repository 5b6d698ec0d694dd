"""TrainConfig: YAML loading, typed dotted overrides, errors on unknown keys, resolved dumps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.train.config import (
    MeshConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_resolved,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments" / "configs" / "quickstart.yaml"


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_sections():
    c = load_config()
    assert c == TrainConfig()
    assert c.model.path is None and c.data.template == "alpaca" and c.mesh == MeshConfig(-1, 1, 1)
    assert c.adapter == {}


def test_yaml_values_are_typed_by_field(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; the field type makes it a float.
    path = write_yaml(
        tmp_path / "c.yaml",
        "optim:\n  lr: 3e-4\n  clip_norm: null\nloop:\n  steps: '120'\nmodel:\n  remat: 'yes'\n",
    )
    c = load_config(path)
    assert c.optim.lr == pytest.approx(3e-4) and isinstance(c.optim.lr, float)
    assert c.optim.clip_norm is None
    assert c.loop.steps == 120 and isinstance(c.loop.steps, int)
    assert c.model.remat == "full"  # an old config's boolean: full recomputation


def test_dotted_overrides_are_typed(tmp_path):
    c = load_config(
        QUICKSTART,
        [
            "optim.lr=5e-4",
            "loop.steps=42",
            "model.remat=true",
            "model.path=/models/llama",
            "optim.router_lr=1e-2",
            "optim.clip_norm=null",
            "data.template=alpaca",
            "mesh.fsdp=2",
            "optim.no_decay_patterns=[bias, norm]",
        ],
    )
    assert c.optim.lr == pytest.approx(5e-4)
    assert c.loop.steps == 42
    assert c.model.remat == "full" and c.model.path == "/models/llama"
    assert c.optim.router_lr == pytest.approx(1e-2) and c.optim.clip_norm is None
    assert c.data.template == "alpaca" and c.mesh.fsdp == 2
    assert c.optim.no_decay_patterns == ("bias", "norm")
    # the file's other values survive
    assert c.loop.global_batch == 16 and c.adapter["method"] == "mola"


def test_adapter_section_is_free_form():
    c = load_config(QUICKSTART, ["adapter.top_k=1", "adapter.router.jitter=0.01", "adapter.target_modules=[q, k]",
                                 "adapter.allocation.total=60"])
    assert c.adapter["top_k"] == 1
    assert c.adapter["router"] == {"jitter": 0.01}
    assert c.adapter["target_modules"] == ["q", "k"]
    assert c.adapter["allocation"] == {"method": "alphalora", "total": 60, "beta": 2.5, "estimator": "fix-finger",
                                       "rounding": "alphalora"}  # the file's recipe, one key overridden


def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(MoeLoraError, match=r"'optim.lrr'.*lr, warmup_steps"):
        load_config(None, ["optim.lrr=1e-3"])
    with pytest.raises(MoeLoraError, match=r"'optimizer'.*model, data, optim"):
        load_config(None, ["optimizer.lr=1e-3"])
    path = write_yaml(tmp_path / "bad.yaml", "loop:\n  stepz: 10\n")
    with pytest.raises(MoeLoraError, match=r"'loop.stepz'.*steps, global_batch"):
        load_config(path)


def test_bad_values_are_rejected(tmp_path):
    with pytest.raises(MoeLoraError, match="loop.steps='abc' is not an integer"):
        load_config(None, ["loop.steps=abc"])
    with pytest.raises(MoeLoraError, match="data.template='jinja' is not allowed: use one of alpaca, chat"):
        load_config(None, ["data.template=jinja"])
    with pytest.raises(MoeLoraError, match="model.remat='maybe' is not a remat policy"):
        load_config(None, ["model.remat=maybe"])
    with pytest.raises(MoeLoraError, match="no '='"):
        load_config(None, ["optim.lr"])
    with pytest.raises(MoeLoraError, match="more than one -1"):
        load_config(None, ["mesh.fsdp=-1"])
    with pytest.raises(MoeLoraError, match="not divisible by loop.grad_accum=3"):
        load_config(None, ["loop.global_batch=16", "loop.grad_accum=3"])
    with pytest.raises(MoeLoraError, match="optim.lr=-1.0 must be positive"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(MoeLoraError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(MoeLoraError, match="must hold a mapping"):
        load_config(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(MoeLoraError, match="optim must be a mapping"):
        config_from_dict({"optim": 3})


def test_overrides_do_not_mutate_input():
    raw = {"optim": {"lr": 1.0}}
    out = apply_overrides(raw, ["optim.lr=2.0"])
    assert raw == {"optim": {"lr": 1.0}} and out["optim"]["lr"] == "2.0"


def test_save_resolved_round_trips_and_never_overwrites(tmp_path):
    c = load_config(QUICKSTART, ["optim.lr=7e-4", "adapter.top_k=2"])
    path = save_resolved(c, tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_config(path) == c
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == pytest.approx(7e-4)
    first = path.read_text()
    assert save_resolved(c, tmp_path / "run") == path  # same content: left alone
    changed = c.replace(loop=c.loop.__class__(steps=5))
    second = save_resolved(changed, tmp_path / "run")
    assert second.name == "config-1.yaml" and path.read_text() == first
    assert load_config(second).loop.steps == 5


def test_quickstart_config_is_complete():
    raw = yaml.safe_load(QUICKSTART.read_text())
    c = load_config(QUICKSTART)
    # every dataclass field is spelled out in the example file
    assert set(raw) == set(config_to_dict(c))
    for section in ("model", "data", "optim", "mesh", "checkpoint", "loop"):
        assert set(raw[section]) == set(config_to_dict(c)[section]), section
    assert c.data.train is None and c.data.template == "chat" and c.loop.steps == 40
