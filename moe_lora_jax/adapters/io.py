"""Adapters in and out.

Formats:
  native   adapter_config.json ({"format": "moe_lora_jax", "adapter_config": ..., "base": shapes})
           + adapter.safetensors (keys are the adapter tree paths, "layers_0/self_attn/q_proj/lora_A").
           Every method; the AdapterConfig (Allocation included) round-trips exactly.
  peft     adapter_config.json (peft_type LORA) + adapter_model.safetensors: PEFT's LoRA, loadable
           with `peft.PeftModel.from_pretrained(transformers_llama, dir)`. Plain LoRA only.
  mixlora  adapter_config.json (peft_type MIXLORA) + adapter_model.bin (a torch state dict): the
           `mixlora` package's format (`mixlora.MixLoraModelForCausalLM.from_pretrained`).

Kernels here are [in, out]; PEFT and mixlora store torch Linear weights [out, in], so A and B
are transposed on the way out and back. All writes go through `atomic_dir`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moe_lora_jax import layout
from moe_lora_jax.adapters.config import AdapterConfig
from moe_lora_jax.atomic import atomic_dir
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.model import LlamaForCausalLM
from moe_lora_jax.objective import resolve_objective

NATIVE_FORMAT = "moe_lora_jax"
# Projection and block names of the adapted linears, read from the one table (moe_lora_jax.layout).
PROJ = {lin.name: lin.proj for lin in layout.LINEARS}
SHORT = {v: k for k, v in PROJ.items()}
BLOCK = {lin.name: lin.block for lin in layout.LINEARS}


def _base_shape(model_config: Any) -> dict[str, int]:
    return {
        "hidden_size": model_config.hidden_size,
        "intermediate_size": model_config.intermediate_size,
        "num_hidden_layers": model_config.num_hidden_layers,
        "num_attention_heads": model_config.num_attention_heads,
        "num_key_value_heads": model_config.num_key_value_heads,
        "head_dim": model_config.head_dim,
    }


def adapter_shapes(model_config: Any, adapter_config: AdapterConfig) -> dict[str, Any]:
    """The adapter tree's shapes for this model (no computation)."""
    import flax.linen as nn

    model = LlamaForCausalLM(model_config, adapter_config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    return nn.unbox(shapes["adapter"])


def init_adapter(model_config: Any, adapter_config: AdapterConfig, rng: jax.Array, batch_shape=(1, 2)) -> dict:
    """The initial `adapter` collection of `LlamaForCausalLM(model_config, adapter_config)` (float32, unboxed).

    `model.init` also initialises a random base model and runs a forward pass; under jit
    with only the adapter as output XLA removes all of that, so the base weights are never
    materialised. The one initialiser: training, quickstart and the docs all use it.
    """
    import flax.linen as nn

    model = LlamaForCausalLM(model_config, adapter_config)
    init = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros(batch_shape, jnp.int32))["adapter"]))
    return jax.tree.map(lambda x: x.astype(jnp.float32), init(rng))


