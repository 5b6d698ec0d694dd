"""Compile time of the MoLA train step (all seven linears), unrolled layers vs scanned layers.

SmolLM2-135M shapes (hidden 576, 9 heads, 3 KV heads, FFN 1536; tied embeddings) at 8 and 30
layers, MoLA's 2468 allocation (experts per layer 2, 4, 6, 8 by depth quarter; top-2, top-1 never
needed), rank 8, batch 16 x 96 (the quickstart's). Only shapes are used: the step is lowered from
abstract values and compiled (`jit(...).lower(...).compile()`), so no weights are needed.
Each configuration is compiled in its own child process (no cache shared between them), the
four side by side in one run; the ratios are what count on a shared machine.

    python experiments/bench_compile.py [--layers 8 30] [--out experiments/results/bench_compile.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_seconds(layers: int, scan: bool, batch: int, length: int) -> dict[str, float]:
    """{"lower": s, "compile": s, "hlo_lines": lines of the lowered StableHLO} of the step."""
    import jax
    import jax.numpy as jnp
    import optax

    from moe_lora_jax import LlamaConfig, LlamaForCausalLM
    from moe_lora_jax.adapters import AdapterConfig
    from moe_lora_jax.allocation import Allocation
    from moe_lora_jax.train.state import TrainState
    from moe_lora_jax.train.step import make_train_step

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, scan_layers=scan)
    per_layer = [2 + 2 * (4 * i // layers) for i in range(layers)]  # 2468 by depth quarter
    ac = AdapterConfig(method="mola", rank=8, alpha=16, top_k=2, target_modules=("q", "k", "v", "o", "gate", "up", "down"),
                       allocation=Allocation.from_experts_per_layer(per_layer))
    model = LlamaForCausalLM(cfg, ac)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    import flax.linen as nn

    shapes = nn.unbox(shapes)
    optimizer = optax.adamw(1e-4)
    state = jax.eval_shape(lambda a: TrainState.create(a, optimizer), shapes["adapter"])
    batch = {"input_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((batch, length), jnp.int32)}
    step = make_train_step(model, ac, optimizer, deterministic=True, state_like=state)
    if scan:  # as build_run and the train loop keep them: base and train state stacked over layers
        from moe_lora_jax.stacking import stack_layers
        from moe_lora_jax.train.state import stack_state

        shapes = dict(shapes, params=stack_layers(shapes["params"]))
        state = stack_state(state)
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, shapes["params"], batch)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower": t1 - t0, "compile": t2 - t1, "hlo_lines": lowered.as_text().count("\n")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 30])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--out", default=None)
    parser.add_argument("--scanned-only", action="store_true", help="skip the unrolled compiles (minutes each)")
    parser.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)  # layers, scan
    args = parser.parse_args()
    if args.child:
        print("RESULT", json.dumps(compile_seconds(args.child[0], bool(args.child[1]), args.batch, args.length)))
        return
    import jax

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict[tuple[int, bool], float] = {}
    parts: dict[tuple[int, bool], dict[str, float]] = {}
    load_before = os.getloadavg()
    for layers in args.layers:
        for scan in (True,) if args.scanned_only else (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", str(layers), str(int(scan)),
                                  "--batch", str(args.batch), "--length", str(args.length)],
                                 capture_output=True, text=True, check=True, env=env).stdout
            parts[layers, scan] = json.loads(next(ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith("RESULT")))
            results[layers, scan] = parts[layers, scan]["lower"] + parts[layers, scan]["compile"]
            print(f"layers={layers} scan={scan}: {parts[layers, scan]}", flush=True)
    load_after = os.getloadavg()
    lo, hi = min(args.layers), max(args.layers)
    rows = ["| layers | layout | lower (s) | compile (s) | total (s) | StableHLO lines |", "|---:|---|---:|---:|---:|---:|"]
    for layers in args.layers:
        for scan in (False, True):
            if (layers, scan) in parts:
                p = parts[layers, scan]
                rows.append(f"| {layers} | {'scanned' if scan else 'unrolled'} | {p['lower']:.1f} | {p['compile']:.1f} | "
                            f"{results[layers, scan]:.1f} | {int(p['hlo_lines'])} |")
    text = "\n".join([
        "# Compile time: unrolled vs scanned decoder layers",
        "",
        f"`python experiments/bench_compile.py`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}, python {sys.version.split()[0]}.",
        f"Load average (1, 5, 15 min) before: {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}; "
        f"after: {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f} (a shared machine: absolute seconds are "
        "inflated, the ratios measured side by side are what count).",
        "",
        f"MoLA train step (forward, backward w.r.t. the adapter, Switch term, routing metrics, AdamW), all seven linears, 2468 allocation, rank 8, "
        f"batch {args.batch} x {args.length}, SmolLM2-135M shapes.",
        "",
        *rows,
        "",
        f"Growth from {lo} to {hi} layers (total seconds): scanned {results[hi, True] / results[lo, True]:.2f}x"
        + (f", unrolled {results[hi, False] / results[lo, False]:.2f}x." if (lo, False) in results else "."),
        "",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
