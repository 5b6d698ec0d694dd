"""Adapters: LoRA, expert banks and routers (MoLoRA, MoLA, LoRAMoE), MoV, MixLoRA, MiLoRA.

`AdapterConfig` describes one; `LlamaForCausalLM(config, adapter_config)` builds it;
`load_adapter` / `save_adapter` read and write PEFT, mixlora and the project's own format;
`merge_lora` folds a plain LoRA into the base kernels for serving.
"""

from moe_lora_jax.adapters.config import METHODS, AdapterConfig
from moe_lora_jax.adapters.merge import merge_lora

__all__ = ["METHODS", "AdapterConfig", "load_adapter", "save_adapter", "init_adapter", "merge_lora"]


def __getattr__(name):
    if name in ("load_adapter", "save_adapter", "init_adapter"):
        from moe_lora_jax.adapters import io  # local: io imports the model, which imports this package (a cycle)

        return getattr(io, name)
    raise AttributeError(name)