def check_adapter_shapes(adapter: Mapping[str, Any], model_config: Any, adapter_config: AdapterConfig,
                         source: str = "adapter") -> None:
    """Raise MoeLoraError naming the first tensor whose shape does not fit this base model."""
    want = traverse_util.flatten_dict(adapter_shapes(model_config, adapter_config), sep="/")
    have = traverse_util.flatten_dict(dict(adapter), sep="/")
    for key, leaf in want.items():
        if key not in have:
            raise MoeLoraError(f"{source} lacks the tensor {key}: it was written for a different adapter or base model")
        if tuple(np.shape(have[key])) != tuple(leaf.shape):
            raise MoeLoraError(
                f"{source}: tensor {key} has shape {tuple(np.shape(have[key]))} but this base model needs "
                f"{tuple(leaf.shape)}: the adapter was trained on a different base model shape"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise MoeLoraError(f"{source} has tensors this model does not use (e.g. {extra[0]}): it is for a different base model")


# ------------------------------------------------------------------ save
def save_adapter(out_dir: str | Path, adapter: Mapping[str, Any], adapter_config: AdapterConfig, model_config: Any,
                 format: str = "native", base_model_name_or_path: str | None = None, replace: bool = False) -> Path:
    """Write `adapter` to a new directory `out_dir` in `format` ("native", "peft" or "mixlora").

    With `replace` an existing `out_dir` is swapped for the new one in one step (a run's own final adapter)."""
    import flax.linen as nn

    adapter = nn.unbox(adapter)
    check_adapter_shapes(adapter, model_config, adapter_config)
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(dict(adapter), sep="/").items()}
    base_name = base_model_name_or_path or ""
    if format == "native":
        from safetensors.numpy import save_file

        meta = {"format": NATIVE_FORMAT, "adapter_config": adapter_config.to_dict(), "base": _base_shape(model_config)}
        with atomic_dir(out_dir, replace=replace) as tmp:
            save_file(flat, str(tmp / "adapter.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2))
        return Path(out_dir)
    if format == "peft":
        if "peft" not in adapter_config.spec.export_formats:
            raise MoeLoraError(f"PEFT's format holds plain LoRA, not {adapter_config.method}: save with format='native'")
        from safetensors.numpy import save_file

        tensors = {}
        for i in range(model_config.num_hidden_layers):
            for t in adapter_config.targets:
                leaf = adapter[f"layers_{i}"][BLOCK[t]][PROJ[t]]
                prefix = f"base_model.model.{layout.linear(t).hf_module(i)}"
                tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(leaf["lora_A"], np.float32).T)
                tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(leaf["lora_B"], np.float32).T)
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_name or None,
            "r": adapter_config.rank,
            "lora_alpha": adapter_config.alpha,
            "lora_dropout": adapter_config.dropout,
            "use_rslora": adapter_config.use_rslora,
            "target_modules": [PROJ[t] for t in adapter_config.targets],
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
        }
        with atomic_dir(out_dir, replace=replace) as tmp:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        return Path(out_dir)
    if format == "mixlora":
        return _save_mixlora(out_dir, adapter, adapter_config, model_config, base_name, replace)
    raise MoeLoraError(f"unknown adapter format {format!r}: use native, peft or mixlora")


def _save_mixlora(out_dir, adapter, ac: AdapterConfig, model_config, base_name: str, replace: bool = False) -> Path:
    if "mixlora" not in ac.spec.export_formats:
        raise MoeLoraError(f"the mixlora format holds MixLoRA adapters, not {ac.method}: save with format='native'")
    if ac.dropout <= 0.0:
        raise MoeLoraError("the mixlora package refuses lora_dropout=0: set AdapterConfig.dropout > 0 (e.g. 0.05)")
    if float(ac.alpha) != int(ac.alpha):  # mixlora's config check asserts an int lora_alpha
        raise MoeLoraError(f"the mixlora package needs an integer lora_alpha, not {ac.alpha}: use a whole-number alpha")
    if ac.top_k == 1 and ac.renormalize != "always":  # the package divides by the sum at k = 1: its gate is 1
        raise MoeLoraError("the mixlora package gates a top-1 expert by 1, this adapter by its router probability: "
                           "train it with renormalize='always' to export it in the mixlora format, or save it as native")
    import torch

    weights = {}
    for i in range(model_config.num_hidden_layers):
        layer = adapter[f"layers_{i}"]
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.tensor(np.asarray(layer["mlp"]["router"]).T.copy())
        for t in ac.targets:
            leaf = layer[BLOCK[t]][PROJ[t]]
            a, b = np.asarray(leaf["lora_A"], np.float32), np.asarray(leaf["lora_B"], np.float32)
            if BLOCK[t] == "self_attn":
                prefix = f"mixlora.layers.{i}.self_attn.{PROJ[t]}"
                weights[f"{prefix}.lora_A.weight"] = torch.tensor(a.T.copy())
                weights[f"{prefix}.lora_B.weight"] = torch.tensor(b.T.copy())
            else:
                for e in range(ac.num_experts):
                    prefix = f"mixlora.layers.{i}.mlp.{PROJ[t]}.experts.{e}"
                    weights[f"{prefix}.lora_A.weight"] = torch.tensor(a[e].T.copy())
                    weights[f"{prefix}.lora_B.weight"] = torch.tensor(b[e].T.copy())
    cfg = {
        "bias": "none",
        "peft_type": "MIXLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": ac.rank,
        "lora_alpha": int(ac.alpha),
        "lora_dropout": float(ac.dropout),
        "use_rslora": ac.use_rslora,
        "target_modules": [PROJ[t] for t in ac.targets],
        "routing_strategy": "mixlora",
        "num_experts": ac.num_experts,
        "top_k": ac.top_k,
        # a training weight, not the adapter's: the objective's default for mixlora (MoE-PEFT's 0.001)
        "router_aux_loss_coef": float(_mixlora_switch_default()),  # mixlora asserts floats here
        "router_init_range": float(ac.router_init_range),
        "jitter_noise": float(ac.router_jitter),
        "act_fn": "silu",
    }
    with atomic_dir(out_dir, replace=replace) as tmp:
        torch.save(weights, tmp / "adapter_model.bin")
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out_dir)


