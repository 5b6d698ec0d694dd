"""The one table of the adapted linears of a LLaMA decoder layer: q k v o gate up down.

Each row says where the linear sits (`block`, `proj`: the model's parameter path and the
Hugging Face module name), which logical axes its kernel [in, out] carries, and so its
in/out widths for a `LlamaConfig`:

    embed -> hidden_size   heads -> heads * head_dim   kv -> kv_heads * head_dim   mlp -> intermediate_size

The model, adapter I/O, merge, spectral analysis, allocation and HF conversion read this
table; no other module spells the list or computes these widths.

    dims("k", config)   -> (hidden_size, kv_heads * head_dim)
    hf_name("q", 3)     -> "model.layers.3.self_attn.q_proj.weight"
    param_path("q", 3)  -> ("layers_3", "self_attn", "q_proj")  # kernel in `params`, adapter leaves in `adapter`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_lora_jax.errors import MoeLoraError


def _width(axis: str, config: Any) -> int:
    """The width a logical kernel axis has in a model with `config` (a LlamaConfig)."""
    if axis == "embed":
        return config.hidden_size
    if axis == "heads":
        return config.num_attention_heads * config.head_dim
    if axis == "kv":
        return config.num_key_value_heads * config.head_dim
    if axis == "mlp":
        return config.intermediate_size
    raise MoeLoraError(f"logical axis {axis!r} has no width in a LLaMA layer: use embed, heads, kv or mlp")


@dataclass(frozen=True)
class Linear:
    """One adapted linear: short name, block and projection names, kernel logical axes [in, out]."""

    name: str  # "q"; the name in target_modules and Allocations
    block: str  # "self_attn" | "mlp"
    proj: str  # "q_proj"; the Flax module and the Hugging Face module name
    axes: tuple[str, str]  # logical axes of the kernel [in, out]

    def dims(self, config: Any) -> tuple[int, int]:
        """(in, out) features for a LlamaConfig."""
        return _width(self.axes[0], config), _width(self.axes[1], config)

    def param_path(self, layer: int) -> tuple[str, str, str]:
        return (f"layers_{layer}", self.block, self.proj)

    def hf_module(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.{self.proj}"

    def hf_name(self, layer: int) -> str:
        return f"{self.hf_module(layer)}.weight"


LINEARS: tuple[Linear, ...] = (
    Linear("q", "self_attn", "q_proj", ("embed", "heads")),
    Linear("k", "self_attn", "k_proj", ("embed", "kv")),
    Linear("v", "self_attn", "v_proj", ("embed", "kv")),
    Linear("o", "self_attn", "o_proj", ("heads", "embed")),
    Linear("gate", "mlp", "gate_proj", ("embed", "mlp")),
    Linear("up", "mlp", "up_proj", ("embed", "mlp")),
    Linear("down", "mlp", "down_proj", ("mlp", "embed")),
)

_BY_NAME = {lin.name: lin for lin in LINEARS}
_BY_PROJ = {lin.proj: lin for lin in LINEARS}

ALL: tuple[str, ...] = tuple(lin.name for lin in LINEARS)  # table order = HF file order within a layer
ATTENTION: tuple[str, ...] = tuple(lin.name for lin in LINEARS if lin.block == "self_attn")
FFN: tuple[str, ...] = tuple(lin.name for lin in LINEARS if lin.block == "mlp")


def linear(name: str) -> Linear:
    """The row of a short name ("q") or a projection name ("q_proj")."""
    row = _BY_NAME.get(name) or _BY_PROJ.get(name)
    if row is None:
        raise MoeLoraError(f"unknown linear {name!r}: use one of {', '.join(ALL)} (or their _proj names)")
    return row


def dims(name: str, config: Any) -> tuple[int, int]:
    """(in, out) features of linear `name` in a model with `config`."""
    return linear(name).dims(config)


def all_dims(config: Any) -> dict[str, tuple[int, int]]:
    """{name: (in, out)} for every linear, in table order."""
    return {lin.name: lin.dims(config) for lin in LINEARS}


def hf_name(name: str, layer: int) -> str:
    """Hugging Face weight name: "model.layers.{layer}.self_attn.q_proj.weight"."""
    return linear(name).hf_name(layer)


def param_path(name: str, layer: int) -> tuple[str, str, str]:
    """Path of the linear's module in the parameter trees: ("layers_{layer}", block, proj)."""
    return linear(name).param_path(layer)


def short_name(proj: str) -> str | None:
    """"q_proj" -> "q"; None for a name that is not an adapted linear."""
    row = _BY_PROJ.get(proj)
    return None if row is None else row.name
