"""Forward pass of SmolLM2-135M on 4x256 tokens: JAX (jit) against transformers (PyTorch), same CPU.

Runs alternate between the two in one process; the medians and their ratio are
printed (and written with --out). Target: JAX / PyTorch <= 1.0.

    python experiments/bench_forward.py [--rounds 10] [--out experiments/results/bench_forward.md]
"""

from __future__ import annotations

import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.convert import resolve_hf_dir
from moe_lora_jax.embedded import default_model_path
from benchlib import alternating_times, benchmark_parser, cpu_name, emit, medians


def main() -> None:
    args = benchmark_parser(__doc__, rounds=10).parse_args()

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

    med = medians(alternating_times({"jax": run_jax, "torch": run_torch}, args.rounds)[0])
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
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
