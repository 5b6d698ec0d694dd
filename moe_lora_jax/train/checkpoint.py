"""Orbax checkpoints of a training run: adapter state, optimizer, step, RNG, data position.

    store = CheckpointStore(ckpt_dir, keep=3, async_save=True, meta=run_meta)
    store.save(step, state, data_state)                  # refuses non-finite states
    restored = store.restore_latest(abstract_state)      # (state, data_state, meta) or None
    store.close()                                        # waits for pending async saves

Each step directory holds two items:

    state/   the TrainState as an orbax PyTree (adapter, opt_state, step, rng, counters)
    meta/    JSON: the data position, plus the run's identity (base model reference and
             fingerprint, AdapterConfig with its Allocation, resolved train config)

The frozen base model is referenced (path + fingerprint of its shapes and a few
values), never copied. Resuming checks that the base model and the adapter
(Allocation included) are the ones the checkpoint was written with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from moe_lora_jax.adapters.config import NON_IDENTITY_FIELDS, OBJECTIVE_FIELDS, AdapterConfig
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.objective import legacy_objective, resolve_objective
from moe_lora_jax.train.optim import path_str
from moe_lora_jax.train.state import TrainState

# Keys of the run identity that must match between a checkpoint and the run resuming from it.
IDENTITY_KEYS = ("base_fingerprint", "adapter_config")


def base_fingerprint(params: Any) -> str:
    """A short hash of the base model: every tensor's path, shape and dtype, and the sum of a few values.

    Cheap (reads one slice of each tensor) yet different for another model, another
    size, or the same architecture with other weights.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((tuple(leaf.shape), str(leaf.dtype))).encode())
        sample = np.asarray(_first_values(leaf, 64), np.float64)
        h.update(np.round(sample, 6).tobytes())
    return h.hexdigest()[:16]


def _first_values(leaf: Any, n: int) -> np.ndarray:
    """The first `n` values of `leaf` (flattened) on this host, also when they sit on another host's devices."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and not leaf.is_fully_addressable:
        return np.asarray(_replicated_head(sharding.mesh, n)(leaf))
    return np.asarray(jax.device_get(leaf.reshape(-1)[:n]))


@functools.lru_cache(maxsize=None)
def _replicated_head(mesh: Any, n: int) -> Any:
    """A jitted "first n values", replicated on every device of `mesh` (so every process can read them)."""
    return jax.jit(lambda x: x.reshape(-1)[:n], out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _local_parts(x: Any) -> list[np.ndarray]:
    """This process's data of `x`: its addressable shards (a sharded multi-host array), else the whole value."""
    shards = getattr(x, "addressable_shards", None)
    if shards is None:
        return [np.asarray(x)]
    distinct = {str(s.index): s for s in shards}  # a replicated leaf: one copy, not one per device
    return [np.asarray(s.data) for s in distinct.values()]


def all_finite(tree: Any) -> bool:
    """Whether every float leaf is finite, on this process's shards (each process checks what it holds)."""
    return first_nonfinite(tree) is None


def first_nonfinite(tree: Any) -> str | None:
    """Path ('adapter/layers_0/.../lora_A') of the first leaf holding NaN/Inf, or None."""

    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if np.issubdtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype, np.inexact) and not all(np.isfinite(part).all() for part in _local_parts(x)):
            return path_str(path)
    return None


