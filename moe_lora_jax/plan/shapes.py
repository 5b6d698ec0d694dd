"""Base models a plan can name without having them: their config.json, nothing else.

    config = plan_model_config("llama2-7b")      # or a directory / config.json path; None: the embedded SmolLM2
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.errors import MoeLoraError

_LLAMA2 = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# The published config.json fields that fix the shapes (Hugging Face model cards).
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768,
                       rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def plan_model_config(model: str | None) -> tuple[str, LlamaConfig]:
    """(what to call it, its LlamaConfig) for a named shape, a directory or config.json, or None (embedded SmolLM2)."""
    from moe_lora_jax.convert import load_llama_config
    from moe_lora_jax.embedded import resolve_model_path

    if model is not None and model.lower() in NAMED_SHAPES:
        return model.lower(), LlamaConfig.from_hf(NAMED_SHAPES[model.lower()], source=f"the built-in {model.lower()} shape")
    if model is not None and Path(model).is_file() and Path(model).name.endswith(".json"):
        try:
            raw = json.loads(Path(model).read_text())
        except (OSError, ValueError) as e:
            raise MoeLoraError(f"--model {model} is not a readable config.json ({e}): give a model directory or a named shape") from None
        return model, LlamaConfig.from_hf(raw, source=model)
    if model is not None and not Path(model).exists():
        raise MoeLoraError(f"--model {model!r} is neither a directory nor a built-in shape: use one of {', '.join(NAMED_SHAPES)} "
                           "or a directory holding config.json")
    path = resolve_model_path(model)
    return str(model or "embedded SmolLM2-135M-Instruct"), load_llama_config(path)
