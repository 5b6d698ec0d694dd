"""`moe-lora info`: a model's architecture and parameter counts, or the paper presets."""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax

from moe_lora_jax.adapters.presets import format_presets, presets_as_dict
from moe_lora_jax.cli.common import add_model_arg
from moe_lora_jax.convert import load_model
from moe_lora_jax.embedded import DEFAULT_MODEL_NAME


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's architecture and parameter counts")
    add_model_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--presets", action="store_true",
                   help="list the paper presets (adapter.preset: NAME) with each value's source, instead of a model")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    if getattr(args, "presets", False):
        print(json.dumps(presets_as_dict(), indent=2) if args.json else format_presets())
        return 0
    path, config, params = load_model(args.model)
    counts: dict[str, int] = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        group = str(key_path[0].key).split("_")[0] if str(key_path[0].key).startswith("layers_") else str(key_path[0].key)
        counts[group] = counts.get(group, 0) + int(leaf.size)
    total = sum(counts.values())
    info = {
        "model": str(path) if args.model else f"{DEFAULT_MODEL_NAME}: {path}",
        "config": dataclasses.asdict(config),
        "parameters": {"total": total, **counts},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model      {info['model']}")
    for key, value in dataclasses.asdict(config).items():
        print(f"  {key:<26} {value}")
    print("parameters")
    for key, value in counts.items():
        print(f"  {key:<26} {value:>14,}")
    print(f"  {'total':<26} {total:>14,}")
    return 0
