"""The Flax LLaMA model."""

from moe_lora_jax.model.llama import TARGET_MODULES, KVCache, LlamaForCausalLM, TargetLinear

__all__ = ["TARGET_MODULES", "KVCache", "LlamaForCausalLM", "TargetLinear"]
