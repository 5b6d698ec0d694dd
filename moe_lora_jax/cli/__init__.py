"""The `moe-lora` command line: one module per subcommand, each a small function of its parsed arguments.

    info.py       info                  convert.py   convert
    train.py      train, quickstart     generate.py  generate
    eval.py       eval                  allocate.py  analyze, allocate
    plan.py       plan (AOT compile for a TPU slice)
    routing.py    routing (analyses of a trained adapter's routers and experts)
    sweep.py      sweep
    common.py     what they share (the --model argument)

Subcommand modules import `cli.common` and the library, never each other or this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from moe_lora_jax.cli.allocate import add_allocate_parser, add_analyze_parser
from moe_lora_jax.cli.common import configure_logging
from moe_lora_jax.cli.convert import add_convert_parser
from moe_lora_jax.cli.eval import add_eval_parser
from moe_lora_jax.cli.generate import add_generate_parser
from moe_lora_jax.cli.info import add_info_parser
from moe_lora_jax.cli.plan import add_plan_parser
from moe_lora_jax.cli.routing import add_routing_parser
from moe_lora_jax.cli.sweep import add_sweep_parser
from moe_lora_jax.cli.train import add_quickstart_parser, add_train_parser
from moe_lora_jax.errors import MoeLoraError

SUBCOMMANDS = (add_info_parser, add_convert_parser, add_generate_parser, add_eval_parser, add_train_parser,
               add_quickstart_parser, add_analyze_parser, add_allocate_parser, add_routing_parser,
               add_sweep_parser, add_plan_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lora", description="Mixture-of-LoRA-experts fine-tuning for LLaMA models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.func(args)
    except MoeLoraError as e:
        print(f"moe-lora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
