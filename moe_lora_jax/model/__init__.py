"""The Flax LLaMA model."""

from moe_lora_jax.model.llama import KVCache, LlamaForCausalLM, TargetLinear

__all__ = ["KVCache", "LlamaForCausalLM", "TargetLinear"]
