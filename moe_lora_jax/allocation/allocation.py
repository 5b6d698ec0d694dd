"""`Allocation`: how many LoRA experts each target module gets in each layer.

The model is built from it (a layer with 3 experts has parameters of shape
(3, ...)), so it is frozen and hashable, and equality and hash look only at the
counts: two allocations that build the same model compare equal, whatever their
provenance. The provenance (method, its parameters, the metric values it came
from) travels with it to JSON and back.

JSON layout (`to_json` / `from_json`)::

    {
      "format": "moe_lora_jax.allocation/1",
      "num_layers": 30,
      "experts_per_layer": [2, 3, ...],        # present when all modules agree
      "modules": {"q": [2, 3, ...], ..., "down": [2, 3, ...]},
      "total_experts_per_module": 120,          # likewise, when all modules agree
      "method": "alphalora",
      "provenance": {...}                       # free-form, JSON values only
    }
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from moe_lora_jax.errors import MoeLoraError

ALL_MODULES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
FORMAT = "moe_lora_jax.allocation/1"


def _as_count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise MoeLoraError(f"{where} is {value!r}, not a whole number: give integer expert counts")
    value = int(value)
    if value < 1:
        raise MoeLoraError(f"{where} has {value} experts: every layer needs at least one expert")
    return value


def _freeze_json(value: Any, where: str = "provenance") -> Any:
    """A read-only copy of a JSON-like value (mappings become MappingProxyType, lists tuples)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise MoeLoraError(f"{where} has a non-string key {k!r}: use string keys so it can be saved as JSON")
            out[k] = _freeze_json(v, f"{where}.{k}")
        return types.MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_json(v, f"{where}[]") for v in value)
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None  # JSON has no NaN: a missing metric is null
    if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
        return _freeze_json(value.tolist(), where)
    raise MoeLoraError(f"{where} holds a {type(value).__name__}, which JSON cannot store: pass numbers, strings, lists or dicts")


