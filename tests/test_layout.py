"""moe_lora_jax.layout: the one table of adapted linears matches transformers, the Flax model and conversion,
and no other module spells the list."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_llama

from moe_lora_jax import LlamaConfig, LlamaForCausalLM, MoeLoraError, layout, load_hf_llama, save_hf_llama
from moe_lora_jax.convert.names import tensor_specs

PACKAGE = Path(layout.__file__).parent
# GQA with head_dim * heads != hidden: q (64), kv (32), hidden (48) and mlp (70) widths all differ,
# so a linear that reads the wrong width gets the wrong shape.
GQA = dict(hidden_size=48, intermediate_size=70, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def hf_gqa(tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp("gqa") / "hf", **GQA)


def test_table_rows_and_groups():
    assert layout.ALL == ("q", "k", "v", "o", "gate", "up", "down")
    assert layout.ATTENTION == ("q", "k", "v", "o") and layout.FFN == ("gate", "up", "down")
    assert layout.linear("down_proj") is layout.linear("down")
    assert layout.hf_name("up", 7) == "model.layers.7.mlp.up_proj.weight"
    assert layout.param_path("o", 2) == ("layers_2", "self_attn", "o_proj")
    assert layout.short_name("k_proj") == "k" and layout.short_name("lm_head") is None
    with pytest.raises(MoeLoraError, match="unknown linear 'qkv'"):
        layout.linear("qkv")


def test_dims_match_transformers_linear_shapes(hf_gqa):
    hf_dir, model = hf_gqa
    config = LlamaConfig.from_hf(model.config.to_dict())
    expected = {"q": (48, 64), "k": (48, 32), "v": (48, 32), "o": (64, 48), "gate": (48, 70), "up": (48, 70), "down": (70, 48)}
    assert layout.all_dims(config) == expected
    assert (config.q_width, config.kv_width) == (64, 32)
    state = model.state_dict()
    for i in range(config.num_hidden_layers):
        for lin in layout.LINEARS:
            d_in, d_out = layout.dims(lin.name, config)
            assert tuple(model.get_submodule(lin.hf_module(i)).weight.shape) == (d_out, d_in), lin
            assert tuple(state[lin.hf_name(i)].shape) == (d_out, d_in), lin


def test_flax_kernels_have_the_table_shapes_and_axes():
    config = LlamaConfig(vocab_size=97, num_hidden_layers=2, **GQA)
    shapes = jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    for i in range(config.num_hidden_layers):
        for lin in layout.LINEARS:
            boxed = shapes
            for key in lin.param_path(i):
                boxed = boxed[key]
            kernel = boxed["kernel"]
            assert kernel.value.shape == layout.dims(lin.name, config), lin
            assert tuple(kernel.names) == lin.axes, lin


def test_hf_names_round_trip_through_convert(hf_gqa, tmp_path):
    hf_dir, model = hf_gqa
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config, params = load_hf_llama(hf_dir)
    spec_names = {s.hf_name for s in tensor_specs(config)}
    assert spec_names == set(state)  # the converter's names are exactly transformers' names
    params = nn.unbox(params)
    for i in range(config.num_hidden_layers):
        for lin in layout.LINEARS:
            kernel = params
            for key in lin.param_path(i):
                kernel = kernel[key]
            np.testing.assert_array_equal(np.asarray(kernel["kernel"]), state[lin.hf_name(i)].T)
    out = save_hf_llama(config, params, tmp_path / "out")
    from safetensors.numpy import load_file

    saved = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        saved.update(load_file(str(f)))
    for i in range(config.num_hidden_layers):
        for lin in layout.LINEARS:
            np.testing.assert_array_equal(saved[lin.hf_name(i)], state[lin.hf_name(i)])


# ------------------------------------------------------------------ nothing else spells the list
_NAMES = {**{lin.name: lin.name for lin in layout.LINEARS}, **{lin.proj: lin.name for lin in layout.LINEARS}}


def _spelled_lists(source: str) -> list[tuple[int, list[str]]]:
    """(line, names) of every bracketed literal (tuple, list, dict, set, call) naming 3+ different linears."""
    found, stack = [], []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            stack.append(set())
        elif tok.type == tokenize.OP and tok.string in ")]}":
            group = stack.pop()
            if len(group) >= 3:
                found.append((tok.start[0], sorted(group)))
        elif tok.type == tokenize.STRING and stack:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue
            if not isinstance(value, str):
                continue
            if value in _NAMES:
                stack[-1].add(_NAMES[value])
            else:  # "self_attn.q_proj", "mlp/gate_proj": a projection inside a dotted or slashed name
                stack[-1].update(_NAMES[p] for p in re.split(r"[./]", value) if p.endswith("_proj") and p in _NAMES)
    return found


def test_the_detector_finds_the_old_spellings():
    old = [
        'ALL_MODULES = ("q", "k", "v", "o", "gate", "up", "down")\n',
        '_BLOCK = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn"}\n',
        'spec = {"gate": (D, F, ("embed", "mlp")), "up": (D, F, ("embed", "mlp")), "down": (F, D, ("mlp", "embed"))}\n',
        'x = dict(a=["q_proj", "k_proj", "v_proj"])\n',
        'linears = {"self_attn.q_proj": (q, D), "self_attn.k_proj": (kv, D), "mlp.down_proj": (D, F)}\n',
    ]
    for line in old:
        assert _spelled_lists(line), line
    assert not _spelled_lists('MOV = ("k", "v", "ffn")\nif t in ("k", "v"): w["gate"], w["up"], w["down"]\n')


def test_no_other_module_spells_the_linears():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(layout.__file__):
            continue
        for line, names in _spelled_lists(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} {names}")
    assert not offenders, "read moe_lora_jax.layout instead of spelling the linears:\n" + "\n".join(offenders)
