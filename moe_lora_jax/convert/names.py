"""The one table between Hugging Face tensor names and this project's parameter tree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from moe_lora_jax import layout
from moe_lora_jax.config import LlamaConfig

Path = tuple[str, ...]

# Hugging Face tensors we knowingly skip: rotary tables some old checkpoints saved.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    path: Path  # keys into the params tree
    hf_shape: tuple[int, ...]  # torch layout; kernels are transposed into ours
    transpose: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape


def tensor_specs(config: LlamaConfig) -> list[TensorSpec]:
    """Every tensor of a LLaMA checkpoint with `config`, in file order."""
    D, V = config.hidden_size, config.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (V, D), False)]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        specs.append(TensorSpec(f"{prefix}.input_layernorm.weight", (f"layers_{i}", "input_layernorm", "scale"), (D,), False))
        for lin in layout.LINEARS:  # torch Linear.weight is [out, in]: our kernel [in, out] transposed
            d_in, d_out = lin.dims(config)
            specs.append(TensorSpec(lin.hf_name(i), (*lin.param_path(i), "kernel"), (d_out, d_in), True))
        specs.append(
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", (f"layers_{i}", "post_attention_layernorm", "scale"), (D,), False)
        )
    specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (D,), False))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (V, D), True))
    return specs


def get_path(tree: dict[str, Any], path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def iter_paths(tree: dict[str, Any], prefix: Path = ()) -> Iterator[Path]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from iter_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)
