"""Spectral analysis of all 210 SmolLM2-135M target matrices: ours (jnp) against weightwatcher's analyze(), same CPU.

Both compute the ESD of every matrix and fit WeightWatcher's default power law
(KS scan over every xmin, eigenvalues <= 1e-5 dropped). The runs alternate in
one process, one run each per round; medians, their ratio and the largest
relative difference of the 210 alphas are printed (and written with --out).
Target: ours at least 10x faster with the same alphas.

    python experiments/bench_spectral.py [--rounds 3] [--out experiments/results/bench_spectral.md]
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import numpy as np

from moe_lora_jax import load_hf_llama
from moe_lora_jax.allocation import ALL_MODULES, HillOptions, analyze_matrices, target_matrices
from moe_lora_jax.embedded import default_model_path
from benchlib import alternating_times, benchmark_parser, cpu_name, emit, medians


def torch_net(matrices: dict, keys: list):
    """The matrices as bias-free torch Linear layers (weight [out, in]), in `keys` order, for weightwatcher."""
    import torch

    net = torch.nn.Sequential(*[torch.nn.Linear(*matrices[k].shape, bias=False) for k in keys])
    with torch.no_grad():
        for linear, k in zip(net, keys):
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(matrices[k].T)))
    return net


def main() -> None:
    args = benchmark_parser(__doc__, rounds=3, tokens=False).parse_args()

    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    _, params = load_hf_llama(default_model_path())
    matrices = target_matrices(params)
    keys = sorted(matrices, key=lambda k: (k[0], ALL_MODULES.index(k[1])))
    net = torch_net(matrices, keys)
    options = HillOptions.weightwatcher()

    def ours():
        return analyze_matrices(matrices, options)

    def theirs():
        return ww.WeightWatcher(model=net).analyze()

    t0 = time.perf_counter()
    ours()  # first call: includes jit compilation, reported separately
    first_call = time.perf_counter() - t0
    times, results = alternating_times({"ours": ours, "weightwatcher": theirs}, args.rounds)

    fits, details = results["ours"], results["weightwatcher"]
    ww_alpha = details["alpha"].to_numpy()
    our_alpha = np.array([f.alpha for f in fits])
    both = (ww_alpha > 0) & np.isfinite(our_alpha)
    max_rel = float(np.max(np.abs(our_alpha[both] - ww_alpha[both]) / ww_alpha[both]))
    med = medians(times)
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {cpu_name()}, {os.cpu_count()} CPU cores visible, no GPU; jax backend cpu",
        "model: SmolLM2-135M-Instruct embedded (Q4_1 GGUF: 4-bit quantized weights, dequantized on load)",
        f"matrices: {len(keys)} (30 layers x q k v o gate up down); fit: WeightWatcher default (KS scan, eigs > 1e-5)",
        f"rounds: {args.rounds}, alternating, one run each; our first call incl. jit compile: {first_call:.2f} s",
        "",
        "| implementation | median (s) | runs (s) |",
        "|---|---|---|",
        *(f"| {k} | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |" for k, v in times.items()),
        "",
        f"speed-up (weightwatcher / ours): {med['weightwatcher'] / med['ours']:.1f}x",
        f"alphas compared: {int(both.sum())} of {len(keys)}; max relative difference: {max_rel:.2e}",
    ]
    emit("# bench_spectral\n\n```\n" + "\n".join(lines) + "\n```", args.out)


if __name__ == "__main__":
    main()
