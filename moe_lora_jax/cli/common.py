"""What the subcommands share: the --model argument. Subcommand modules import this module and the
library, never each other (the package is a tree: __init__ -> subcommands -> common)."""

from __future__ import annotations

import argparse
import logging
import sys

MODEL_HELP = "HF model directory, .gguf file, orbax directory from `moe-lora convert`, or hub id (default: embedded SmolLM2-135M-Instruct)"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (pytest and notebooks swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging() -> None:
    """The package's warnings as plain lines on stderr, the same on every run of a process.

    Without a handler of its own the first run's warnings go to logging's last-resort handler (the
    bare message) and, once any library has called a module-level `logging.warning`, later ones go
    to the root logger's basic format ("WARNING:moe_lora_jax.data.pipeline: ...")."""
    logger = logging.getLogger("moe_lora_jax")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
