"""Decode speed of a trained arm: tokens/s of greedy (beam 1) and beam search, batch 1, exactly N new tokens.

    decode_tokens_per_s(model, variables, tokenizer, prompt, beams=(1, 3), new_tokens=32, rounds=3)
    # {"beam1": {"tokens_per_s": ..., "median_s": ...}, "beam3": {...}}

No end-of-sequence stop (every call makes `new_tokens` tokens), one warm-up call (compile)
per beam width, then the median over `rounds` timed calls; prefill is included, as in
experiments/bench_decode.py. The adapter is applied unmerged, so routing costs count.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from moe_lora_jax.infer.generate import beam_search, generate


def decode_tokens_per_s(model: Any, variables: Mapping[str, Any], tokenizer: Any, prompt: str, *,
                        beams: Sequence[int] = (1, 3), new_tokens: int = 32, rounds: int = 3) -> dict[str, dict[str, float]]:
    ids = tokenizer(prompt)["input_ids"]
    ids_1xL = jnp.asarray([ids], jnp.int32)
    mask_1xL = jnp.ones_like(ids_1xL)
    out: dict[str, dict[str, float]] = {}
    for k in beams:
        if k == 1:
            call = lambda: generate(model, variables, ids_1xL, mask_1xL, max_new_tokens=new_tokens)  # noqa: E731
        else:
            call = lambda: beam_search(model, variables, ids_1xL, mask_1xL, num_beams=k, max_new_tokens=new_tokens)[0]  # noqa: E731
        np.asarray(call())  # compile
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            np.asarray(call())
            times.append(time.perf_counter() - t0)
        median = float(np.median(times))
        out[f"beam{k}"] = {"tokens_per_s": new_tokens / median, "median_s": median}
    return out
