"""Base models as orbax checkpoints: `params/` (an orbax PyTree) beside `llama_config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moe_lora_jax.atomic import atomic_dir
from moe_lora_jax.config import LlamaConfig, RopeScaling
from moe_lora_jax.errors import MoeLoraError

CONFIG_NAME = "llama_config.json"


def is_orbax_model(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def save_orbax_llama(
    config: LlamaConfig, params: dict[str, Any], out_dir: str | os.PathLike, *, tokenizer: Any = None
) -> Path:
    """Write the base model (and its tokenizer, so the directory is self-contained) atomically."""
    import orbax.checkpoint as ocp

    with atomic_dir(out_dir) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2))
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save((tmp / "params").absolute(), params)
    return Path(out_dir)


def load_orbax_config(path: str | os.PathLike) -> LlamaConfig:
    raw = json.loads((Path(path) / CONFIG_NAME).read_text())
    raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
    raw["eos_token_id"] = tuple(raw["eos_token_id"])
    return LlamaConfig(**raw)


def load_orbax_llama(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, Any]]:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    config = load_orbax_config(path)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sharding info not provided": single-host restore is what we want
            params = checkpointer.restore(path / "params")
    except Exception as e:
        raise MoeLoraError(f"{path / 'params'} is not a readable orbax checkpoint ({type(e).__name__}): re-run `moe-lora convert`") from None
    params = jax.tree.map(jax.numpy.asarray, params)
    bad = [k for k, v in jax.tree_util.tree_leaves_with_path(params) if not np.isfinite(np.asarray(v, np.float32)).all()]
    if bad:
        raise MoeLoraError(f"{path}: parameter {jax.tree_util.keystr(bad[0])} holds NaN or Inf; the checkpoint is corrupt")
    return config, params