# ------------------------------------------------------------------ load
def load_adapter(path: str | Path, model_config: Any | None = None) -> tuple[AdapterConfig, dict[str, Any]]:
    """Read an adapter directory (native, PEFT LoRA or mixlora) into (AdapterConfig, adapter tree).

    With `model_config` the tensors are checked against that base model's shapes.
    """
    d = Path(path)
    cfg_file = d / "adapter_config.json"
    if not cfg_file.is_file():
        raise MoeLoraError(f"{d} has no adapter_config.json: point at a saved adapter directory")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise MoeLoraError(f"{cfg_file} is not valid JSON ({e.msg}): the adapter is damaged") from None
    if meta.get("format") == NATIVE_FORMAT:
        ac, adapter = _load_native(d, meta)
    elif str(meta.get("peft_type", "")).upper() == "LORA":
        ac, adapter = _load_peft(d, meta)
    elif str(meta.get("peft_type", "")).upper() == "MIXLORA":
        ac, adapter = _load_mixlora(d, meta)
    else:
        raise MoeLoraError(
            f"{cfg_file}: peft_type={meta.get('peft_type')!r} is not supported: adapters must be PEFT LoRA, "
            "mixlora or this project's own format"
        )
    if model_config is not None:
        # tensors first, so the error names the first tensor that does not fit; then the recorded base
        # shape, which also catches differences the tensors cannot show (e.g. heads vs head_dim)
        check_adapter_shapes(adapter, model_config, ac, source=str(d))
        _check_recorded_base(d, meta.get("base", {}), model_config)
    return ac, adapter


def _check_recorded_base(d: Path, recorded: Mapping[str, Any], model_config: Any) -> None:
    base = _base_shape(model_config)
    for key, value in recorded.items():
        if base.get(key) != value:
            raise MoeLoraError(
                f"{d} was trained on a base model with {key}={value} but this model has {base.get(key)}: "
                "load it on the base model it was trained for"
            )


def _load_native(d: Path, meta: Mapping[str, Any]):
    from safetensors.numpy import load_file

    ac = AdapterConfig.from_dict(meta["adapter_config"])
    flat = load_file(str(d / "adapter.safetensors"))
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    return ac, tree


_PEFT_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+?_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def _read_torch_or_safetensors(d: Path, stem: str) -> dict[str, np.ndarray]:
    st, bin_ = d / f"{stem}.safetensors", d / f"{stem}.bin"
    if st.is_file():
        from safetensors.numpy import load_file

        return load_file(str(st))
    if bin_.is_file():
        import torch

        return {k: v.float().numpy() for k, v in torch.load(bin_, map_location="cpu", weights_only=True).items()}
    raise MoeLoraError(f"{d} has neither {stem}.safetensors nor {stem}.bin: the adapter weights are missing")


