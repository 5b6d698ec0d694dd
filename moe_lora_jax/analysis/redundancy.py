"""MoLA's expert redundancy: how far apart the experts of one linear are, from the adapter weights alone.

Expert e of a routed linear adds dW_e = scale * A_e @ B_e ([in, out]; A [E, in, r], B [E, r, out]).
Two distances per pair of experts (`stats.pairwise_distances`): the cosine distance of dW_e and dW_f
as vectors, and the Frobenius distance normalised by their norms. A layer whose experts are close
(distance near 0) holds redundant experts: MoLA's argument for fewer experts in lower layers.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from moe_lora_jax.analysis.results import clean, mean_defined
from moe_lora_jax.analysis.stats import delta_gram, mean_offdiagonal, pairwise_distances
from moe_lora_jax.errors import MoeLoraError


def expert_banks(adapter: Mapping[str, Any]) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """(layer, module, A [E, in, r], B [E, r, out]) of every linear with a bank of LoRA experts, in layer order
    (attention and FFN linears of MoLoRA / MoLA / LoRAMoE; MixLoRA's per-expert LoRA on gate / up / down)."""
    flat = traverse_util.flatten_dict(dict(adapter), sep="/")
    out = []
    for key, a in flat.items():
        if not key.endswith("/lora_A") or np.ndim(a) != 3:
            continue
        b = flat.get(key[: -len("lora_A")] + "lora_B")
        if b is None:
            continue
        m = re.search(r"(?:^|/)layers_(\d+)/", key)
        parts = key.split("/")
        out.append((int(m.group(1)) if m else -1, parts[-2], np.asarray(a), np.asarray(b)))
    return sorted(out, key=lambda r: (r[0], r[1]))


def expert_redundancy_result(adapter: Mapping[str, Any], ac: Any) -> dict[str, Any]:
    """Per linear: every expert's |dW|_F and the two [E, E] distance matrices with their mean over pairs;
    per layer: the mean of those means over the layer's linears (null where no pair is defined: one
    expert, or experts whose B is still zero)."""
    banks = expert_banks(adapter)
    if not banks:
        raise MoeLoraError(f"the {ac.method} adapter has no bank of LoRA experts (lora_A [E, in, r]): nothing to compare")
    linears, by_layer = [], {}
    for layer, module, a, b in banks:
        gram = delta_gram(a, b, ac.scale)
        cos, frob = pairwise_distances(gram)
        row = {"layer": layer, "module": module, "num_experts": int(a.shape[0]),
               "norms": np.sqrt(np.maximum(np.diag(gram), 0.0)),
               "cosine_distance": cos, "frobenius_distance": frob,
               "mean_cosine_distance": mean_offdiagonal(cos), "mean_frobenius_distance": mean_offdiagonal(frob)}
        linears.append(row)
        by_layer.setdefault(layer, []).append(row)
    layers = [{"layer": layer, "num_experts": {r["module"]: r["num_experts"] for r in rows},
               "mean_cosine_distance": mean_defined([r["mean_cosine_distance"] for r in rows]),
               "mean_frobenius_distance": mean_defined([r["mean_frobenius_distance"] for r in rows])}
              for layer, rows in sorted(by_layer.items())]
    return clean({
        "analysis": "expert_redundancy",
        "method": ac.method,
        "scale": ac.scale,
        "distances": {
            "cosine": "1 - <dW_e, dW_f>_F / (|dW_e|_F |dW_f|_F)",
            "frobenius": "|dW_e - dW_f|_F / sqrt(|dW_e|_F^2 + |dW_f|_F^2)",
        },
        "mean_cosine_distance": mean_defined([r["mean_cosine_distance"] for r in layers]),
        "mean_frobenius_distance": mean_defined([r["mean_frobenius_distance"] for r in layers]),
        "layers": layers,
        "linears": linears,
    })
