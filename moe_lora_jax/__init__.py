"""moe_lora_jax: mixtures of LoRA experts for LLaMA-family models in JAX/Flax."""

from moe_lora_jax.config import LlamaConfig, RopeScaling
from moe_lora_jax.convert import load_hf_llama, save_hf_llama
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.model import KVCache, LlamaForCausalLM

__version__ = "0.1.0"
__all__ = [
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MoeLoraError",
    "RopeScaling",
    "load_hf_llama",
    "save_hf_llama",
]