def _load_peft(d: Path, meta: Mapping[str, Any]):
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise MoeLoraError(f"{d}: PEFT rank_pattern/alpha_pattern (per-module ranks) are not supported")
    if meta.get("use_dora"):
        raise MoeLoraError(f"{d}: DoRA adapters are not supported: export a plain LoRA")
    tensors = _read_torch_or_safetensors(d, "adapter_model")
    tree: dict = {}
    targets = set()
    for key, value in tensors.items():
        m = _PEFT_KEY.search(key)
        if m is None:
            raise MoeLoraError(f"{d}: tensor {key} is not a LoRA weight of a LLaMA linear: only {'/'.join(PROJ)} are supported")
        layer, block, proj, ab = m.groups()
        if proj not in SHORT:
            raise MoeLoraError(f"{d}: unknown target module {proj}: use one of {', '.join(SHORT)}")
        targets.add(SHORT[proj])
        tree.setdefault(f"layers_{layer}", {}).setdefault(block, {}).setdefault(proj, {})[f"lora_{ab}"] = jnp.asarray(
            np.asarray(value, np.float32).T
        )
    ranks = {v["lora_A"].shape[1] for b in tree.values() for blk in b.values() for v in blk.values()}
    if len(ranks) != 1:
        raise MoeLoraError(f"{d}: LoRA ranks differ between modules ({sorted(ranks)}): only one rank is supported")
    ac = AdapterConfig(
        method="lora",
        rank=int(meta.get("r", ranks.pop())),
        alpha=float(meta.get("lora_alpha", 8)),
        dropout=float(meta.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(meta.get("use_rslora", False)),
        target_modules=tuple(t for t in PROJ if t in targets),
    )
    return ac, tree


def _load_mixlora(d: Path, meta: Mapping[str, Any]):
    if meta.get("routing_strategy", "mixlora") != "mixlora":
        raise MoeLoraError(f"{d}: routing_strategy={meta.get('routing_strategy')!r}: only 'mixlora' is supported")
    if meta.get("use_dora"):
        raise MoeLoraError(f"{d}: DoRA experts are not supported: export a plain MixLoRA")
    tensors = _read_torch_or_safetensors(d, "adapter_model")
    raw_targets = meta.get("target_modules", [])
    if isinstance(raw_targets, dict):
        raw_targets = [k for k, v in raw_targets.items() if v]
    targets = tuple(t for t in PROJ if PROJ[t] in raw_targets)
    E = int(meta["num_experts"])
    ac = AdapterConfig(
        method="mixlora",
        rank=int(meta["r"]),
        alpha=float(meta["lora_alpha"]),
        dropout=float(meta.get("lora_dropout", 0.05)),
        use_rslora=bool(meta.get("use_rslora", False)),
        target_modules=targets,
        num_experts=E,
        top_k=int(meta.get("top_k", 2)),
        # the package divides the top-k weights by their sum at every k (at top-1 its gate is 1)
        renormalize="always" if int(meta.get("top_k", 2)) == 1 else True,
        router_jitter=float(meta.get("jitter_noise", 0.0)),
        router_init_range=float(meta.get("router_init_range", 0.02)),
    )
    layers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"mixlora\.layers\.(\d+)\.", k))})
    tree: dict = {}
    try:
        for i in layers:
            p = f"mixlora.layers.{i}"
            layer = tree.setdefault(f"layers_{i}", {})
            layer.setdefault("mlp", {})["router"] = jnp.asarray(np.asarray(tensors[f"{p}.mlp.moe_gate.weight"]).T)
            for t in targets:
                if BLOCK[t] == "self_attn":
                    q = f"{p}.self_attn.{PROJ[t]}"
                    layer.setdefault("self_attn", {})[PROJ[t]] = {
                        "lora_A": jnp.asarray(np.asarray(tensors[f"{q}.lora_A.weight"]).T),
                        "lora_B": jnp.asarray(np.asarray(tensors[f"{q}.lora_B.weight"]).T),
                    }
                else:
                    q = f"{p}.mlp.{PROJ[t]}.experts"
                    layer["mlp"][PROJ[t]] = {
                        "lora_A": jnp.asarray(np.stack([np.asarray(tensors[f"{q}.{e}.lora_A.weight"]).T for e in range(E)])),
                        "lora_B": jnp.asarray(np.stack([np.asarray(tensors[f"{q}.{e}.lora_B.weight"]).T for e in range(E)])),
                    }
    except KeyError as e:
        raise MoeLoraError(f"{d}: adapter_model.bin lacks {e.args[0]}: the file does not match its adapter_config.json") from None
    return ac, tree


def _mixlora_switch_default() -> float:
    return resolve_objective(None, "mixlora").switch_coef
