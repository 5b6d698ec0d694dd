"""The `moe-lora` command line. Each subcommand is a small function of its parsed arguments."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from moe_lora_jax.errors import MoeLoraError

MODEL_HELP = "HF model directory, .gguf file, orbax directory from `moe-lora convert`, or hub id (default: embedded SmolLM2-135M-Instruct)"


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)


def _load(model: str | None, **kwargs):
    from moe_lora_jax.convert import load_llama
    from moe_lora_jax.embedded import resolve_model_path

    path = resolve_model_path(model)
    return path, *load_llama(path, progress=True, **kwargs)


# ----------------------------------------------------------------------------- info
def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's architecture and parameter counts")
    _add_model_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--presets", action="store_true",
                   help="list the paper presets (adapter.preset: NAME) with each value's source, instead of a model")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    import dataclasses

    import jax

    from moe_lora_jax.embedded import DEFAULT_MODEL_NAME

    if getattr(args, "presets", False):
        from moe_lora_jax.adapters.presets import format_presets, presets_as_dict

        print(json.dumps(presets_as_dict(), indent=2) if args.json else format_presets())
        return 0
    path, config, params = _load(args.model)
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


# -------------------------------------------------------------------------- convert
def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert HF/GGUF weights to an orbax checkpoint, or an orbax checkpoint back to a HF directory",
    )
    _add_model_arg(p)
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--to",
        choices=("orbax", "hf"),
        default=None,
        help="output format (default: hf for an orbax input, orbax otherwise)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="parameter dtype of the output")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from moe_lora_jax.atomic import ensure_new_dir
    from moe_lora_jax.convert import save_hf_llama, save_orbax_llama
    from moe_lora_jax.convert.orbax_io import is_orbax_model
    from moe_lora_jax.embedded import resolve_model_path
    from moe_lora_jax.tokenizer import load_tokenizer

    ensure_new_dir(args.out)  # fail before the slow load, not after
    source = resolve_model_path(args.model)
    target = args.to or ("hf" if is_orbax_model(source) else "orbax")
    path, config, params = _load(args.model, param_dtype=args.dtype)
    try:
        tokenizer = load_tokenizer(path)
    except MoeLoraError:
        tokenizer = None  # weights-only source: convert the weights anyway
    save = save_orbax_llama if target == "orbax" else save_hf_llama
    out = save(config, params, args.out, tokenizer=tokenizer)
    print(f"wrote {target} checkpoint of {path} to {out}")
    return 0


# ------------------------------------------------------------------------------ main
def _subcommands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from moe_lora_jax.cli_allocation import add_allocate_parser, add_analyze_parser
    from moe_lora_jax.cli_eval import add_eval_parser
    from moe_lora_jax.cli_generate import add_generate_parser
    from moe_lora_jax.cli_train import add_quickstart_parser, add_train_parser

    return [add_info_parser, add_convert_parser, add_generate_parser, add_eval_parser, add_train_parser,
            add_quickstart_parser, add_analyze_parser, add_allocate_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lora", description="Mixture-of-LoRA-experts fine-tuning for LLaMA models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _subcommands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoeLoraError as e:
        print(f"moe-lora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
