"""Weights in and out: round trips, sharded and bfloat16 checkpoints, and every bad input's error."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import torch_logits

from moe_lora_jax import LlamaForCausalLM, MoeLoraError, load_hf_llama, save_hf_llama
from moe_lora_jax.cli import main as cli_main
from moe_lora_jax.convert import load_llama, save_orbax_llama
from moe_lora_jax.convert.names import tensor_specs


def _ids(config, n=20):
    return np.random.default_rng(0).integers(3, config.vocab_size, size=(2, n)).astype(np.int32)


def test_round_trip_is_exact(hf_llama_factory, tmp_path):
    import torch
    import transformers

    hf_dir, torch_model = hf_llama_factory(seed=1)
    config, params = load_hf_llama(hf_dir)
    out = save_hf_llama(config, params, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = _ids(config)
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(torch_model, ids))
    # and back into JAX: bit-identical params
    _, params2 = load_hf_llama(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_sharded_checkpoints_both_ways(hf_llama_factory, tmp_path):
    hf_dir, torch_model = hf_llama_factory(seed=2, max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").exists()
    config, params = load_hf_llama(hf_dir)
    ids = _ids(config)
    ours = np.asarray(jax.jit(LlamaForCausalLM(config).apply)({"params": params}, jnp.asarray(ids)))
    assert np.abs(ours - torch_logits(torch_model, ids)).max() <= 1e-4

    out = save_hf_llama(config, params, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert set(index["weight_map"]) == {s.hf_name for s in tensor_specs(config)}
    _, params2 = load_hf_llama(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_checkpoint_loads(hf_llama_factory):
    import torch

    hf_dir, torch_model = hf_llama_factory(seed=3, dtype="bfloat16")
    config, params = load_hf_llama(hf_dir)  # float32 by default: bfloat16 widens exactly
    expected = torch_model.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(params["layers_0"]["mlp"]["up_proj"]["kernel"], expected)
    _, params_bf16 = load_hf_llama(hf_dir, param_dtype="bfloat16")
    assert params_bf16["embed_tokens"]["embedding"].dtype == jnp.bfloat16


def test_orbax_round_trip(hf_llama_factory, tmp_path):
    hf_dir, _ = hf_llama_factory(seed=4, tie_word_embeddings=True)
    config, params = load_hf_llama(hf_dir)
    save_orbax_llama(config, params, tmp_path / "orbax")
    config2, params2 = load_llama(tmp_path / "orbax")
    assert config2 == config
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------- bad input
def _edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_tensors(hf_dir, edit):
    from safetensors.numpy import load_file, save_file

    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sliding_window=4096, use_sliding_window=True), "sliding_window=4096"),
        (dict(num_local_experts=8), "mixture-of-experts base"),
        (dict(attention_bias=True), "bias terms"),
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    ],
)
def test_unsupported_architecture_names_the_field(hf_llama_factory, change, message):
    hf_dir, _ = hf_llama_factory()
    _edit_config(hf_dir, **change)
    with pytest.raises(MoeLoraError, match="unsupported architecture") as info:
        load_hf_llama(hf_dir)
    assert message in str(info.value)


def test_bad_checkpoints_get_one_clear_error(hf_llama_factory, tmp_path):
    hf_dir, _ = hf_llama_factory()
    name = "model.layers.1.mlp.down_proj.weight"

    missing_config = tmp_path / "no_config"
    shutil.copytree(hf_dir, missing_config)
    (missing_config / "config.json").unlink()
    with pytest.raises(MoeLoraError, match="config.json is missing"):
        load_hf_llama(missing_config)

    cases = {
        "missing": (lambda t: t.pop(name), f"tensor {name} is missing"),
        "shape": (lambda t: t.__setitem__(name, t[name][:, :-1].copy()), f"tensor {name} in model.safetensors has shape"),
        "nan": (lambda t: t[name].__setitem__((0, 0), np.nan), f"tensor {name} in model.safetensors holds NaN"),
        "bias": (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(48, np.float32)), "bias terms"),
    }
    for case, (edit, message) in cases.items():
        broken = tmp_path / case
        shutil.copytree(hf_dir, broken)
        _rewrite_tensors(broken, edit)
        with pytest.raises(MoeLoraError) as info:
            load_hf_llama(broken)
        assert message in str(info.value), case
        assert "\n" not in str(info.value)

    truncated = tmp_path / "truncated"
    shutil.copytree(hf_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeLoraError, match="model.safetensors is unreadable .* truncated or corrupt"):
        load_hf_llama(truncated)

    with pytest.raises(MoeLoraError, match="does not exist"):
        load_hf_llama(tmp_path / "nowhere")


def test_saving_never_overwrites_or_leaves_partial_output(hf_llama_factory, tmp_path):
    hf_dir, _ = hf_llama_factory()
    config, params = load_hf_llama(hf_dir)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(MoeLoraError, match="already exists and is not empty"):
        save_hf_llama(config, params, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    bad = jax.tree.map(lambda x: x, params)
    bad["layers_1"]["mlp"]["down_proj"]["kernel"] = bad["layers_1"]["mlp"]["down_proj"]["kernel"].at[0, 0].set(jnp.inf)
    with pytest.raises(MoeLoraError, match="layers_1/mlp/down_proj/kernel holds NaN or Inf"):
        save_hf_llama(config, bad, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "hf0"]  # no partial directory left

    wrong = jax.tree.map(lambda x: x, params)
    wrong["norm"]["scale"] = jnp.ones(7)
    with pytest.raises(MoeLoraError, match=r"norm/scale has shape \(7,\), expected \(48,\)"):
        save_hf_llama(config, wrong, tmp_path / "never")


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["info", "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-lora info: error:") and "config.json is missing" in err
    assert len(err.splitlines()) == 1


def test_cli_convert_to_orbax_and_back(hf_llama_factory, tmp_path, capsys):
    import torch
    import transformers

    hf_dir, torch_model = hf_llama_factory(seed=5)
    assert cli_main(["convert", "--model", str(hf_dir), "--out", str(tmp_path / "orbax")]) == 0
    assert cli_main(["convert", "--model", str(tmp_path / "orbax"), "--out", str(tmp_path / "hf_again")]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_again", dtype=torch.float32).eval()
    ids = np.arange(3, 23, dtype=np.int32)[None]
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(torch_model, ids))
    capsys.readouterr()
    assert cli_main(["info", "--model", str(tmp_path / "orbax"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = sum(int(np.prod(s.shape)) for s in tensor_specs(load_hf_llama(hf_dir)[0]))
    assert info["parameters"]["total"] == expected
    assert info["config"]["num_hidden_layers"] == 2
