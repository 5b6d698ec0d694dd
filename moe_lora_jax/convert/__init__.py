"""Hugging Face weights in and out; `load_model_and_adapter`, the one loader of a base model plus adapter."""

from moe_lora_jax.convert.load import load_hf_llama, load_llama, load_llama_config
from moe_lora_jax.convert.loader import load_model, load_model_and_adapter
from moe_lora_jax.convert.orbax_io import load_orbax_llama, save_orbax_llama
from moe_lora_jax.convert.save import save_hf_llama
from moe_lora_jax.convert.sources import resolve_hf_dir

__all__ = ["load_hf_llama", "load_llama", "load_llama_config", "load_model", "load_model_and_adapter", "load_orbax_llama", "resolve_hf_dir", "save_hf_llama", "save_orbax_llama"]