class CheckpointStore:
    """An orbax CheckpointManager keeping the last `keep` steps; saves are asynchronous by default.

    All processes call `save` and `restore_latest` (orbax coordinates them; process 0 writes the metadata).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True, meta: Mapping[str, Any] | None = None) -> None:
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise MoeLoraError(f"checkpoint path {self.directory} is a file: point checkpoint.dir at a directory")
        self.meta = dict(meta or {})
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: TrainState, data_state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save `state` at `step`. A state holding NaN/Inf is never written (MoeLoraError)."""
        bad = first_nonfinite(state.to_dict())
        if bad is not None:
            raise MoeLoraError(f"refusing to checkpoint step {step}: the train state holds NaN or Inf (first at {bad})")
        meta = {**self.meta, "data_state": _jsonable(data_state), "step": int(step)}
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state.to_dict()), meta=self._ocp.args.JsonSave(meta)
        )
        return bool(self._manager.save(step, args=args, force=force))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ------------------------------------------------------------------ restore
    @property
    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """(state, data_state, meta) of `step`, placed like `abstract_state` (a TrainState of ShapeDtypeStructs
        carrying shardings, or of arrays). Raises MoeLoraError for another run's or a damaged checkpoint."""
        where = self.directory / str(step)
        meta = self.check(step)
        target = jax.tree.map(_abstract, abstract_state.to_dict())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                restored = self._manager.restore(step, args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001
            raise MoeLoraError(
                f"checkpoint {where} cannot be read into this run's state ({type(e).__name__}: {str(e).splitlines()[0][:160]}): "
                "it is damaged or was written by another adapter; delete it or use another checkpoint.dir"
            ) from None
        state = TrainState.from_dict(restored["state"])
        if not all_finite(state.to_dict()):
            raise MoeLoraError(f"checkpoint {where} holds NaN or Inf: it is damaged; delete it to resume from an earlier step")
        return state, dict(meta.get("data_state", {})), dict(meta)

    def check(self, step: int) -> dict[str, Any]:
        """The metadata of `step`, after checking it is this run's and not visibly damaged (cheap: no arrays read)."""
        where = self.directory / str(step)
        try:
            meta = self._manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged directory
            raise MoeLoraError(f"checkpoint {where} is damaged ({type(e).__name__}): delete that step directory to resume from an earlier one") from None
        self._check_identity(meta, where)
        state_dir = where / "state"
        if any(state_dir.glob("ocdbt.process_*")) and not (state_dir / "manifest.ocdbt").is_file():
            raise MoeLoraError(f"checkpoint {where} is damaged (state/manifest.ocdbt is missing): "
                               "delete that step directory to resume from an earlier one")
        return meta

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any], dict[str, Any]] | None:
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

    def _check_identity(self, meta: Mapping[str, Any], where: Path) -> None:
        for key in IDENTITY_KEYS:
            if key in self.meta and key in meta and _canonical(_identity_value(key, meta[key])) != _canonical(
                _identity_value(key, self.meta[key])
            ):
                what = "base model" if key == "base_fingerprint" else "adapter (method, sizes or Allocation)"
                prefix = "base model fingerprint" if key == "base_fingerprint" else "adapter"
                diffs = differences(_jsonable(_identity_value(key, meta[key])), _jsonable(_identity_value(key, self.meta[key])), prefix)
                shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
                raise MoeLoraError(
                    f"checkpoint {where} was written with another {what} than this run's ({shown}): "
                    "use the same model and adapter to resume, or a new output_dir / checkpoint.dir to start afresh; "
                    "nothing was written"
                )


def differences(old: Any, new: Any, prefix: str) -> list[str]:
    """"path old -> new" for each leaf that differs between two JSON-like values (checkpoint vs this run)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in list(old) + [k for k in new if k not in old]:
            out += differences(old.get(k, "(absent)"), new.get(k, "(absent)"), f"{prefix}.{k}")
        return out
    if old == new:
        return []
    return [f"{prefix} {_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if sharding is None else x.dtype, sharding=sharding)


def _canonical(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True)


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays become Python numbers/lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _identity_value(key: str, value: Any) -> Any:
    """An adapter config read back through AdapterConfig, so fields added since the checkpoint was
    written take the values such a checkpoint means (the run stays resumable across versions), reduced
    to what fixes parameter shapes and routing: loss weights (older checkpoints carry them), dropout,
    router jitter and sow_expert_outputs may change on resume (`resume_changes` names them)."""
    if key != "adapter_config" or not isinstance(value, Mapping):
        return value

    try:
        return AdapterConfig.from_dict(value).identity_dict()
    except Exception:  # noqa: BLE001 - not readable as an AdapterConfig: compare the raw values
        return {k: v for k, v in value.items() if k not in NON_IDENTITY_FIELDS and k not in OBJECTIVE_FIELDS}


def _run_objective(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The resolved objective a checkpoint was trained with: its `objective` entry, or for a checkpoint
    written before the objective section, the weights its adapter_config carried."""

    if meta.get("objective") is not None:
        return dict(meta["objective"])
    ac = meta.get("adapter_config")
    if not isinstance(ac, Mapping):
        return None
    try:
        return resolve_objective(legacy_objective(ac), str(ac.get("method", "lora"))).to_dict()
    except Exception:  # noqa: BLE001 - unreadable weights: nothing to compare
        return None


def resume_changes(old_meta: Mapping[str, Any], new_meta: Mapping[str, Any]) -> list[str]:
    """"objective.z_loss_coef 0 -> 0.001" for every loss weight, and "adapter.dropout 0 -> 0.1" for every
    regulariser (dropout, router_jitter), that differs between a checkpoint and the run resuming from it."""

    out: list[str] = []
    old_obj, new_obj = _run_objective(old_meta), _run_objective(new_meta)
    if old_obj is not None and new_obj is not None:
        out += differences(_jsonable(old_obj), _jsonable(new_obj), "objective")
    old_ac, new_ac = old_meta.get("adapter_config"), new_meta.get("adapter_config")
    if isinstance(old_ac, Mapping) and isinstance(new_ac, Mapping):
        for name in NON_IDENTITY_FIELDS:
            if name != "sow_expert_outputs" and name in old_ac and name in new_ac:  # sow follows contrastive_coef
                out += differences(_jsonable(old_ac[name]), _jsonable(new_ac[name]), f"adapter.{name}")
    return out
