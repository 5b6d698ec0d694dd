"""Decode speed on SmolLM2-135M at batch 1: base, LoRA, MoLoRA, MoLA, MiLoRA (route-once), transformers.

Every variant generates exactly `--new-tokens` tokens (no early stop: no EOS for JAX,
min_new_tokens for transformers) from the same prompt, with 1 beam (greedy) and 3
beams. The variants run in alternating rounds in one process after one warm-up
(compile) each; the medians are printed as a table with ratios (and written with
--out). Adapters are random and non-zero: rank 8 on all seven linears, 8 experts
for MoLoRA and MoLA (top-2), MiLoRA top-2 of the 7 modules per layer.

Tokens/s = new tokens / wall time of the whole `generate` call (prefill included;
the prompt is short). Targets: milora >= 1.15x mola; milora within 5% of base;
JAX base >= transformers.

    python experiments/bench_decode.py [--rounds 3] [--out experiments/results/bench_decode.md]
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.layers import RATIONAL_GELU_DEN, RATIONAL_GELU_NUM
from moe_lora_jax.convert import resolve_hf_dir
from moe_lora_jax.embedded import default_model_path
from moe_lora_jax.infer.generate import beam_search, generate
from moe_lora_jax.tokenizer import load_tokenizer
from benchlib import alternating_times, benchmark_parser, cpu_name, emit, medians

PROMPT = "Write a short story about a robot who learns to paint."
ADAPTERS = {
    "lora": AdapterConfig(method="lora", rank=8),
    "molora": AdapterConfig(method="molora", rank=8, num_experts=8),
    "mola": AdapterConfig(method="mola", rank=8, num_experts=8, top_k=2),
    "milora": AdapterConfig(method="milora", rank=8, top_k=2),
}


def random_adapter(config, adapter_config: AdapterConfig, seed: int = 0) -> dict:
    """Non-zero random adapter weights of the right shapes (B != 0, so every adapter changes the output)."""
    model = LlamaForCausalLM(config, adapter_config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["adapter"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = str(path[-1].key)
        if name == "rational_num":
            out.append(jnp.asarray(RATIONAL_GELU_NUM, jnp.float32))
        elif name == "rational_den":
            out.append(jnp.asarray(RATIONAL_GELU_DEN, jnp.float32))
        else:
            out.append(jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def jax_runner(model, variables, ids, mask, beams: int, new_tokens: int, pad_id: int) -> Callable[[], np.ndarray]:
    kwargs = dict(max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=pad_id)
    if beams == 1:
        return lambda: np.asarray(generate(model, variables, ids, mask, **kwargs))
    return lambda: np.asarray(beam_search(model, variables, ids, mask, num_beams=beams, **kwargs)[0])


def torch_runner(torch_model, ids, beams: int, new_tokens: int, pad_id: int) -> Callable[[], np.ndarray]:
    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = torch_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, num_beams=beams, do_sample=False, pad_token_id=pad_id)
        return out[:, ids_t.shape[1]:].numpy()

    return run


def main() -> None:
    parser = benchmark_parser(__doc__, rounds=3, tokens=False)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()

    path = default_model_path()
    config, params = load_hf_llama(path)
    tokenizer = load_tokenizer(path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(resolve_hf_dir(path), dtype=torch.float32).eval()
    ids = jnp.asarray(tokenizer(PROMPT)["input_ids"], jnp.int32)[None]
    mask = jnp.ones_like(ids)
    pad_id = config.pad_token_id or 0
    N = args.new_tokens

    variants: dict[str, tuple] = {"base": (LlamaForCausalLM(config), {"params": params})}
    for name, ac in ADAPTERS.items():
        variants[name] = (LlamaForCausalLM(config, ac), {"params": params, "adapter": random_adapter(config, ac)})

    runners: dict[tuple[int, str], Callable[[], np.ndarray]] = {}
    compile_s: dict[tuple[int, str], float] = {}
    for beams in args.beams:
        for name, (model, variables) in variants.items():
            runners[beams, name] = jax_runner(model, variables, ids, mask, beams, N, pad_id)
        runners[beams, "transformers"] = torch_runner(torch_model, ids, beams, N, pad_id)
    for key, run in runners.items():  # warm-up: compile, and check every variant makes N tokens
        t0 = time.perf_counter()
        out = run()
        compile_s[key] = time.perf_counter() - t0
        assert out.shape[-1] == N, (key, out.shape)
        print(f"warm-up {key[1]:<12} beams={key[0]}: {compile_s[key]:.1f} s", flush=True)
    # transformers' min_new_tokens suppresses EOS, JAX without eos ids may emit it: compare up to the first EOS
    ours, theirs = runners[args.beams[0], "base"]()[0], runners[args.beams[0], "transformers"]()[0]
    stop = next((i for i, t in enumerate(ours) if t in config.eos_token_id), N)
    same_until_eos = f"{bool((ours[:stop] == theirs[:stop]).all())} (first {stop} tokens)"

    med_all = medians(alternating_times(runners, args.rounds, progress=True)[0])

    lines = [
        f"# Decode speed, SmolLM2-135M-Instruct, batch 1, {N} new tokens, float32",
        "",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; CPU: {cpu_name()}, {os.cpu_count()} cores visible "
        f"({len(jax.devices())} JAX device, torch threads {torch.get_num_threads()})",
        f"- jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- prompt of {ids.shape[1]} tokens; {args.rounds} alternating rounds after one warm-up each; medians; "
        "tokens/s = new tokens / time of the whole generate call (prefill included)",
        "- adapters random non-zero, rank 8 on q k v o gate up down; molora, mola: 8 experts (mola top-2); "
        "milora: top-2 of 7 modules, routed once at prefill",
        f"- beams={args.beams[0]} tokens of JAX base == transformers before the first EOS: {same_until_eos}",
        "",
    ]
    for beams in args.beams:
        med = {name: med_all[b, name] for b, name in runners if b == beams}
        tps = {name: N / t for name, t in med.items()}
        lines += [
            f"## beams = {beams}",
            "",
            "| variant | median s | tokens/s | vs base | vs mola |",
            "|---|---|---|---|---|",
        ]
        for name in med:
            lines.append(f"| {name} | {med[name]:.3f} | {tps[name]:.1f} | {tps[name] / tps['base']:.3f} | "
                         f"{tps[name] / tps['mola']:.3f} |")
        lines += [
            "",
            f"- milora / mola = {tps['milora'] / tps['mola']:.3f} (target >= 1.15)",
            f"- milora / base = {tps['milora'] / tps['base']:.3f} (target >= 0.95)",
            f"- JAX base / transformers = {tps['base'] / tps['transformers']:.3f} (target >= 1.0)",
            "",
        ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
