"""What the subcommands share: the --model argument. Subcommand modules import this module and the
library, never each other (the package is a tree: __init__ -> subcommands -> common)."""

from __future__ import annotations

import argparse

MODEL_HELP = "HF model directory, .gguf file, orbax directory from `moe-lora convert`, or hub id (default: embedded SmolLM2-135M-Instruct)"


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