def _thaw_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw_json(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Per-layer expert counts for each target module, plus where they came from.

    Build one with `Allocation.uniform`, `Allocation.from_experts_per_layer`,
    `Allocation.from_counts` or the functions in `moe_lora_jax.allocation.allocate`.
    """

    counts_by_module: tuple[tuple[str, tuple[int, ...]], ...]
    method: str = dataclasses.field(default="manual", compare=False)
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        raw = self.counts_by_module
        items = list(raw.items()) if isinstance(raw, Mapping) else list(raw)
        if not items:
            raise MoeLoraError("an Allocation needs at least one target module: give counts for e.g. q and v")
        seen: dict[str, tuple[int, ...]] = {}
        for item in items:
            try:
                module, counts = item
            except (TypeError, ValueError):
                raise MoeLoraError(f"Allocation entry {item!r} is not a (module, counts) pair") from None
            if module not in ALL_MODULES:
                raise MoeLoraError(f"unknown target module {module!r}: choose from {', '.join(ALL_MODULES)}")
            if module in seen:
                raise MoeLoraError(f"target module {module!r} is given twice: give each module once")
            if isinstance(counts, (str, bytes)) or not isinstance(counts, Iterable):
                raise MoeLoraError(f"counts for {module} must be a list of per-layer integers, got {counts!r}")
            counts = tuple(_as_count(c, f"layer {i} of {module}") for i, c in enumerate(counts))
            if not counts:
                raise MoeLoraError(f"counts for {module} are empty: give one count per layer")
            seen[module] = counts
        lengths = {m: len(c) for m, c in seen.items()}
        if len(set(lengths.values())) != 1:
            raise MoeLoraError(f"modules have different numbers of layers {lengths}: give every module one count per layer")
        ordered = tuple((m, seen[m]) for m in ALL_MODULES if m in seen)
        object.__setattr__(self, "counts_by_module", ordered)
        if not isinstance(self.method, str) or not self.method:
            raise MoeLoraError(f"Allocation method must be a non-empty string, got {self.method!r}")
        object.__setattr__(self, "provenance", _freeze_json(dict(self.provenance or {})))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(
        cls, num_layers: int, num_experts: int, modules: Sequence[str] = ALL_MODULES, **provenance: Any
    ) -> "Allocation":
        """`num_experts` experts in every layer of every module in `modules`."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
            raise MoeLoraError(f"num_layers is {num_layers!r}: give a positive integer")
        n = _as_count(num_experts, "num_experts")
        return cls.from_experts_per_layer(
            (n,) * int(num_layers), modules, method="uniform", provenance={"num_experts": n, **provenance}
        )

    @classmethod
    def from_experts_per_layer(
        cls,
        experts_per_layer: Sequence[int],
        modules: Sequence[str] = ALL_MODULES,
        *,
        method: str = "manual",
        provenance: Mapping[str, Any] | None = None,
    ) -> "Allocation":
        """The same per-layer counts for every module in `modules`."""
        if isinstance(modules, str):
            modules = (modules,)
        counts = tuple(experts_per_layer)
        return cls(tuple((m, counts) for m in modules), method=method, provenance=provenance or {})

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, Sequence[int]], *, method: str = "manual", provenance: Mapping[str, Any] | None = None
    ) -> "Allocation":
        """From {module: per-layer counts}."""
        if not isinstance(counts, Mapping):
            raise MoeLoraError(f"counts must map module names to per-layer counts, got {type(counts).__name__}")
        return cls(tuple(counts.items()), method=method, provenance=provenance or {})

    # ------------------------------------------------------------------ accessors
    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.counts_by_module)

    @property
    def num_layers(self) -> int:
        return len(self.counts_by_module[0][1])

    def counts(self, module: str) -> tuple[int, ...]:
        for m, c in self.counts_by_module:
            if m == module:
                return c
        raise MoeLoraError(f"this Allocation has no counts for {module!r}: it covers {', '.join(self.modules)}")

    @property
    def uniform_across_modules(self) -> bool:
        return len({c for _, c in self.counts_by_module}) == 1

    @property
    def experts_per_layer(self) -> list[int]:
        """Per-layer counts shared by every module (raises if the modules differ)."""
        if not self.uniform_across_modules:
            raise MoeLoraError("the modules of this Allocation have different counts: read them with alloc.counts(module)")
        return list(self.counts_by_module[0][1])

    def total(self, module: str | None = None) -> int:
        """Experts summed over layers, for one module (default: the first)."""
        return sum(self.counts(module or self.modules[0]))

    def check_num_layers(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise MoeLoraError(
                f"the Allocation covers {self.num_layers} layers but the model has {num_layers}: rebuild it for this model"
            )

    def __repr__(self) -> str:
        if self.uniform_across_modules:
            body = f"experts_per_layer={self.experts_per_layer}, modules={self.modules}"
        else:
            body = ", ".join(f"{m}={list(c)}" for m, c in self.counts_by_module)
        return f"Allocation({body}, method={self.method!r})"

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "num_layers": self.num_layers}
        if self.uniform_across_modules:
            out["experts_per_layer"] = self.experts_per_layer
            out["total_experts_per_module"] = self.total()
        out["modules"] = {m: list(c) for m, c in self.counts_by_module}
        out["method"] = self.method
        out["provenance"] = _thaw_json(self.provenance)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "allocation") -> "Allocation":
        if not isinstance(d, Mapping):
            raise MoeLoraError(f"{source} is not a JSON object: write it with Allocation.to_json")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise MoeLoraError(f"{source} has format {fmt!r}, expected {FORMAT!r}: it was written by another tool or version")
        method = d.get("method", "manual")
        provenance = d.get("provenance") or {}
        if "modules" in d:
            if not isinstance(d["modules"], Mapping):
                raise MoeLoraError(f"{source}: 'modules' must map module names to per-layer counts")
            alloc = cls.from_counts(d["modules"], method=method, provenance=provenance)
            if "experts_per_layer" in d and alloc.uniform_across_modules:
                if list(d["experts_per_layer"]) != alloc.experts_per_layer:
                    raise MoeLoraError(f"{source}: 'experts_per_layer' disagrees with 'modules': fix one of them")
        elif "experts_per_layer" in d:
            modules = d.get("target_modules", ALL_MODULES)
            alloc = cls.from_experts_per_layer(d["experts_per_layer"], modules, method=method, provenance=provenance)
        else:
            raise MoeLoraError(f"{source} has neither 'experts_per_layer' nor 'modules': it is not an allocation file")
        if "num_layers" in d and d["num_layers"] != alloc.num_layers:
            raise MoeLoraError(f"{source}: num_layers={d['num_layers']} but the counts cover {alloc.num_layers} layers")
        return alloc

    def to_json(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the JSON atomically, creating parent directories; an existing file is kept unless `overwrite`."""
        return write_json_atomic(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Allocation":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise MoeLoraError(f"{path} does not exist: write it with `moe-lora allocate --json {path}`") from None
        except OSError as e:
            raise MoeLoraError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MoeLoraError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): rewrite it with `moe-lora allocate`") from None
        return cls.from_dict(d, source=str(path))


# The writers live in moe_lora_jax.atomic, the one module every output goes through.
from moe_lora_jax.atomic import check_new_file, publish_file, write_json_atomic  # noqa: E402,F401
