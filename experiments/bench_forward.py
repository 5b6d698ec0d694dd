"""Forward pass of SmolLM2-135M on 4x256 tokens: JAX (jit) against transformers (PyTorch), same CPU.

Runs alternate between the two in one process; the medians and their ratio are
printed (and written with --out). Target: JAX / PyTorch <= 1.0.

    python experiments/bench_forward.py [--rounds 10] [--out experiments/results/bench_forward.md]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.convert import resolve_hf_dir
from moe_lora_jax.embedded import default_model_path
from benchlib import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the results table (markdown) here")
    args = parser.parse_args()

    path = default_model_path()
    config, params = load_hf_llama(path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(resolve_hf_dir(path), dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.length)).astype(np.int32)

    forward = jax.jit(LlamaForCausalLM(config).apply)
    ids_jax = jnp.asarray(ids)
    ids_torch = torch.tensor(ids, dtype=torch.long)

    def run_jax() -> np.ndarray:
        return forward({"params": params}, ids_jax).block_until_ready()

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return torch_model(ids_torch).logits

    t0 = time.perf_counter()
    logits_jax = np.asarray(run_jax())
    compile_s = time.perf_counter() - t0
    max_diff = float(np.abs(logits_jax - run_torch().numpy()).max())

    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        for name, fn in (("jax", run_jax), ("torch", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.length
    lines = [
        f"# Forward pass, SmolLM2-135M-Instruct, {args.batch}x{args.length} tokens, float32",
        "",
        f"- date: {datetime.date.today()}; CPU: {cpu_name()} ({len(jax.devices())} JAX device, torch threads {torch.get_num_threads()})",
        f"- jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- {args.rounds} alternating rounds after one warm-up; JAX compile + first run {compile_s:.1f} s",
        f"- max |logit difference| JAX vs PyTorch: {max_diff:.2e}",
        "",
        "| implementation | median s | tokens/s |",
        "|---|---|---|",
        f"| JAX (jit) | {med['jax']:.3f} | {tokens / med['jax']:,.0f} |",
        f"| transformers (PyTorch) | {med['torch']:.3f} | {tokens / med['torch']:,.0f} |",
        "",
        f"**ratio JAX / PyTorch = {med['jax'] / med['torch']:.3f}** (target <= 1.0)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
