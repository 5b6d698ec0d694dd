"""Study files: a shared base train config, seeds, and arms of dotted overrides.

    study = load_study("experiments/reproduce/a_mola_shapes.yaml", sets=["seeds=[0]"], overlays=[])
    study.arms[0].name, study.seeds, study.content_hash()

A study file (YAML):

    base: ../configs/small.yaml     # a train config file, relative to the study file, or an inline mapping
    seeds: [0, 1, 2]                # each arm runs once per seed (train `seed` and `data.seed`)
    compares_budgets: false         # true: arms may differ in trainable parameters (no warning)
    eval: {examples: 60, split: test, max_new_tokens: 24, batch_size: 16}
    decode_benchmark: {arms: [lora, milora], beams: [1, 3], new_tokens: 32, rounds: 3}   # optional
    arms:
      - name: mola-2468
        set: {adapter.method: mola, adapter.allocation: {method: mola-2468, total: 120}}

Overlays (`--overlay FILE`, e.g. experiments/reproduce/paper_scale/mola.yaml) have the same
keys but every one optional: their `base` is merged key by key over the study's base, other
keys replace the study's. `--set KEY=VALUE` then sets study keys (`seeds`, `eval.*`,
`compares_budgets`, `decode_benchmark.*`) or, for any other key, a train-config override
applied to every arm after the arm's own `set`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from moe_lora_jax.errors import MoeLoraError

STUDY_KEYS = ("base", "seeds", "arms", "compares_budgets", "eval", "decode_benchmark")
EVAL_DEFAULTS = {"examples": 60, "split": "test", "max_new_tokens": 24, "batch_size": 16}
DECODE_DEFAULTS = {"arms": [], "beams": [1, 3], "new_tokens": 32, "rounds": 3, "prompt": "Sort these words: pear apple fig"}
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a directory name on every filesystem


@dataclass(frozen=True)
class Arm:
    name: str
    set: Mapping[str, Any]  # dotted train-config key -> value


@dataclass(frozen=True)
class Study:
    path: Path | None  # the study file (None: built in code)
    base: Mapping[str, Any]  # the base train config as a nested mapping (file read, overlays merged)
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    compares_budgets: bool = False
    eval: Mapping[str, Any] = field(default_factory=lambda: dict(EVAL_DEFAULTS))
    decode_benchmark: Mapping[str, Any] | None = None
    train_sets: tuple[str, ...] = ()  # `--set` train-config overrides for every arm, applied last

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "seeds": list(self.seeds), "arms": [{"name": a.name, "set": dict(a.set)} for a in self.arms],
            "compares_budgets": self.compares_budgets, "eval": dict(self.eval),
            "decode_benchmark": None if self.decode_benchmark is None else dict(self.decode_benchmark),
            "train_sets": list(self.train_sets),
        }

    def content_hash(self) -> str:
        """sha256 of the resolved study (base content, arms, seeds, eval, sets): comments and paths do not count."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MoeLoraError(f"{what} {path} does not exist: check the path (relative paths are from the study file)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MoeLoraError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None


def deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """`a` with `b`'s keys merged in; nested mappings are merged, everything else is replaced."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _base_mapping(value: Any, where: Path | None, label: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        path = Path(value) if where is None or Path(value).is_absolute() else where.parent / value
        raw = _read_yaml(path, f"{label}: base config")
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise MoeLoraError(f"{path} (the base config) must hold a mapping of sections, not {type(raw).__name__}")
        return dict(raw)
    raise MoeLoraError(f"{label}: base must be a train config file name or a mapping, not {type(value).__name__}")


def _seeds(value: Any, label: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise MoeLoraError(f"{label}: seeds must be a non-empty list of integers, e.g. seeds: [0, 1, 2]")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in value):
        raise MoeLoraError(f"{label}: seeds {value!r} must be non-negative integers, e.g. seeds: [0, 1, 2]")
    if len(set(value)) != len(value):
        raise MoeLoraError(f"{label}: seeds {value!r} repeat a seed: list each once")
    return tuple(value)


def _arms(value: Any, label: str) -> tuple[Arm, ...]:
    if not isinstance(value, list) or not value:
        raise MoeLoraError(f"{label}: arms must be a non-empty list of {{name: ..., set: {{key: value}}}}")
    arms, seen = [], set()
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "name" not in item:
            raise MoeLoraError(f"{label}: arms[{i}] must be a mapping with a name (and a set of overrides)")
        unknown = sorted(set(item) - {"name", "set"})
        if unknown:
            raise MoeLoraError(f"{label}: arms[{i}] has unknown key(s) {unknown}: an arm has only name and set")
        name = str(item["name"])
        if not ARM_NAME.match(name):
            raise MoeLoraError(f"{label}: arm name {name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        if name in seen:
            raise MoeLoraError(f"{label}: arm name {name!r} is used twice: give each arm its own name")
        seen.add(name)
        sets = item.get("set") or {}
        if not isinstance(sets, Mapping):
            raise MoeLoraError(f"{label}: arm {name!r}: set must be a mapping of dotted keys to values, e.g. {{adapter.rank: 8}}")
        for key in sets:
            if key in ("output_dir", "seed", "data.seed"):
                raise MoeLoraError(f"{label}: arm {name!r} sets {key}, which the runner sets per run: remove it")
        arms.append(Arm(name=name, set=dict(sets)))
    return tuple(arms)


def _section(value: Any, defaults: Mapping[str, Any], key: str, label: str) -> dict[str, Any]:
    if value is None:
        return dict(defaults)
    if not isinstance(value, Mapping):
        raise MoeLoraError(f"{label}: {key} must be a mapping with keys {', '.join(defaults)}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise MoeLoraError(f"{label}: unknown {key} key(s) {unknown}: valid keys are {', '.join(defaults)}")
    return {**defaults, **value}


def _check_eval(ev: Mapping[str, Any], label: str) -> None:
    for key in ("examples", "max_new_tokens", "batch_size"):
        v = ev[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "examples" else 1):
            raise MoeLoraError(f"{label}: eval.{key}={v!r} must be an integer >= {0 if key == 'examples' else 1}")


def _check_decode(dec: Mapping[str, Any], arm_names: Sequence[str], label: str) -> None:
    unknown = sorted(set(dec["arms"]) - set(arm_names))
    if unknown:
        raise MoeLoraError(f"{label}: decode_benchmark.arms names {unknown}, which are not arms: use some of {list(arm_names)}")
    beams = dec["beams"]
    if not isinstance(beams, list) or not beams or any(not isinstance(b, int) or b < 1 for b in beams):
        raise MoeLoraError(f"{label}: decode_benchmark.beams={beams!r} must be a list of positive integers, e.g. [1, 3]")
    for key in ("new_tokens", "rounds"):
        if not isinstance(dec[key], int) or dec[key] < 1:
            raise MoeLoraError(f"{label}: decode_benchmark.{key}={dec[key]!r} must be a positive integer")


def _apply_study_set(raw: dict[str, Any], item: str) -> tuple[dict[str, Any], str | None]:
    """`--set KEY=VALUE`: a study key changes `raw`; anything else is returned as a train override."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise MoeLoraError(f"--set {item!r} has no KEY=: write e.g. --set seeds=[0] or --set loop.steps=5")
    head = key.split(".")[0]
    if head not in ("seeds", "eval", "compares_budgets", "decode_benchmark"):
        return raw, item
    parsed = yaml.safe_load(value)
    out = dict(raw)
    if "." in key:
        section, sub = key.split(".", 1)
        out[section] = {**dict(out.get(section) or {}), sub: parsed}
    else:
        out[key] = parsed
    return out, None


