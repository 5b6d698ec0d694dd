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
      "top_k_per_layer": [1, 2, ...],           # optional: experts per token in each layer ({module: [...]}
                                                # when modules differ); absent: the adapter's top_k, capped
                                                # by the layer's expert count
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

from moe_lora_jax import layout
from moe_lora_jax.atomic import write_json_atomic
from moe_lora_jax.errors import MoeLoraError

ALL_MODULES: tuple[str, ...] = layout.ALL  # the adapted linears (moe_lora_jax.layout), in table order
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


def _as_top_k(value: Any, where: str, num_experts: int) -> int:
    k = _as_count(value, where)
    if k > num_experts:
        raise MoeLoraError(f"{where} routes top-{k} but that layer has {num_experts} experts: give a top-k of at most {num_experts}")
    return k


# Names the writers of earlier versions used for MoLA's shapes. "triangle" meant 8642 in MoLA's paper but
# 2468 in AlphaLoRA's explainer, so a bare name is refused; a file that recorded its digits is read by them.
LEGACY_SHAPE_NAMES: dict[str, str] = {
    "mola-triangle": "mola-8642", "mola-inverted": "mola-2468", "mola-hourglass": "mola-8228",
    "mola-uniform": "mola-5555", "triangle": "8642", "inverted": "2468", "hourglass": "8228",
}


def legacy_shape_error(name: str, where: str = "") -> MoeLoraError:
    """The one-line error for an old MoLA shape name: it names the digit form (what MoLA's paper meant)."""
    digits = LEGACY_SHAPE_NAMES[name]
    word = {"triangle": "triangle", "inverted": "inverted triangle", "hourglass": "hourglass", "uniform": "square"}
    prefix = "mola-" if name.startswith("mola-") else ""
    return MoeLoraError(
        f"{where}{name!r} is an old, ambiguous MoLA shape name (the write-ups disagree on which shape is the triangle): "
        f"name it by its digits, lowest layers first: {digits!r} is MoLA's {word[name.removeprefix('mola-')]} "
        f"(choose from {', '.join(prefix + d for d in ('8642', '2468', '5555', '8228'))})"
    )


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
    # Per-layer top-k per module (same order as counts_by_module), or None: the adapter's top_k capped by
    # each layer's expert count. Part of equality and hash: it changes the computation.
    top_k_by_module: tuple[tuple[str, tuple[int, ...]], ...] | None = None

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
        object.__setattr__(self, "top_k_by_module", self._normalise_top_k(self.top_k_by_module))

    def _normalise_top_k(self, raw: Any) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
        """None, one per-layer list for every module, or {module: per-layer list} -> per-module tuples."""
        if raw is None:
            return None
        if isinstance(raw, Mapping):
            given = dict(raw)
        elif isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
            raise MoeLoraError(f"top_k_per_layer must be a list of per-layer integers or {{module: list}}, got {raw!r}")
        else:
            items = list(raw)
            pairs = all(isinstance(i, (tuple, list)) and len(i) == 2 and isinstance(i[0], str) for i in items)
            given = dict(items) if items and pairs else {m: items for m in self.modules}
        unknown = sorted(set(given) - set(self.modules))
        if unknown:
            raise MoeLoraError(f"top_k_per_layer names {unknown}, which have no expert counts: give top-k for {', '.join(self.modules)}")
        missing = [m for m in self.modules if m not in given]
        if missing:
            raise MoeLoraError(f"top_k_per_layer gives nothing for {', '.join(missing)}: give one list for every module, or one list for all")
        out = []
        for module, counts in self.counts_by_module:
            ks = given[module]
            if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
                raise MoeLoraError(f"top_k_per_layer for {module} must be a list of per-layer integers, got {ks!r}")
            ks = list(ks)
            if len(ks) != len(counts):
                raise MoeLoraError(f"top_k_per_layer for {module} has {len(ks)} values for {len(counts)} layers: give one per layer")
            out.append((module, tuple(_as_top_k(k, f"top_k_per_layer of {module} in layer {i}", c)
                                      for i, (k, c) in enumerate(zip(ks, counts)))))
        return tuple(out)

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
        top_k_per_layer: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    ) -> "Allocation":
        """The same per-layer counts for every module in `modules` (and optionally a per-layer top-k)."""
        if isinstance(modules, str):
            modules = (modules,)
        counts = tuple(experts_per_layer)
        return cls(tuple((m, counts) for m in modules), method=method, provenance=provenance or {},
                   top_k_by_module=top_k_per_layer)

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, Sequence[int]], *, method: str = "manual", provenance: Mapping[str, Any] | None = None,
        top_k_per_layer: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    ) -> "Allocation":
        """From {module: per-layer counts} (and optionally a per-layer top-k: one list, or {module: list})."""
        if not isinstance(counts, Mapping):
            raise MoeLoraError(f"counts must map module names to per-layer counts, got {type(counts).__name__}")
        return cls(tuple(counts.items()), method=method, provenance=provenance or {}, top_k_by_module=top_k_per_layer)

    def with_top_k(self, top_k_per_layer: Sequence[int] | Mapping[str, Sequence[int]] | None) -> "Allocation":
        """The same counts and provenance with this per-layer top-k (None: the adapter's top_k, capped)."""
        return dataclasses.replace(self, top_k_by_module=top_k_per_layer)

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

    def top_k(self, module: str) -> tuple[int, ...] | None:
        """Per-layer top-k of `module`, or None when the Allocation leaves it to the adapter's top_k."""
        if self.top_k_by_module is None:
            return None
        self.counts(module)  # a module without counts is an error, as there
        return dict(self.top_k_by_module)[module]

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
        if self.top_k_by_module is not None:
            ks = {k for _, k in self.top_k_by_module}
            body += f", top_k_per_layer={list(next(iter(ks)))}" if len(ks) == 1 else f", top_k_per_layer={self._top_k_json()}"
        return f"Allocation({body}, method={self.method!r})"

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "num_layers": self.num_layers}
        if self.uniform_across_modules:
            out["experts_per_layer"] = self.experts_per_layer
            out["total_experts_per_module"] = self.total()
        out["modules"] = {m: list(c) for m, c in self.counts_by_module}
        if self.top_k_by_module is not None:
            out["top_k_per_layer"] = self._top_k_json()
        out["method"] = self.method
        out["provenance"] = _thaw_json(self.provenance)
        return out

    def _top_k_json(self) -> list[int] | dict[str, list[int]]:
        assert self.top_k_by_module is not None
        if len({k for _, k in self.top_k_by_module}) == 1:
            return list(self.top_k_by_module[0][1])
        return {m: list(k) for m, k in self.top_k_by_module}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "allocation") -> "Allocation":
        if not isinstance(d, Mapping):
            raise MoeLoraError(f"{source} is not a JSON object: write it with Allocation.to_json")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise MoeLoraError(f"{source} has format {fmt!r}, expected {FORMAT!r}: it was written by another tool or version")
        method = d.get("method", "manual")
        provenance = d.get("provenance") or {}
        if method in LEGACY_SHAPE_NAMES:
            # written before the shapes were named by digits: the digits it recorded say which shape it is
            digits = provenance.get("shape") if isinstance(provenance, Mapping) else None
            if not (isinstance(digits, str) and len(digits) == 4 and digits.isdigit()):
                raise legacy_shape_error(method, f"{source}: method ")
            method = f"mola-{digits}"
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
        if d.get("top_k_per_layer") is not None:  # files written before per-layer top-k have none
            try:
                alloc = alloc.with_top_k(d["top_k_per_layer"])
            except MoeLoraError as e:
                raise MoeLoraError(f"{source}: {e}") from None
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
