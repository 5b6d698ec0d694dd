"""Adapter training step on SmolLM2-135M: forward + backward w.r.t. the adapter weights only, 4x256 tokens.

Five implementations run alternately in one process (rounds of each after a warm-up); the
medians give three ratios:

  mola (8 experts, top-2, r=8, all seven linears) / lora (r=8), both JAX      target <= 1.15
  mola in JAX / a PyTorch MoLA-style expert loop (one-hot mask + index_add_)   target <= 0.5
  mixlora in JAX / the `mixlora` package's PyTorch forward + backward          target <= 0.7

The PyTorch models are transformers' LlamaForCausalLM loaded from the same weights, with the
same adapter weights (the mixlora one through our own mixlora export); both frameworks use
the causal-LM cross-entropy and no dropout, so their losses agree (printed as a check).

    python experiments/bench_adapters.py [--rounds 5] [--out experiments/results/bench_adapters.md]
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.adapters import AdapterConfig, save_adapter
from moe_lora_jax.adapters.io import BLOCK, PROJ, adapter_shapes
from moe_lora_jax.convert import resolve_hf_dir
from moe_lora_jax.embedded import default_model_path
from moe_lora_jax.losses import cross_entropy
from benchlib import alternating_times, benchmark_parser, cpu_name, emit, medians

RANK, ALPHA, EXPERTS, TOP_K = 8, 16.0, 8, 2
CONFIGS = {
    "lora": AdapterConfig(method="lora", rank=RANK, alpha=ALPHA),
    "mola": AdapterConfig(method="mola", rank=RANK, alpha=ALPHA, num_experts=EXPERTS, top_k=TOP_K),
    # the mixlora package refuses lora_dropout=0; dropout is off at run time in both frameworks
    "mixlora": AdapterConfig(method="mixlora", rank=RANK, alpha=ALPHA, dropout=0.05, num_experts=EXPERTS, top_k=TOP_K),
}


def random_adapter(config: Any, ac: AdapterConfig, seed: int) -> dict:
    """Adapter weights with B != 0 and random routers (so routing is not degenerate), built with numpy."""
    rng = np.random.default_rng(seed)

    def leaf(path, struct) -> jnp.ndarray:
        name, shape = str(path[-1].key), struct.shape
        std = 0.02 if name == "router" else 1.0 / np.sqrt(shape[-2]) if name == "lora_A" else 0.01
        return jnp.asarray(rng.normal(0.0, std, shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, adapter_shapes(config, ac))


# ------------------------------------------------------------------ JAX
def jax_step(config: Any, ac: AdapterConfig) -> Callable:
    """jit(value_and_grad) of the task loss w.r.t. the adapter; the base params are a plain (non-differentiated) argument."""
    model = LlamaForCausalLM(config, ac)

    def loss_fn(adapter, params, ids_BxL):
        logits_BxLxV = model.apply({"params": params, "adapter": adapter}, ids_BxL)
        return cross_entropy(logits_BxLxV, ids_BxL)[0]

    return jax.jit(jax.value_and_grad(loss_fn))


# ------------------------------------------------------------------ PyTorch: MoLA-style expert loop
class MoLALinear(torch.nn.Module):
    """MoLA's Linear_MoE (GCYZSL/MoLA) at eval: frozen base linear + E LoRA experts chosen per token by a
    top-k softmax router, computed expert by expert (one-hot mask, gather, `index_add_`)."""

    def __init__(self, base: torch.nn.Linear, a_ExDxr: np.ndarray, b_ExrxO: np.ndarray, router_DxE: np.ndarray,
                 top_k: int, scale: float):
        super().__init__()
        E, D, r = a_ExDxr.shape
        self.base, self.top_k, self.scale = base, top_k, scale
        self.lora_A = torch.nn.ModuleList(torch.nn.Linear(D, r, bias=False) for _ in range(E))
        self.lora_B = torch.nn.ModuleList(torch.nn.Linear(r, b_ExrxO.shape[2], bias=False) for _ in range(E))
        self.router = torch.nn.Linear(D, E, bias=False)
        with torch.no_grad():  # torch Linear weights are [out, in]: transpose ours
            for e in range(E):
                self.lora_A[e].weight.copy_(torch.from_numpy(a_ExDxr[e].T.copy()))
                self.lora_B[e].weight.copy_(torch.from_numpy(b_ExrxO[e].T.copy()))
            self.router.weight.copy_(torch.from_numpy(router_DxE.T.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        flat_TxD = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat_TxD), dim=-1, dtype=torch.float32)
        weights_TxK, selected_TxK = torch.topk(probs, self.top_k, dim=-1)
        weights_TxK = (weights_TxK / weights_TxK.sum(dim=-1, keepdim=True)).to(x.dtype)
        mask_ExKxT = F.one_hot(selected_TxK, num_classes=len(self.lora_A)).permute(2, 1, 0)
        out_TxO = torch.zeros(flat_TxD.shape[0], result.shape[-1], dtype=x.dtype)
        for e in range(len(self.lora_A)):
            slot, token = torch.where(mask_ExKxT[e])
            if token.numel() == 0:
                continue
            delta = self.lora_B[e](self.lora_A[e](flat_TxD[token])) * self.scale
            out_TxO.index_add_(0, token, delta * weights_TxK[token, slot, None])
        return result + out_TxO.reshape(result.shape)


def torch_mola_model(hf_dir, adapter: dict, ac: AdapterConfig) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.requires_grad_(False)
    for i, layer in enumerate(model.model.layers):
        for t in ac.targets:
            block = getattr(layer, BLOCK[t])
            leaf = {k: np.asarray(v) for k, v in adapter[f"layers_{i}"][BLOCK[t]][PROJ[t]].items()}
            setattr(block, PROJ[t], MoLALinear(getattr(block, PROJ[t]), leaf["lora_A"], leaf["lora_B"], leaf["router"],
                                               ac.top_k, ac.scale))
    model.eval()
    trainable = [p for n, p in model.named_parameters() if ".lora_" in n or ".router." in n]
    for p in trainable:
        p.requires_grad_(True)
    return model, trainable


# ------------------------------------------------------------------ PyTorch: the mixlora package
def torch_mixlora_model(hf_dir, adapter: dict, ac: AdapterConfig, config: Any) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """transformers LLaMA + our mixlora export injected by the package; dropout off, LoRA and routers trainable."""
    from mixlora import inject_adapter_in_model
    from mixlora.model import load_adapter_weights

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_adapter(os.path.join(tmp, "mixlora"), adapter, ac, config, format="mixlora",
                           base_model_name_or_path=str(hf_dir))
        mcfg, weights = load_adapter_weights(str(out), device="cpu")
    inject_adapter_in_model(model, mcfg, weights)
    model.eval()  # after injection: the attention LoraLinears are new modules, created in training mode
    trainable = [p for n, p in model.named_parameters() if ".lora_" in n]  # attention LoRA (registered modules)
    for layer in model.model.layers:  # experts and router live outside the module tree (a plain dict, a tensor)
        for moe in layer.mlp.mixlora_moes.values():
            moe.gate_.requires_grad_(True)
            trainable.append(moe.gate_)
            for expert in moe.experts_.values():
                expert.eval()
                trainable += [expert.lora_A.weight, expert.lora_B.weight]
    for p in trainable:
        p.requires_grad_(True)
    return model, trainable


def torch_step(model: torch.nn.Module, trainable: list[torch.Tensor], ids_BxL: torch.Tensor) -> Callable:
    def step() -> tuple[float, list[torch.Tensor]]:
        logits_BxLxV = model(input_ids=ids_BxL).logits
        loss = F.cross_entropy(logits_BxLxV[:, :-1].reshape(-1, logits_BxLxV.shape[-1]), ids_BxL[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)  # an expert may receive no token
        return loss.detach().item(), grads

    return step


def main() -> None:
    args = benchmark_parser(__doc__, rounds=5).parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    path = default_model_path()
    hf_dir = resolve_hf_dir(path)
    config, params = load_hf_llama(path)
    ids_BxL = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.length)).astype(np.int32)
    ids_jax, ids_torch = jnp.asarray(ids_BxL), torch.tensor(ids_BxL, dtype=torch.long)
    adapters = {name: random_adapter(config, ac, seed) for seed, (name, ac) in enumerate(CONFIGS.items())}

    fns: dict[str, Callable] = {}
    losses: dict[str, float] = {}
    compile_s: dict[str, float] = {}
    for name, ac in CONFIGS.items():
        step = jax_step(config, ac)
        fns[f"jax_{name}"] = lambda step=step, name=name: jax.block_until_ready(step(adapters[name], params, ids_jax))
        t0 = time.perf_counter()
        losses[f"jax_{name}"] = float(fns[f"jax_{name}"]()[0])  # compile + warm-up
        compile_s[name] = time.perf_counter() - t0
    mola_model, mola_trainable = torch_mola_model(hf_dir, adapters["mola"], CONFIGS["mola"])
    fns["torch_mola"] = torch_step(mola_model, mola_trainable, ids_torch)
    mix_model, mix_trainable = torch_mixlora_model(hf_dir, adapters["mixlora"], CONFIGS["mixlora"], config)
    fns["torch_mixlora"] = torch_step(mix_model, mix_trainable, ids_torch)
    for name in ("torch_mola", "torch_mixlora"):
        losses[name] = fns[name]()[0]  # warm-up
    n_grads = {"torch_mola": len(mola_trainable), "torch_mixlora": len(mix_trainable)}

    med = medians(alternating_times(fns, args.rounds)[0])
    emit(report(args, med, losses, compile_s, n_grads), args.out)


def report(args, med: dict[str, float], losses: dict[str, float], compile_s: dict[str, float],
           n_grads: dict[str, int]) -> str:
    tokens = args.batch * args.length
    rows = [
        ("jax_lora", "lora r=8, JAX (jit)"),
        ("jax_mola", "mola 8 experts top-2 r=8, JAX (jit)"),
        ("torch_mola", "mola, PyTorch MoLA-style expert loop"),
        ("jax_mixlora", "mixlora 8 experts top-2 r=8, JAX (jit)"),
        ("torch_mixlora", "mixlora, `mixlora` package (PyTorch)"),
    ]
    ratios = [
        ("mola / lora (JAX)", med["jax_mola"] / med["jax_lora"], 1.15),
        ("mola JAX / MoLA-style PyTorch", med["jax_mola"] / med["torch_mola"], 0.5),
        ("mixlora JAX / mixlora package", med["jax_mixlora"] / med["torch_mixlora"], 0.7),
    ]
    lines = [
        f"# Adapter training step (forward + backward w.r.t. adapters), SmolLM2-135M-Instruct, {args.batch}x{args.length} tokens, float32",
        "",
        f"- date: {datetime.date.today()}; CPU: {cpu_name()}, {os.cpu_count()} cores "
        f"({len(jax.devices())} JAX device, torch threads {torch.get_num_threads()})",
        f"- jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- {args.rounds} alternating rounds after one warm-up each; JAX compile + first step: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items()),
        "- all seven linears adapted; base weights frozen (no base gradients in either framework); no dropout",
        f"- loss check (same weights): mola JAX {losses['jax_mola']:.5f} vs PyTorch {losses['torch_mola']:.5f}; "
        f"mixlora JAX {losses['jax_mixlora']:.5f} vs package {losses['torch_mixlora']:.5f}",
        f"- PyTorch gradient tensors per step: MoLA-style {n_grads['torch_mola']}, mixlora {n_grads['torch_mixlora']}",
        "",
        "| implementation | median s | tokens/s |",
        "|---|---|---|",
        *(f"| {label} | {med[key]:.3f} | {tokens / med[key]:,.0f} |" for key, label in rows),
        "",
        "| ratio | measured | target | |",
        "|---|---|---|---|",
        *(f"| {label} | {r:.3f} | <= {t} | {'met' if r <= t else 'MISSED'} |" for label, r, t in ratios),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
