"""The one conftest: tiny random LLaMAs (transformers checkpoints on disk and in-memory JAX trees with
random adapters), batches, and the embedded SmolLM2. Test files import the helpers with `from conftest import ...`."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lora_jax import LlamaConfig, LlamaForCausalLM
from moe_lora_jax.train.config import load_config


def make_hf_llama(tmp_dir, seed: int = 0, dtype: str = "float32", max_shard_size: str | None = None, **overrides):
    """Build a random transformers LlamaForCausalLM, save it under tmp_dir, return (dir, torch model).

    `model_type="mistral"` (with `sliding_window=W`) builds a MistralForCausalLM instead."""
    import torch
    import transformers

    model_type = overrides.pop("model_type", "llama")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]

    kwargs = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=70,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # transformers initialises norms to 1: randomise them so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_dir, **save_kwargs)
    return tmp_dir, model


@pytest.fixture
def hf_llama_factory(tmp_path):
    counter = iter(range(1000))

    def factory(**kwargs):
        return make_hf_llama(tmp_path / f"hf{next(counter)}", **kwargs)

    return factory


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(input_ids), attention_mask=mask).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm2():
    """(config, params, tokenizer, hf_dir) of the embedded SmolLM2-135M, loaded once per session."""
    from moe_lora_jax import load_hf_llama
    from moe_lora_jax.convert import resolve_hf_dir
    from moe_lora_jax.embedded import default_model_path
    from moe_lora_jax.tokenizer import load_tokenizer

    path = default_model_path()
    config, params = load_hf_llama(path)
    return config, params, load_tokenizer(path), resolve_hf_dir(path)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2[3], dtype=torch.float32).eval()


# In-memory tiny models and adapters (JAX side)

TINY = LlamaConfig(
    vocab_size=97, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
)


def _fill(shapes, seed: int, rule):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rule(str(path[-1].key), leaf.shape, rng)) for path, leaf in leaves]
    )


def tiny_base(config: LlamaConfig = TINY, seed: int = 0):
    """(config, params) of a random tiny LLaMA, filled with numpy (XLA compiles of `init` are slow on small CPUs)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0), ids)["params"])

    def rule(name, shape, rng):
        if name == "scale":
            return (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        return (0.02 * rng.normal(size=shape)).astype(np.float32)

    return config, _fill(shapes, seed, rule)


def adapter_shapes(config, adapter_config):
    ids = jnp.zeros((1, 4), jnp.int32)
    return nn.unbox(jax.eval_shape(LlamaForCausalLM(config, adapter_config).init, jax.random.key(0), ids)["adapter"])


def init_adapter(config, adapter_config, seed: int = 1):
    """An adapter in its initial state (B = 0, IA3 = 1, rational = GELU fit) without compiling `init`."""
    from moe_lora_jax.adapters.layers import RATIONAL_GELU_DEN, RATIONAL_GELU_NUM

    def rule(name, shape, rng):
        if name == "lora_B":
            return np.zeros(shape, np.float32)
        if name == "ia3":
            return np.ones(shape, np.float32)
        if name == "rational_num":
            return np.asarray(RATIONAL_GELU_NUM, np.float32)
        if name == "rational_den":
            return np.asarray(RATIONAL_GELU_DEN, np.float32)
        bound = 1.0 / np.sqrt(shape[-2]) if len(shape) >= 2 else 0.02
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return _fill(adapter_shapes(config, adapter_config), seed, rule)


def randomize(tree, seed: int = 2, scale: float = 0.1, keep=("ia3", "rational_num", "rational_den")):
    """Replace every adapter leaf by N(0, scale) noise (IA3 vectors: 1 + noise), so B != 0 and routers matter."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = str(path[-1].key) if hasattr(path[-1], "key") else ""
        noise = rng.normal(0, scale, leaf.shape).astype(np.float32)
        if name == "ia3":
            out.append(jnp.asarray(1.0 + noise))
        elif name in keep:
            out.append(leaf)
        else:
            out.append(jnp.asarray(noise))
    return jax.tree_util.tree_unflatten(treedef, out)


def batch(config, B: int = 3, L: int = 12, seed: int = 0, pad: bool = True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, size=(B, L)).astype(np.int32)
    mask = np.ones_like(ids)
    if pad and B > 1:
        mask[1, :3] = 0  # left padding
    if pad and B > 2:
        mask[2, L - 2 :] = 0  # right padding
    return ids, mask


# A tiny train run (train loop, outputs, guard, resume tests)

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A random 2-layer LLaMA with SmolLM2's vocabulary and tokenizer (chat template included)."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    make_hf_llama(d, vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=2, bos_token_id=1,
                  eos_token_id=2)
    smollm2[2].save_pretrained(d)
    return d


def tiny_overrides(model_dir, out_dir, *overrides: str) -> list[str]:
    """Dotted overrides of a tiny, fast run: 6 steps of MoLA on 300 bundled examples, one batch shape."""
    return [
        f"model.path={model_dir}", f"output_dir={out_dir}", "data.bundled_size=300", "data.template=chat",
        "data.batching=fixed", "data.max_len=96", "loop.steps=6", "loop.global_batch=8", "loop.log_every=1",
        "loop.eval_every=100", "loop.eval_batches=1", "checkpoint.every=2", "checkpoint.async_save=false",
        "adapter.method=mola", "adapter.num_experts=3", "adapter.rank=4", "optim.lr=1e-2", "optim.warmup_steps=1",
        *overrides,
    ]


def tiny_config(model_dir, out_dir, *overrides: str):
    return load_config(None, tiny_overrides(model_dir, out_dir, *overrides))
