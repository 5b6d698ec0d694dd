"""Hugging Face LLaMA checkpoints in: config.json + safetensors (single or sharded), GGUF, hub ids."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.convert.names import IGNORED_SUFFIXES, TensorSpec, get_path, set_path, tensor_specs
from moe_lora_jax.convert.orbax_io import is_orbax_model, load_orbax_config, load_orbax_llama
from moe_lora_jax.convert.sources import read_config_json, resolve_hf_dir
from moe_lora_jax.errors import MoeLoraError


def load_hf_llama(
    path: str | os.PathLike,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    shardings: Any = None,
    progress: bool = False,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Load a LLaMA checkpoint as (LlamaConfig, params).

    `path` is a local Hugging Face directory, a `.gguf` file or a hub id.
    Tensors are read one at a time, checked (present, dtype, shape, finite),
    transposed into Flax layout and cast to `param_dtype` (default float32).
    With `shardings` (a tree of `jax.sharding.Sharding` shaped like the params,
    e.g. NamedShardings over a multi-host mesh) each process reads from the file
    only the slices its own devices hold and places them as it reads, so no
    process ever holds more than one full tensor plus its own shards (see
    docs/loading.md). Without, each tensor goes whole onto the default device.
    """
    hf_dir = resolve_hf_dir(path)
    overrides = {k: v for k, v in (("param_dtype", param_dtype or "float32"), ("dtype", dtype)) if v is not None}
    config = LlamaConfig.from_hf(read_config_json(hf_dir), source=str(hf_dir / "config.json"), **overrides)
    specs = tensor_specs(config)
    file_of = _weight_files(hf_dir)
    _check_tensor_names(file_of, {s.hf_name for s in specs}, hf_dir)
    params: dict[str, Any] = {}
    for spec in tqdm(specs, desc=f"loading {hf_dir.name}", disable=not progress, unit="tensor"):
        sharding = get_path(shardings, spec.path) if shardings is not None else None
        set_path(params, spec.path, read_tensor(hf_dir, file_of, spec, jnp.dtype(config.param_dtype), sharding))
    return config, params


def read_tensor(hf_dir: Path, file_of: dict[str, Path], spec: TensorSpec, dtype: Any, sharding: Any = None) -> jax.Array:
    """One checkpoint tensor as a jax.Array in our layout and `dtype`, placed by `sharding` (None: whole, default device).

    Each addressable shard is read as a slice of the stored tensor (rows and columns
    swapped for kernels, which torch stores [out, in]); a slice several devices share is
    read once. The file is opened for this tensor only: its memory map (whose pages count
    in the process's resident memory) ends with the tensor.
    """
    path = file_of[spec.hf_name]
    with _open_safetensors(path) as handle:
        try:
            view = handle.get_slice(spec.hf_name)
            stored, shape = view.get_dtype(), tuple(view.get_shape())
        except SafetensorError as e:
            raise MoeLoraError(f"{path.name}: cannot read tensor {spec.hf_name} ({e}); the file is corrupt, re-download it") from None
        if not stored.startswith(("F", "BF")):  # an integer or bool tensor would be cast to float silently
            raise MoeLoraError(
                f"tensor {spec.hf_name} in {path.name} is stored as {stored}, not floating point (F32, F16, BF16): "
                "the checkpoint is corrupt or quantized; re-export it with float weights"
            )
        if shape != spec.hf_shape:
            raise MoeLoraError(
                f"tensor {spec.hf_name} in {path.name} has shape {shape}, expected {spec.hf_shape} "
                f"from {hf_dir.name}/config.json: the weights and the config do not belong together"
            )
        read: dict[tuple, np.ndarray] = {}  # per shard index: replicated slices are read once

        def block(index: tuple[slice, ...]) -> np.ndarray:
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in read:
                read[key] = _read_block(view, spec, index, dtype, path)
            return read[key]

        if sharding is None:
            return jax.device_put(block((slice(None),) * len(spec.shape)))
        return jax.make_array_from_callback(spec.shape, sharding, block, dtype=dtype)


def _read_block(view: Any, spec: TensorSpec, index: tuple[slice, ...], dtype: Any, path: Path) -> np.ndarray:
    """The part `index` (our layout) of a stored tensor, checked finite and cast to `dtype`."""
    try:
        array = view[tuple(reversed(index))] if spec.transpose else view[index]
    except SafetensorError as e:
        raise MoeLoraError(f"{path.name}: cannot read tensor {spec.hf_name} ({e}); the file is corrupt, re-download it") from None
    if not np.isfinite(array.astype(np.float32, copy=False)).all():
        raise MoeLoraError(f"tensor {spec.hf_name} in {path.name} holds NaN or Inf values: the checkpoint is corrupt; re-download it")
    array = array.T if spec.transpose else array
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MoeLoraError(f"{index} is not a valid safetensors index ({e!r}): re-download or re-export the model") from None
        return {name: hf_dir / fname for name, fname in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if single.exists():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pth")):
        raise MoeLoraError(
            f"{hf_dir} holds only PyTorch pickle weights: re-save them as safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) and load that directory"
        )
    raise MoeLoraError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json: it is not a model directory")


def _check_tensor_names(file_of: dict[str, Path], expected: set[str], hf_dir: Path) -> None:
    for name in sorted(set(file_of) - expected):
        if name.endswith(IGNORED_SUFFIXES) or name == "lm_head.weight":  # a tied head saved anyway is unused
            continue
        what = "bias terms are not supported" if name.endswith(".bias") else "it is not part of a plain LLaMA model"
        raise MoeLoraError(f"unexpected tensor {name} in {file_of[name].name} ({what}): check that {hf_dir}/config.json matches the weights")
    for name in sorted(expected - set(file_of)):
        raise MoeLoraError(f"tensor {name} is missing from the checkpoint in {hf_dir}: the download is incomplete or the config does not match")


@contextlib.contextmanager
def _open_safetensors(path: Path, framework: str = "numpy"):
    if not path.exists():
        raise MoeLoraError(f"{path} is missing: the checkpoint's index names it; re-download the model")
    try:
        with safe_open(str(path), framework=framework) as f:
            yield f
    except SafetensorError as e:
        raise MoeLoraError(f"{path} is unreadable ({e}): the file is truncated or corrupt; re-download it") from None


def load_llama_config(path: str | os.PathLike) -> LlamaConfig:
    """Only the LlamaConfig of any supported source (no weights read): for checks before a slow load."""

    if is_orbax_model(path):
        return load_orbax_config(path)
    hf_dir = resolve_hf_dir(path)
    return LlamaConfig.from_hf(read_config_json(hf_dir), source=str(hf_dir / "config.json"))


def load_llama(path: str | os.PathLike, *, shardings: Any = None, **kwargs: Any) -> tuple[LlamaConfig, dict[str, Any]]:
    """Load from any supported source: an orbax directory written by `moe-lora convert`, or what `load_hf_llama` takes.

    `shardings` (a tree of shardings shaped like the params) places every tensor as it is read:
    each process reads only its own shards (docs/loading.md).
    """

    if is_orbax_model(path):
        config, params = load_orbax_llama(path, shardings=shardings, param_dtype=kwargs.get("param_dtype"))
        if kwargs.get("dtype"):
            config = config.replace(dtype=kwargs["dtype"])
        return config, params
    return load_hf_llama(path, shardings=shardings, **kwargs)
