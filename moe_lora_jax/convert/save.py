"""Hugging Face LLaMA checkpoints out: a directory transformers' LlamaForCausalLM loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from safetensors.numpy import save_file

from moe_lora_jax.atomic import atomic_dir
from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.convert.names import get_path, iter_paths, tensor_specs
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.stacking import unstack_layers

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def save_hf_llama(
    config: LlamaConfig,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `params` as a Hugging Face LLaMA directory (config.json + safetensors).

    Shapes and finiteness are checked before anything is written; the directory
    appears only when complete, and an existing non-empty one is never touched.
    """
    params = unstack_layers(params)  # layers stacked for the scanned model: per layer again
    specs = tensor_specs(config)
    expected = {spec.path for spec in specs}
    unexpected = sorted(set(iter_paths(dict(params))) - expected)
    if unexpected:
        raise MoeLoraError(f"params hold {'/'.join(unexpected[0])}, which a LLaMA with this config does not have: pass the base params only")

    def tensors() -> Iterable[tuple[str, np.ndarray]]:
        for spec in specs:
            try:
                value = get_path(params, spec.path)
            except KeyError:
                raise MoeLoraError(f"params lack {'/'.join(spec.path)} (tensor {spec.hf_name}): pass the full base params") from None
            if tuple(value.shape) != spec.shape:
                raise MoeLoraError(f"params {'/'.join(spec.path)} has shape {tuple(value.shape)}, expected {spec.shape} for this config")
            array = np.asarray(jax.device_get(value))
            if not np.isfinite(array.astype(np.float32, copy=False)).all():
                raise MoeLoraError(f"params {'/'.join(spec.path)} holds NaN or Inf: refusing to save a corrupt checkpoint")
            yield spec.hf_name, np.ascontiguousarray(array.T) if spec.transpose else array

    return write_hf_dir(config, tensors(), out_dir, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def write_hf_dir(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write HF-named torch-layout tensors in shards of at most `max_shard_bytes`, atomically."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with atomic_dir(out_dir) as tmp:
        shard_names: list[list[str]] = []
        shard: dict[str, np.ndarray] = {}

        def flush() -> None:  # write each shard as soon as it is full: the host holds one at a time
            save_file(shard, str(tmp / f"shard-{len(shard_names)}.safetensors"), metadata={"format": "pt"})
            shard_names.append(list(shard))
            shard.clear()

        for name, array in items:
            if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
                flush()
            shard[name] = array
        flush()
        if len(shard_names) == 1:
            os.replace(tmp / "shard-0.safetensors", tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(shard_names):
                fname = f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors"
                os.replace(tmp / f"shard-{i}.safetensors", tmp / fname)
                weight_map.update(dict.fromkeys(names, fname))
            total = sum(os.path.getsize(tmp / f) for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = config.to_hf() | dict(extra or {})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)
