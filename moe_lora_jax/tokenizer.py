"""Tokenizers for the same model names `load_hf_llama` accepts."""

from __future__ import annotations

import os
import warnings
from typing import Any

from moe_lora_jax.convert.sources import resolve_hf_dir
from moe_lora_jax.errors import MoeLoraError


def load_tokenizer(model: str | os.PathLike) -> Any:
    """The Hugging Face tokenizer stored with `model` (directory, .gguf file or hub id)."""
    from transformers import AutoTokenizer

    hf_dir = resolve_hf_dir(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        except (OSError, ValueError) as e:
            raise MoeLoraError(f"no usable tokenizer in {hf_dir} ({str(e).splitlines()[0]}): save one there with tokenizer.save_pretrained") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
