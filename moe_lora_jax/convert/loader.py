"""One loader for every command that runs a base model, with or without an adapter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moe_lora_jax.adapters.io import load_adapter
from moe_lora_jax.adapters.merge import merge_lora
from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.convert.load import load_llama, load_llama_config
from moe_lora_jax.embedded import resolve_model_path
from moe_lora_jax.model import LlamaForCausalLM
from moe_lora_jax.model.scan import scans
from moe_lora_jax.stacking import stack_layers


def load_model(model: str | os.PathLike | None, *, progress: bool = True, **kwargs: Any) -> tuple[Path, LlamaConfig, Any]:
    """(resolved path, config, base params) of `model` (None: the embedded SmolLM2); kwargs go to `load_llama`."""
    path = resolve_model_path(model)
    return (path, *load_llama(path, progress=progress, **kwargs))


def load_model_and_adapter(
    model: str | os.PathLike | None, adapter_dir: str | os.PathLike | None = None, *, merge: bool = False,
    progress: bool = True,
) -> tuple[Path, LlamaConfig, LlamaForCausalLM, dict[str, Any]]:
    """(path, config, LlamaForCausalLM, variables) for `model` with the adapter in `adapter_dir` applied.

    The adapter is checked against the base model's config before the weights load, so a
    mismatch fails fast. With `merge`, a plain LoRA is folded into the base kernels and the
    plain model serves it (routed methods are refused, also before the load).
    """
    path = resolve_model_path(model)
    adapter_config, adapter = None, None
    if adapter_dir is not None:
        adapter_config, adapter = load_adapter(adapter_dir, load_llama_config(path))
        if merge and not adapter_config.spec.mergeable:
            merge_lora({}, adapter, adapter_config)  # raises the one-line refusal
    config, params = load_llama(path, progress=progress)
    if merge:
        params, adapter_config = merge_lora(params, adapter, adapter_config), None
    if scans(config, adapter_config):  # the scanned model reads the decoder layers stacked over `layers`
        params = stack_layers(params)
    if adapter_config is None:
        return path, config, LlamaForCausalLM(config), {"params": params}
    return path, config, LlamaForCausalLM(config, adapter_config), {"params": params, "adapter": adapter}
