"""Train-step throughput on SmolLM2-135M: MoLA (8 experts, top-2, r=8, all seven linears), 4x256 tokens.

JAX: the project's pure train step (forward, backward w.r.t. the adapter collection, AdamW),
compiled ahead of time with donated state (`CompiledSteps`). PyTorch: transformers'
LlamaForCausalLM with a MoLA-style expert module (one-hot mask + `index_add_`, as
GCYZSL/MoLA; from bench_adapters.py) and torch.optim.AdamW. Same weights, same batch.

Timing alternates one step of each per round in one process (medians, ratio printed).
Peak memory is the high-water resident set size (VmHWM) of a separate child process per
framework that loads the model and runs 3 steps (JAX on CPU has no device memory statistics;
the JAX figure includes XLA's compilation). Not ru_maxrss: Linux carries the forking
parent's peak into the child's ru_maxrss across exec.
Target: JAX tokens/s >= 2x PyTorch.

    python experiments/bench_train.py [--rounds 5] [--out experiments/results/bench_train.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from bench_adapters import CONFIGS, random_adapter, torch_mola_model  # noqa: E402
from benchlib import alternating_times, benchmark_parser, cpu_name, emit, medians  # noqa: E402

from moe_lora_jax import LlamaForCausalLM, load_hf_llama  # noqa: E402
from moe_lora_jax.convert import resolve_hf_dir  # noqa: E402
from moe_lora_jax.embedded import default_model_path  # noqa: E402
from moe_lora_jax.parallel import make_mesh  # noqa: E402
from moe_lora_jax.parallel.rules import param_shardings  # noqa: E402
from moe_lora_jax.train.state import TrainState, state_shardings  # noqa: E402
from moe_lora_jax.train.step import CompiledSteps, make_train_step  # noqa: E402

LR = 1e-4


def setup(batch: int, length: int):
    path = default_model_path()
    config, params = load_hf_llama(path)
    ids_BxL = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, length)).astype(np.int32)
    return path, config, params, ids_BxL, random_adapter(config, CONFIGS["mola"], seed=1)


def jax_stepper(config, params, adapter, ids_BxL):
    """One call = one train step (state donated and replaced)."""
    ac = CONFIGS["mola"]
    model = LlamaForCausalLM(config, ac)
    optimizer = optax.adamw(LR)
    mesh = make_mesh((1, 1, 1))
    state = TrainState.create(adapter, optimizer)
    state_sh = state_shardings(state, mesh)
    base_sh = param_shardings(LlamaForCausalLM(config), mesh)["params"]
    step_fn = make_train_step(model, ac, optimizer, deterministic=True, log_routing=False)
    steps = CompiledSteps(step_fn, mesh, state, state_sh, params, base_sh)
    batch = {"input_ids": jnp.asarray(ids_BxL), "attention_mask": jnp.ones(ids_BxL.shape, jnp.int32)}
    holder = {"state": jax.device_put(state, state_sh)}

    def step() -> float:
        holder["state"], metrics = steps(holder["state"], params, batch)
        return float(jax.block_until_ready(metrics["ce"]))

    return step


def torch_stepper(path, adapter, ids_BxL):
    model, trainable = torch_mola_model(resolve_hf_dir(path), adapter, CONFIGS["mola"])
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=1e-4)
    ids = torch.tensor(ids_BxL, dtype=torch.long)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits_BxLxV = model(input_ids=ids).logits
        loss = F.cross_entropy(logits_BxLxV[:, :-1].reshape(-1, logits_BxLxV.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def vm_hwm_mib() -> float:
    """This process's peak resident set size (Linux /proc/self/status VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def peak_rss_mib(framework: str, batch: int, length: int) -> float:
    """Peak resident memory (VmHWM) of a child process that runs 3 steps of one framework."""
    out = subprocess.run([sys.executable, __file__, "--only", framework, "--batch", str(batch), "--length", str(length)],
                         capture_output=True, text=True, check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK_RSS_MIB")))


def main() -> None:
    parser = benchmark_parser(__doc__, rounds=5)
    parser.add_argument("--only", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    path, config, params, ids_BxL, adapter = setup(args.batch, args.length)

    if args.only:  # child process for the memory figure
        step = jax_stepper(config, params, adapter, ids_BxL) if args.only == "jax" else torch_stepper(path, adapter, ids_BxL)
        for _ in range(3):
            step()
        print(f"PEAK_RSS_MIB {vm_hwm_mib():.0f}")
        return

    t0 = time.perf_counter()
    fns = {"jax": jax_stepper(config, params, adapter, ids_BxL)}
    first = {"jax": fns["jax"]()}
    compile_s = time.perf_counter() - t0
    fns["torch"] = torch_stepper(path, adapter, ids_BxL)
    first["torch"] = fns["torch"]()
    med = medians(alternating_times(fns, args.rounds)[0])
    mem = {k: peak_rss_mib(k, args.batch, args.length) for k in fns}
    tokens = args.batch * args.length
    speedup = med["torch"] / med["jax"]
    lines = [
        f"# Train step (MoLA 8 experts, top-2, r=8, all seven linears; AdamW), SmolLM2-135M-Instruct, {args.batch}x{args.length} tokens, float32",
        "",
        f"- date: {datetime.date.today()}; CPU: {cpu_name()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})",
        f"- jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- {args.rounds} alternating rounds after one warm-up step each; JAX compile + first step {compile_s:.0f} s",
        f"- first-step loss (same weights, same batch): JAX {first['jax']:.5f}, PyTorch {first['torch']:.5f}",
        "- peak memory: VmHWM of a separate process loading the model and running 3 steps (JAX: including compilation)",
        "",
        "| implementation | median s/step | tokens/s | peak RSS MiB |",
        "|---|---|---|---|",
        f"| JAX train step (jit, donated state) | {med['jax']:.3f} | {tokens / med['jax']:,.0f} | {mem['jax']:,.0f} |",
        f"| PyTorch, MoLA-style expert loop | {med['torch']:.3f} | {tokens / med['torch']:,.0f} | {mem['torch']:,.0f} |",
        "",
        f"**JAX throughput / PyTorch = {speedup:.2f}x** (target >= 2x: {'met' if speedup >= 2 else 'MISSED'})",
    ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
