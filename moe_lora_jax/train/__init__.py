"""Training: configuration, optimizer, metrics (the train step and loop build on these).

Submodules are imported on use so that reading a config does not import JAX:

    from moe_lora_jax.train.config import TrainConfig, load_config, save_resolved
    from moe_lora_jax.train.optim import make_optimizer
    from moe_lora_jax.train.metrics import MetricsWriter
"""
