"""`moe-lora convert`: HF/GGUF weights to an orbax checkpoint, or an orbax checkpoint back to a HF directory."""

from __future__ import annotations

import argparse

from moe_lora_jax.atomic import ensure_new_dir
from moe_lora_jax.cli.common import add_model_arg
from moe_lora_jax.convert import load_model, save_hf_llama, save_orbax_llama
from moe_lora_jax.convert.orbax_io import is_orbax_model
from moe_lora_jax.embedded import resolve_model_path
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.tokenizer import load_tokenizer


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert HF/GGUF weights to an orbax checkpoint, or an orbax checkpoint back to a HF directory",
    )
    add_model_arg(p)
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
    ensure_new_dir(args.out)  # fail before the slow load, not after
    source = resolve_model_path(args.model)
    target = args.to or ("hf" if is_orbax_model(source) else "orbax")
    path, config, params = load_model(args.model, param_dtype=args.dtype)
    try:
        tokenizer = load_tokenizer(path)
    except MoeLoraError:
        tokenizer = None  # weights-only source: convert the weights anyway
    save = save_orbax_llama if target == "orbax" else save_hf_llama
    out = save(config, params, args.out, tokenizer=tokenizer)
    print(f"wrote {target} checkpoint of {path} to {out}")
    return 0
