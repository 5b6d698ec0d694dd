"""Training configuration: frozen dataclasses, YAML in and out, dotted overrides.

    config = load_config("experiments/configs/quickstart.yaml", ["optim.lr=3e-4", "mesh.fsdp=2"])
    save_resolved(config, run_dir)          # writes run_dir/config.yaml (never overwrites)

Every section is a frozen dataclass whose fields carry type annotations; values
from YAML and from `--set key=value` are converted to the field's type, so
`optim.lr=3e-4` is a float and `model.path=null` is None. Unknown keys raise
`MoeLoraError` naming the key and the valid ones. The `adapter` section is a
free-form dict (the adapter package turns it into its own config).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from moe_lora_jax.atomic import atomic_write_text
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.objective.weights import Objective

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSection:
    """Base model: `path` is a HF directory, .gguf file, orbax directory or hub id; None = embedded SmolLM2."""

    path: str | None = None
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: str = "none"  # none, dots, dots_no_batch, full (model/remat.py); true/false = full/none
    scan_layers: bool = True  # one lax.scan over the decoder layers (LlamaConfig.scan_layers): compile time flat in depth

    def __post_init__(self) -> None:
        from moe_lora_jax.model.remat import normalize_remat

        object.__setattr__(self, "remat", normalize_remat(self.remat))


@dataclass(frozen=True)
class DataSection:
    """Where examples come from and how they become batches.

    `train`/`validation`/`test` are local .json/.jsonl/.parquet files or hub dataset
    names; `train: null` means the bundled multi-task set (see `moe_lora_jax.data.bundled`),
    whose validation and test splits are then used when those are null too.
    Batching is length bucketing with padding (no packing): examples never share a row.
    """

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    template: Literal["alpaca", "chat"] = "alpaca"
    max_len: int = 256
    truncation: Literal["right", "drop"] = "right"
    batching: Literal["bucket", "fixed"] = "bucket"
    pad_multiple: int = 32
    bucket_window: int = 16
    seed: int = 0
    task_field: str = "task"
    bundled_seed: int = 0
    bundled_size: int = 10000
    # LoRAMoE's task type: examples of these tasks are world knowledge (type 1), all others type 0.
    world_knowledge_tasks: tuple[str, ...] | None = None
    # the bundled set's task families (null: its six; see moe_lora_jax.data.bundled, e.g. KIND_TASKS)
    bundled_tasks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_len", "pad_multiple", "bucket_window", "bundled_size")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine or linear decay to `end_lr_ratio * lr`."""

    lr: float = 2e-4
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    router_lr: float | None = None  # None: same as lr
    rational_lr: float | None = None  # MiLoRA's rational activation coefficients; None: same as lr
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Regular expressions searched in "/"-joined parameter paths.
    no_decay_patterns: tuple[str, ...] = (r"(^|/)bias$", r"norm", r"(^|/)scale$", r"rational", r"ia3")
    router_patterns: tuple[str, ...] = ("router",)
    rational_patterns: tuple[str, ...] = ("rational",)

    def __post_init__(self) -> None:
        _check_optim(self)
        if self.lr <= 0:
            raise MoeLoraError(f"optim.lr={self.lr} must be positive: set optim.lr=2e-4 or similar")
        if self.warmup_steps < 0:
            raise MoeLoraError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise MoeLoraError(f"optim.end_lr_ratio={self.end_lr_ratio} must be in [0, 1]")
        for name in ("router_lr", "rational_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise MoeLoraError(f"optim.{name}={value} must be positive or null (null: same as optim.lr)")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; exactly one may be -1 (filled with the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if sum(v == -1 for v in sizes.values()) > 1:
            raise MoeLoraError(f"mesh {sizes} has more than one -1: at most one axis can be filled automatically")
        for name, v in sizes.items():
            if v == 0 or v < -1:
                raise MoeLoraError(f"mesh.{name}={v} is invalid: use a positive size or -1 (fill)")


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the adapter state; `dir: null` puts them under the run directory."""

    dir: str | None = None
    every: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        _positive(self, "every", "keep")


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    global_batch: int = 16
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 0  # 0: the whole validation split
    max_nonfinite_steps: int = 10  # stop after this many consecutive NaN/Inf losses

    def __post_init__(self) -> None:
        _positive(self, "steps", "global_batch", "grad_accum", "log_every", "eval_every")
        if self.global_batch % self.grad_accum:
            raise MoeLoraError(
                f"loop.global_batch={self.global_batch} is not divisible by loop.grad_accum={self.grad_accum}: "
                "each accumulation step needs an equal micro-batch"
            )


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    adapter: dict = field(default_factory=dict)  # free-form; see moe_lora_jax.adapters
    objective: Objective = field(default_factory=Objective)  # loss weights; see moe_lora_jax.objective
    output_dir: str = "runs/default"
    seed: int = 0  # parameter initialisation and dropout

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _check_optim(optim: "OptimConfig") -> None:
    """Finite numbers, a clipping norm that clips, an epsilon that guards, patterns that compile."""
    import math
    import re

    for f in dataclasses.fields(optim):
        value = getattr(optim, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise MoeLoraError(f"optim.{f.name}={value} is not a finite number: give a real value")
    if optim.clip_norm is not None and not optim.clip_norm > 0:
        # optax scales by clip_norm / norm: a negative value flips the update, 0 silently meant "no clipping"
        raise MoeLoraError(f"optim.clip_norm={optim.clip_norm} must be positive (the largest global gradient norm): use null for no clipping")
    if not optim.eps > 0:
        raise MoeLoraError(f"optim.eps={optim.eps} must be positive: Adam divides by sqrt(v) + eps (default 1e-8)")
    for name in ("b1", "b2"):
        if not 0.0 <= getattr(optim, name) < 1.0:
            raise MoeLoraError(f"optim.{name}={getattr(optim, name)} must be in [0, 1)")
    if optim.weight_decay < 0:
        raise MoeLoraError(f"optim.weight_decay={optim.weight_decay} must be >= 0")
    for name in ("no_decay_patterns", "router_patterns", "rational_patterns"):
        for i, pattern in enumerate(getattr(optim, name)):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise MoeLoraError(f"optim.{name}[{i}]={pattern!r} is not a valid regular expression ({e}): fix or quote it") from None


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__
    for name in names:
        if getattr(obj, name) <= 0:
            raise MoeLoraError(f"{section}.{name}={getattr(obj, name)} must be positive")


# ----------------------------------------------------------------------------- dict <-> dataclass
def config_from_dict(raw: Mapping[str, Any] | None, cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build `cls` from a nested dict, converting every value to its field's type."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the config file"
        raise MoeLoraError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise MoeLoraError(f"unknown config key {prefix + str(key)!r}: valid keys here are {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise MoeLoraError(f"{prefix or 'config'}: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(config)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return config_from_dict(value, tp, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except MoeLoraError as e:
                errors.append(str(e))
        raise MoeLoraError(errors[0] if errors else f"{key}={value!r} has the wrong type")
    if origin is Literal:
        if value not in args:
            raise MoeLoraError(f"{key}={value!r} is not allowed: use one of {', '.join(map(str, args))}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise MoeLoraError(f"{key}={value!r} is not a boolean: use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise MoeLoraError(f"{key}={value!r} is not an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        except (TypeError, ValueError):
            raise MoeLoraError(f"{key}={value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise MoeLoraError(f"{key}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MoeLoraError(f"{key}={value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise MoeLoraError(f"{key}={value!r} is not a string")
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise MoeLoraError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise MoeLoraError(f"{key}: unsupported field type {tp}")  # pragma: no cover


# ----------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict (a copy); values are typed later.

    Keys under `adapter.` may be new (the section is free-form) and their values are
    parsed as YAML scalars; every other key must name an existing field.
    """
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise MoeLoraError(f"override {item!r} has no '=': write it as section.key=value, e.g. optim.lr=3e-4")
        dotted, value = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".")]
        if not all(parts):
            raise MoeLoraError(f"override key {dotted!r} is malformed: write section.key=value")
        _check_override_key(parts)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise MoeLoraError(f"override {dotted!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value) if parts[0] == "adapter" else _scalar(value)
    return out


def _scalar(text: str) -> Any:
    """Keep override values as strings, except null; `_coerce` converts them by field type."""
    stripped = text.strip()
    if stripped.lower() in ("null", "none", "~"):
        return None
    if stripped.startswith("["):
        return yaml.safe_load(stripped)
    return stripped


def _check_override_key(parts: list[str]) -> None:
    cls: Any = TrainConfig
    for depth, part in enumerate(parts):
        if cls is dict:
            return  # free-form section
        if not dataclasses.is_dataclass(cls):
            raise MoeLoraError(f"override key {'.'.join(parts)!r}: {'.'.join(parts[:depth])} is a value, not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:depth]) or "the top level"
            raise MoeLoraError(
                f"unknown config key {'.'.join(parts[: depth + 1])!r}: valid keys at {where} are {', '.join(hints)}"
            )
        cls = hints[part]
        if typing.get_origin(cls) is dict:
            cls = dict


def _deep_copy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


# ----------------------------------------------------------------------------- files
def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML file (None: all defaults), apply dotted overrides, return a TrainConfig."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MoeLoraError(f"config file {p} does not exist: pass a YAML file such as experiments/configs/quickstart.yaml")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise MoeLoraError(f"{p} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
        if not isinstance(raw, dict):
            raise MoeLoraError(f"{p} must hold a mapping of sections (model, data, optim, ...), not {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides))


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def save_resolved(config: TrainConfig, out_dir: str | Path) -> Path:
    """Write the resolved config as `out_dir/config.yaml` and return its path.

    Never overwrites: if config.yaml exists with the same content it is left alone;
    with different content (a resumed run with changed settings) the new one is
    written as config-1.yaml, config-2.yaml, ...
    """

    out = Path(out_dir)
    text = dump_config(config)
    candidate, n = out / "config.yaml", 0
    while candidate.exists():
        if candidate.read_text() == text:
            return candidate
        n += 1
        candidate = out / f"config-{n}.yaml"
    atomic_write_text(candidate, text)
    return candidate
