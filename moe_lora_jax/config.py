"""Frozen, hashable configuration dataclasses.

`LlamaConfig` describes the base architecture and its dtype policy. It is
hashable so it can be a static argument of jitted functions and a field of
Flax modules. It reads and writes Hugging Face `config.json` dictionaries in
both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the
transformers 5 layout (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from moe_lora_jax import layout
from moe_lora_jax.errors import MoeLoraError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' MistralConfig default, applied when a Mistral config.json has no `sliding_window` key
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `default` leaves the frequencies alone."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a LLaMA-family decoder plus its dtype and remat policy."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # "mistral" converts back out as MistralForCausalLM. `sliding_window` W (Mistral only; None = full
    # causal attention): the query in slot i sees the keys in slots i-W+1 .. i (transformers' rule).
    model_type: str = "llama"
    sliding_window: int | None = None
    # Dtype policy: parameters are stored in `param_dtype`, matmuls run in `dtype`;
    # RMSNorm statistics, RoPE tables and softmax are always float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Rematerialisation per decoder layer (model/remat.py): False ("none"), True ("full"), "dots", "dots_no_batch".
    remat: bool | str = False
    # Run the decoder layers as one jax.lax.scan over stacked per-layer weights (model/scan.py):
    # compile time stops growing with depth. False: the unrolled Python loop (same numbers).
    scan_layers: bool = True

    def __post_init__(self) -> None:
        _check_dims(self)
        _normalize_remat(self)
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise MoeLoraError(f"LlamaConfig.{name}={getattr(self, name)!r} is not supported: use one of {DTYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MoeLoraError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention needs it to be"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise MoeLoraError(
                f"rope scaling type {self.rope_scaling.rope_type!r} is not supported: use one of {SUPPORTED_ROPE_TYPES}"
            )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise MoeLoraError(f"LlamaConfig.model_type={self.model_type!r} is not supported: use one of {SUPPORTED_MODEL_TYPES}")
        if self.sliding_window is not None:
            if self.model_type != "mistral":
                raise MoeLoraError(
                    f"LlamaConfig.sliding_window={self.sliding_window} needs model_type='mistral' "
                    "(LlamaForCausalLM has no sliding window): set model_type='mistral' or sliding_window=None"
                )
            if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise MoeLoraError(
                    f"LlamaConfig.sliding_window={self.sliding_window!r} is not a window: use a positive integer, or None for none"
                )

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def q_width(self) -> int:
        """Output features of q_proj (moe_lora_jax.layout)."""
        return layout.dims("q", self)[1]

    @property
    def kv_width(self) -> int:
        """Output features of k_proj / v_proj (moe_lora_jax.layout)."""
        return layout.dims("k", self)[1]

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> "LlamaConfig":
        """Build from a Hugging Face config dict; unsupported features raise MoeLoraError."""
        if not isinstance(hf, Mapping):
            raise MoeLoraError(f"{source} holds a JSON {type(hf).__name__}, not an object of settings: it is not a model config")
        _check_hf_numbers(hf, source)
        _check_supported(hf, source)
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            rope_params = dict(hf.get("rope_parameters") or {})
            scaling = dict(hf.get("rope_scaling") or rope_params)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            rope = RopeScaling(
                rope_type=rope_type,
                factor=float(scaling.get("factor", 1.0)),
                low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
            )
            eos = hf.get("eos_token_id")
            kwargs = dict(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta", 10000.0)),
                rope_scaling=rope,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),)),
                pad_token_id=hf.get("pad_token_id"),
                model_type=hf.get("model_type", "llama"),
                sliding_window=_sliding_window(hf),
            )
        except KeyError as e:
            raise MoeLoraError(f"{source} lacks the field {e.args[0]!r}: it is not a complete LLaMA config") from None
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' LlamaForCausalLM (MistralForCausalLM for
        model_type 'mistral') loads (v4 and v5 keys)."""
        eos = list(self.eos_token_id)
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "mistral":  # sliding_window None is written as null: no window, not the 4096 default
            out.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=self.sliding_window)
        return out


def _normalize_remat(config: "LlamaConfig") -> None:
    """remat as False (none), True (full) or a policy name, so `if config.remat` means "remat is on"."""
    from moe_lora_jax.model.remat import normalize_remat

    name = normalize_remat(config.remat, "LlamaConfig.remat")
    object.__setattr__(config, "remat", {"none": False, "full": True}.get(name, name))


