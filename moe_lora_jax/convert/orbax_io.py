"""Base models as orbax checkpoints: `params/` (an orbax PyTree) beside `llama_config.json`.

Tensors are written in chunks of at most CHUNK_BYTES, so a sharded restore (each
process asks only for the slices its devices hold) reads about its share of the
files rather than every whole tensor.
"""

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
CHUNK_BYTES = 16 * 2**20


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
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save((tmp / "params").absolute(), params, save_args=save_args)
    return Path(out_dir)


def load_orbax_config(path: str | os.PathLike) -> LlamaConfig:
    raw = json.loads((Path(path) / CONFIG_NAME).read_text())
    raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
    raw["eos_token_id"] = tuple(raw["eos_token_id"])
    return LlamaConfig(**raw)


def load_orbax_llama(
    path: str | os.PathLike, *, shardings: Any = None, param_dtype: str | None = None
) -> tuple[LlamaConfig, dict[str, Any]]:
    """(config, params) of an orbax base, each tensor restored straight into its place.

    `shardings`: a tree of `jax.sharding.Sharding` shaped like the params (e.g. NamedShardings
    over a multi-host mesh); each process then reads only the slices its own devices hold.
    None: every tensor whole on this process's first device. `param_dtype` casts as it reads.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    config = load_orbax_config(path)
    if param_dtype:
        config = config.replace(param_dtype=param_dtype)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = checkpointer.metadata(path / "params").item_metadata.tree
            if shardings is None:
                shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), stored)
            elif jax.tree.structure(shardings) != jax.tree.structure(stored):
                raise MoeLoraError(f"{path / 'params'} holds another parameter tree than the shardings describe: "
                                   "the checkpoint was written for another model layout; re-run `moe-lora convert`")
            target = jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), jax.numpy.dtype(config.param_dtype), sharding=s), stored, shardings
            )
            params = {}
            for key, part in target.items():  # a top-level entry (a layer) at a time: orbax's host buffers stay small
                restore_args = ocp.checkpoint_utils.construct_restore_args({key: part})
                args = ocp.args.PyTreeRestore(item={key: part}, restore_args=restore_args, partial_restore=True)
                params.update(checkpointer.restore(path / "params", args=args))
    except MoeLoraError:
        raise
    except Exception as e:
        raise MoeLoraError(f"{path / 'params'} is not a readable orbax checkpoint ({type(e).__name__}): re-run `moe-lora convert`") from None
    bad = next((k for k, v in jax.tree_util.tree_leaves_with_path(params) if not local_finite(v)), None)
    if bad is not None:
        raise MoeLoraError(f"{path}: parameter {jax.tree_util.keystr(bad)} holds NaN or Inf; the checkpoint is corrupt")
    return config, params


def local_finite(x: jax.Array) -> bool:
    """Whether this process's shards of `x` are all finite (host copies of one shard at a time)."""
    return all(np.isfinite(np.asarray(s.data, np.float32)).all() for s in x.addressable_shards)
