"""Adapters in and out: PEFT and mixlora exports load in PyTorch with our logits; every method
round-trips through the native format exactly; wrong base shapes and non-empty output dirs are refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import init_adapter, randomize
from conftest import make_hf_llama

from moe_lora_jax import LlamaForCausalLM, MoeLoraError, load_hf_llama
from moe_lora_jax.adapters import AdapterConfig, load_adapter, save_adapter
from moe_lora_jax.adapters.config import LINEAR_MODULES
from moe_lora_jax.allocation import Allocation

METHODS = ("lora", "molora", "mov", "mola", "loramoe", "mixlora", "milora")


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """(hf_dir, config, params) of a tiny random transformers LLaMA saved on disk."""
    hf_dir, _ = make_hf_llama(tmp_path_factory.mktemp("io_base"), seed=11)
    config, params = load_hf_llama(hf_dir)
    return hf_dir, config, params


def _ids_mask(config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids_BxL = rng.integers(3, config.vocab_size, size=(3, 15)).astype(np.int32)
    mask_BxL = np.ones_like(ids_BxL)
    mask_BxL[1, :4] = 0  # left padding
    return ids_BxL, mask_BxL


def _assert_trees_identical(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(g).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _jax_logits(config, params, ac, adapter, ids_BxL, mask_BxL) -> np.ndarray:
    return np.asarray(LlamaForCausalLM(config, ac).apply({"params": params, "adapter": adapter}, ids_BxL, mask_BxL))


# ------------------------------------------------------------------ PEFT
@pytest.mark.parametrize("ac", [
    AdapterConfig(method="lora", rank=4, alpha=8.0),
    AdapterConfig(method="lora", rank=3, alpha=6.0, use_rslora=True, target_modules=("q", "v", "o", "down")),
], ids=["all-seven", "subset-rslora"])
def test_peft_export_loads_in_peft_with_same_logits(tmp_path, hf_base, ac):
    import peft
    import torch
    import transformers

    hf_dir, config, params = hf_base
    adapter = randomize(init_adapter(config, ac), seed=5, scale=0.2)  # B != 0
    out = save_adapter(tmp_path / "peft", adapter, ac, config, format="peft")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    torch_base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pmodel = peft.PeftModel.from_pretrained(torch_base, str(out)).eval()
    ids_BxL, mask_BxL = _ids_mask(config)
    with torch.no_grad():
        ref = pmodel(input_ids=torch.tensor(ids_BxL), attention_mask=torch.tensor(mask_BxL)).logits.numpy()
    ours = _jax_logits(config, params, ac, adapter, ids_BxL, mask_BxL)
    base = np.asarray(LlamaForCausalLM(config).apply({"params": params}, ids_BxL, mask_BxL))
    valid = mask_BxL.astype(bool)
    assert np.abs(ours - base)[valid].max() > 1e-2  # the adapter really changes the logits
    assert np.abs(ours - ref)[valid].max() <= 1e-4

    ac_back, adapter_back = load_adapter(out, config)
    _assert_trees_identical(adapter_back, adapter)
    # PEFT's format spells the targets out, so they come back explicit
    assert ac_back == ac.replace(target_modules=ac.targets)


def test_peft_export_refuses_expert_methods(tmp_path, hf_base):
    _, config, _ = hf_base
    ac = AdapterConfig(method="mola", rank=2, num_experts=2, top_k=1)
    with pytest.raises(MoeLoraError, match="PEFT's format holds plain LoRA, not mola"):
        save_adapter(tmp_path / "x", init_adapter(config, ac), ac, config, format="peft")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ mixlora
def _eval_mixlora_experts(model) -> None:
    """mixlora keeps experts in a plain dict that `.eval()` does not reach: switch their dropout off."""
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()


def test_mixlora_export_loads_in_mixlora_with_same_logits(tmp_path, hf_base):
    import torch
    from mixlora import MixLoraModelForCausalLM

    hf_dir, config, params = hf_base
    ac = AdapterConfig(method="mixlora", rank=4, alpha=8.0, dropout=0.05, num_experts=4, top_k=2)
    adapter = randomize(init_adapter(config, ac), seed=6, scale=0.3)
    out = save_adapter(tmp_path / "mixlora", adapter, ac, config, format="mixlora", base_model_name_or_path=str(hf_dir))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.bin"]

    # the package's own entry point: reads our config + weights, loads the base from base_model_name_or_path
    tmodel, _ = MixLoraModelForCausalLM.from_pretrained(str(out))
    tmodel.eval()
    _eval_mixlora_experts(tmodel)
    ids_BxL = np.random.default_rng(1).integers(3, config.vocab_size, size=(2, 14)).astype(np.int32)
    with torch.no_grad():
        ref = tmodel(input_ids=torch.tensor(ids_BxL)).logits.float().numpy()
    ours = np.asarray(LlamaForCausalLM(config, ac).apply({"params": params, "adapter": adapter}, ids_BxL))
    base = np.asarray(LlamaForCausalLM(config).apply({"params": params}, ids_BxL))
    assert np.abs(ours - base).max() > 1e-2
    assert np.abs(ours - ref).max() <= 1e-4

    ac_back, adapter_back = load_adapter(out, config)
    _assert_trees_identical(adapter_back, adapter)
    assert ac_back == ac.replace(target_modules=LINEAR_MODULES)


def test_mixlora_export_refuses_what_the_package_cannot_read(tmp_path, hf_base):
    _, config, _ = hf_base
    for ac, message in [
        (AdapterConfig(method="mixlora", rank=2, dropout=0.0, num_experts=2, top_k=1), "refuses lora_dropout=0"),
        (AdapterConfig(method="mixlora", rank=2, alpha=2.5, dropout=0.05, num_experts=2, top_k=1), "integer lora_alpha"),
        (AdapterConfig(method="mixlora", rank=2, dropout=0.05, num_experts=2, top_k=1), "renormalize='always'"),
    ]:
        with pytest.raises(MoeLoraError, match=message):
            save_adapter(tmp_path / "x", init_adapter(config, ac), ac, config, format="mixlora")
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ native
def _mola_allocation(num_layers: int) -> Allocation:
    assert num_layers == 2
    counts = {"q": (2, 5), "k": (3, 1), "v": (4, 2), "o": (1, 3), "gate": (2, 2), "up": (5, 1), "down": (3, 4)}
    return Allocation.from_counts(counts, method="manual", provenance={"note": "io test"})


def _native_config(method: str, num_layers: int) -> AdapterConfig:
    """Each method with some non-default options, so the config round-trip is not trivially the default."""
    extra = {
        "lora": dict(use_rslora=True, target_modules=("q", "k", "down")),
        "molora": dict(num_experts=3, router_init_range=0.05),
        "mov": dict(num_experts=3, target_modules=("v", "ffn")),
        "mola": dict(top_k=1, allocation=_mola_allocation(num_layers), renormalize="always"),
        "loramoe": dict(num_experts=4, lora_init="normal"),
        "mixlora": dict(num_experts=3, top_k=2, dropout=0.05, router_jitter=0.01),
        "milora": dict(top_k=3, milora_pooling="max", milora_router_dim=16),
    }[method]
    return AdapterConfig(method=method, rank=3, alpha=5.0, **extra)


@pytest.mark.parametrize("method", METHODS)
def test_native_format_round_trips_every_method(tmp_path, hf_base, method):
    _, config, _ = hf_base
    ac = _native_config(method, config.num_hidden_layers)
    adapter = randomize(init_adapter(config, ac), seed=7, scale=0.2)
    out = save_adapter(tmp_path / method, adapter, ac, config)  # native is the default format
    ac_back, adapter_back = load_adapter(out, config)
    assert ac_back == ac and hash(ac_back) == hash(ac)
    _assert_trees_identical(adapter_back, adapter)
    if method == "mola":  # the per-layer counts, not just equality of the Allocation objects
        for m in LINEAR_MODULES:
            assert ac_back.allocation.counts(m) == ac.allocation.counts(m)
            assert adapter_back["layers_1"]["self_attn" if m in ("q", "k", "v", "o") else "mlp"][f"{m}_proj"][
                "lora_A"].shape == (ac.allocation.counts(m)[1], config.hidden_size if m != "down" else
                                    config.intermediate_size, 3)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("fmt, ac, change, message", [
    ("native", AdapterConfig(method="lora", rank=4), dict(hidden_size=64, head_dim=16),
     "tensor layers_0/mlp/down_proj/lora_B has shape (4, 48) but this base model needs (4, 64)"),
    ("peft", AdapterConfig(method="lora", rank=4), dict(intermediate_size=80),
     "tensor layers_0/mlp/down_proj/lora_A has shape (70, 4) but this base model needs (80, 4)"),
    ("mixlora", AdapterConfig(method="mixlora", rank=4, dropout=0.05, num_experts=2, top_k=1, renormalize="always"),
     dict(intermediate_size=80), "tensor layers_0/mlp/down_proj/lora_A has shape (2, 70, 4) but this base model needs (2, 80, 4)"),
    ("native", AdapterConfig(method="lora", rank=4), dict(num_hidden_layers=3),
     "lacks the tensor layers_2/"),
], ids=["native-hidden", "peft-ffn", "mixlora-ffn", "native-layers"])
def test_adapter_for_another_base_shape_is_one_clear_error(tmp_path, hf_base, fmt, ac, change, message):
    _, config, _ = hf_base
    out = save_adapter(tmp_path / fmt, init_adapter(config, ac), ac, config, format=fmt)
    with pytest.raises(MoeLoraError) as err:
        load_adapter(out, config.replace(**change))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_save_refuses_non_empty_dir_and_leaves_it_untouched(tmp_path, hf_base, fmt):
    _, config, _ = hf_base
    ac = AdapterConfig(method="lora", rank=2)
    adapter = init_adapter(config, ac)
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(MoeLoraError, match="already exists and is not empty"):
        save_adapter(target, adapter, ac, config, format=fmt)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no partial sibling left behind
    # an existing but empty directory is a fine destination
    (tmp_path / "empty").mkdir()
    save_adapter(tmp_path / "empty", adapter, ac, config, format=fmt)
    assert (tmp_path / "empty" / "adapter_config.json").is_file()