def parse_study(raw: Any, path: Path | None = None, *, overlays: Sequence[Path | Mapping[str, Any]] = (),
                sets: Sequence[str] = ()) -> Study:
    """A Study from a parsed study mapping (and its file, for relative base paths); one-line errors."""
    label = str(path) if path is not None else "study"
    if not isinstance(raw, Mapping):
        raise MoeLoraError(f"{label} must be a mapping with base, seeds and arms, not {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise MoeLoraError(f"{label}: unknown key(s) {unknown}: a study has {', '.join(STUDY_KEYS)}")
    for key in ("base", "seeds", "arms"):
        if key not in raw:
            raise MoeLoraError(f"{label}: missing {key!r}: a study needs base, seeds and arms (see docs/reproduce.md)")
    raw = dict(raw)
    raw["base"] = _base_mapping(raw["base"], path, label)
    for overlay in overlays:  # paper scale: the same study on another model, data and schedule
        o_label = str(overlay) if not isinstance(overlay, Mapping) else "overlay"
        o_raw = overlay if isinstance(overlay, Mapping) else _read_yaml(Path(overlay), "overlay")
        if not isinstance(o_raw, Mapping):
            raise MoeLoraError(f"{o_label} must be a mapping of study keys ({', '.join(STUDY_KEYS)})")
        bad = sorted(set(o_raw) - set(STUDY_KEYS) - {"arms"}) + (["arms"] if "arms" in o_raw else [])
        if bad:
            raise MoeLoraError(f"{o_label}: key(s) {bad} cannot be overlaid: an overlay has base, seeds, compares_budgets, eval, decode_benchmark")
        for key, value in o_raw.items():
            if key == "base":
                o_path = None if isinstance(overlay, Mapping) else Path(overlay)
                raw["base"] = deep_merge(raw["base"], _base_mapping(value, o_path, o_label))
            else:
                raw[key] = value
    train_sets = []
    for item in sets:
        raw, train_set = _apply_study_set(raw, item)
        if train_set is not None:
            train_sets.append(train_set)
    cb = raw.get("compares_budgets", False)
    if not isinstance(cb, bool):
        raise MoeLoraError(f"{label}: compares_budgets={cb!r} must be true or false")
    arms = _arms(raw["arms"], label)
    ev = _section(raw.get("eval"), EVAL_DEFAULTS, "eval", label)
    _check_eval(ev, label)
    dec = raw.get("decode_benchmark")
    if dec is not None:
        dec = _section(dec, DECODE_DEFAULTS, "decode_benchmark", label)
        _check_decode(dec, [a.name for a in arms], label)
    for key in ("output_dir", "seed"):
        if key in raw["base"]:
            raw["base"] = {k: v for k, v in raw["base"].items() if k != key}  # the runner sets them per run
    return Study(path=path, base=raw["base"], seeds=_seeds(raw["seeds"], label), arms=arms, compares_budgets=cb,
                 eval=ev, decode_benchmark=dec, train_sets=tuple(train_sets))


def load_study(path: str | Path, *, overlays: Sequence[str | Path] = (), sets: Sequence[str] = ()) -> Study:
    """Read and check a study file (see the module docstring); `overlays` and `sets` as `moe-lora sweep`'s flags."""
    p = Path(path)
    raw = _read_yaml(p, "study file")
    return parse_study(raw, p, overlays=[Path(o) for o in overlays], sets=sets)