_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_dims(config: "LlamaConfig") -> None:
    """Positive whole sizes and a positive, finite RMSNorm epsilon (it guards a division by the RMS)."""
    import math
    import numbers

    for name in _DIMS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise MoeLoraError(f"LlamaConfig.{name}={value!r} must be a positive integer")
    eps = config.rms_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
        raise MoeLoraError(f"rms_norm_eps={eps!r} must be a positive finite number (LLaMA uses 1e-5 or 1e-6)")


def _check_hf_numbers(hf: Mapping[str, Any], source: str) -> None:
    """Name the config.json field whose value is not a number (null, a string, a list) before int() trips on it."""
    for key in (*_DIMS, "rms_norm_eps", "rope_theta"):
        if key not in hf:
            continue  # missing required fields are named by from_hf; optional ones take defaults
        value = hf[key]
        if value is None and key in ("num_key_value_heads", "head_dim", "rope_theta"):
            continue  # null means "derive it" in HF configs
        whole = key in _DIMS
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (not whole or float(value).is_integer())
        if not ok:
            what = "a positive integer" if whole else "a positive number"
            raise MoeLoraError(f"{source}: {key} is {json_repr(value)}, not {what}: fix the model's config.json")


def json_repr(value: Any) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_supported(hf: Mapping[str, Any], source: str) -> None:
    """Name the first feature of `hf` that this LLaMA implementation does not have."""
    model_type = hf.get("model_type", "llama")
    problems = []
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={model_type!r} (only {', '.join(SUPPORTED_MODEL_TYPES)} are supported)")
    if model_type == "mistral":
        problems += _mistral_window_problems(hf)
    elif hf.get("sliding_window") not in (None, 0) and hf.get("use_sliding_window", True):
        problems.append(
            f"sliding_window={hf['sliding_window']} with model_type={model_type!r} (sliding-window attention: "
            "transformers' LlamaForCausalLM would ignore it; set model_type to 'mistral' if the model was trained with it)"
        )
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hf.get(key):
            problems.append(f"{key}={hf[key]} (a mixture-of-experts base model)")
    for key in ("attention_bias", "mlp_bias", "qkv_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (bias terms)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only SwiGLU with silu)")
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        problems.append(f"rope scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if problems:
        raise MoeLoraError(f"{source}: unsupported architecture: {problems[0]}; convert a plain LLaMA or Mistral checkpoint instead")


def _sliding_window(hf: Mapping[str, Any]) -> int | None:
    """The window transformers applies: Mistral's (4096 when the key is absent, null = none); never LLaMA's."""
    if hf.get("model_type", "llama") != "mistral":
        return None
    window = hf.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
    return None if window is None else int(window)


def _mistral_window_problems(hf: Mapping[str, Any]) -> list[str]:
    """What a Mistral config says about its window that transformers' MistralForCausalLM would not do.

    MistralForCausalLM applies `sliding_window` to every layer and ignores Qwen2's
    `use_sliding_window` / `max_window_layers` and per-layer `layer_types`; a config whose
    fields ask for something else is refused rather than silently given a different model.
    """
    window = hf.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        return [f"sliding_window={window!r} (use a positive integer, or null for no window)"]
    if window is None:
        return []
    problems = []
    if hf.get("use_sliding_window") is False:
        problems.append(
            f"use_sliding_window=false with sliding_window={window} (MistralForCausalLM ignores use_sliding_window "
            "and applies the window; set sliding_window to null for full attention)"
        )
    if hf.get("max_window_layers") not in (None, 0):
        problems.append(
            f"max_window_layers={hf['max_window_layers']} (a Qwen2 field: only some layers sliding is not supported, "
            "MistralForCausalLM slides every layer; remove the field, or set sliding_window to null)"
        )
    layer_types = hf.get("layer_types") or []
    if any(kind != "sliding_attention" for kind in layer_types):
        problems.append(
            f"layer_types with {sorted(set(layer_types) - {'sliding_attention'})} (alternating full and sliding layers "
            "is not supported; MistralForCausalLM slides every layer)"
        )
    return problems
