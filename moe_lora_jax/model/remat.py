"""Rematerialisation policies for the decoder layers (`model.remat` in a train config).

    none            keep every activation for the backward pass (most memory, no recomputation)
    dots            keep every matmul output, recompute the elementwise ops (norms, RoPE, SiLU, softmax)
    dots_no_batch   keep the outputs of matmuls without batch dimensions (the projections and adapters),
                    recompute the attention score/value products and the elementwise ops
    full            keep only each layer's input, recompute the whole layer

Listed from least to most recomputation (`REMAT_POLICIES` keeps that order; `moe-lora plan --suggest`
walks it). Old configs' booleans still work: true is `full`, false is `none`. Every policy gives the
same numbers; they trade memory for compute. The policy applies per decoder layer, in the unrolled
loop (`nn.remat`) and in the scanned body (`jax.checkpoint`).
"""

from __future__ import annotations

from typing import Any, Callable

from moe_lora_jax.errors import MoeLoraError

REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def normalize_remat(value: Any, key: str = "model.remat") -> str:
    """The policy name for `value`: a name from REMAT_POLICIES, or a boolean (true = full, false = none)."""
    if isinstance(value, bool) or value in (0, 1):
        return "full" if value else "none"
    text = str(value).strip().lower()
    if text in _TRUE:
        return "full"
    if text in _FALSE or text in ("null", "~"):
        return "none"
    if text not in REMAT_POLICIES:
        raise MoeLoraError(f"{key}={value!r} is not a remat policy: use one of {', '.join(REMAT_POLICIES)} (true = full, false = none)")
    return text


def remat_policy(value: Any) -> Callable | None:
    """The `jax.checkpoint` policy of a remat setting (None: save nothing, i.e. full recomputation)."""
    import jax

    name = normalize_remat(value)
    if name == "dots":
        return jax.checkpoint_policies.dots_saveable
    if name == "dots_no_batch":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return None
