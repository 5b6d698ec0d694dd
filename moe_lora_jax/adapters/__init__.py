"""Adapters: LoRA, expert banks and routers (MoLoRA, MoLA, LoRAMoE), MoV, MixLoRA, MiLoRA.

Each method is one file here (lora.py, molora.py, mov.py, mola.py, loramoe.py, mixlora.py, milora.py)
declaring its `MethodSpec` in the registry (registry.py); `AdapterConfig` describes one adapter;
`LlamaForCausalLM(config, adapter_config)` builds it;
`load_adapter` / `save_adapter` read and write PEFT, mixlora and the project's own format;
`merge_lora` folds a plain LoRA into the base kernels for serving.
"""

from moe_lora_jax.adapters.config import AdapterConfig
from moe_lora_jax.adapters.merge import merge_lora
from moe_lora_jax.adapters.registry import REGISTRY, MethodSpec, get_method, register

__all__ = [
    "METHODS", "REGISTRY", "AdapterConfig", "MethodSpec", "get_method", "register",
    "load_adapter", "save_adapter", "init_adapter", "merge_lora",
]


def __getattr__(name):
    if name == "METHODS":  # the registered methods, read when asked
        from moe_lora_jax.adapters.registry import method_names

        return method_names()
    if name in ("load_adapter", "save_adapter", "init_adapter"):
        from moe_lora_jax.adapters import io  # local: io imports the model, which imports this package (a cycle)

        return getattr(io, name)
    raise AttributeError(name)
