"""`moe-lora analyze` (HT-SR spectra of the frozen weights) and `moe-lora allocate` (per-layer expert counts)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from moe_lora_jax.allocation import HillOptions, analyze_params, layer_metric, module_metric, mola_shape
from moe_lora_jax.allocation.allocate import (
    ALPHALORA_DEFAULT_BETA, ALPHALORA_DEFAULT_ROUNDING, ALPHALORA_DEFAULT_TOP_K, METHODS, ROUNDINGS,
)
from moe_lora_jax.allocation.allocation import LEGACY_SHAPE_NAMES, legacy_shape_error
from moe_lora_jax.allocation.recipes import allocate_recipe
from moe_lora_jax.allocation.spectral import ESTIMATORS
from moe_lora_jax.atomic import atomic_file, check_new_file, write_json_atomic
from moe_lora_jax.cli.common import add_model_arg
from moe_lora_jax.convert import load_llama_config, load_model
from moe_lora_jax.embedded import DEFAULT_MODEL_NAME, default_model_path, resolve_model_path
from moe_lora_jax.errors import MoeLoraError

EMBEDDED_NOTE = (
    "the embedded SmolLM2 weights are 4-bit quantized (Q4_1 GGUF) and dequantized on load: "
    "spectra describe the quantized matrices, not the original bf16 ones"
)
GGUF_NOTE = "GGUF weights may be quantized; they are dequantized on load and spectra describe the quantized matrices"


# ----------------------------------------------------------------------------- parsers
def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="heavy-tailed spectral analysis (PL_Alpha_Hill) of every target weight matrix")
    add_model_arg(p)
    p.add_argument("--estimator", choices=ESTIMATORS, default="fix-finger",
                   help="how xmin is chosen: median (TempBalance), fix-finger (AlphaLoRA, default), ks (WeightWatcher)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="precision of the SVD and the fits")
    p.add_argument("--json", required=True, help="output JSON file (must not exist)")
    p.add_argument("--plot", default=None, help="output PNG: alpha per layer for each module type (must not exist)")
    p.set_defaults(func=run_analyze)


def add_allocate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("allocate", help="per-layer expert counts: AlphaLoRA (from the spectra), uniform or a MoLA shape")
    add_model_arg(p)
    # checked in run_allocate, not by argparse, so that an old shape name gets a one-line error naming its digits
    p.add_argument("--method", metavar="{" + ",".join(METHODS) + "}", required=True,
                   help="alphalora, uniform, or a MoLA shape by its digits, lowest layers first "
                        "(mola-8642: MoLA's triangle, mola-2468: its inverted triangle)")
    p.add_argument("--total", type=int, required=True, help="experts summed over all layers (per target module)")
    p.add_argument("--beta", type=float, default=ALPHALORA_DEFAULT_BETA, help="AlphaLoRA's exponent: n_i ~ alpha_i ** beta")
    p.add_argument("--estimator", choices=ESTIMATORS, default="fix-finger", help="alphalora only: the Hill estimator")
    p.add_argument("--rounding", choices=ROUNDINGS, default=ALPHALORA_DEFAULT_ROUNDING,
                   help="alphalora only: alphalora (default: the authors' exponential_scaling) or largest-remainder (monotone)")
    p.add_argument("--top-k", type=int, default=ALPHALORA_DEFAULT_TOP_K,
                   help="alphalora only: each layer routes top-min(k, its experts), saved as top_k_per_layer "
                        "(AlphaLoRA: 2, so a layer with one expert routes top-1)")
    p.add_argument("--min-experts", type=int, default=1, help="fewest experts any layer gets (at least 1)")
    p.add_argument("--max-experts", type=int, default=None, help="most experts any layer gets")
    p.add_argument("--json", required=True, help="output JSON file, readable by Allocation.from_json (must not exist)")
    p.add_argument("--plot", default=None, help="output PNG: the counts next to the MoLA shapes at the same budget")
    p.set_defaults(func=run_allocate)


# ----------------------------------------------------------------------------- shared steps
def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the slow work if an output exists or has the wrong suffix."""
    check_new_file(args.json)
    if args.plot is not None:
        if Path(args.plot).suffix.lower() != ".png":
            raise MoeLoraError(f"--plot {args.plot}: give a .png file name")
        check_new_file(args.plot)
        if Path(args.plot).resolve() == Path(args.json).resolve():
            raise MoeLoraError("--plot and --json name the same file: give two different names")


def _model_label(model: str | None) -> tuple[str, str | None]:
    """(name of the model for the outputs, its quantization note or None)."""
    if model is None:
        return f"{DEFAULT_MODEL_NAME}: {default_model_path()}", EMBEDDED_NOTE
    return str(model), GGUF_NOTE if str(model).lower().endswith(".gguf") else None


def _analyze(model: str | None, estimator: str, dtype: str = "float32") -> tuple[Any, list, list[float]]:
    """(config, per-matrix fits, per-layer mean alpha) of the model's target matrices, with progress bars."""
    _, config, params = load_model(model)
    fits = analyze_params(params, HillOptions(estimator), dtype=dtype, progress=True)
    return config, fits, layer_metric(fits, config.num_hidden_layers)


def _fmt(x: float | None, width: int = 7) -> str:
    return f"{x:{width}.3f}" if x is not None and math.isfinite(x) else f"{'-':>{width}}"


def _print_alpha_table(fits: Sequence[Any], layer_alpha: Sequence[float], header: str, note: str | None) -> None:
    per_module = module_metric(fits, len(layer_alpha))
    print(header)
    if note:
        print(f"note: {note}")
    print(f"{'layer':>5} {'mean':>7} " + " ".join(f"{m:>7}" for m in per_module) + "  flags")
    for i, mean in enumerate(layer_alpha):
        flags = "; ".join(f"{f.module}: {f.status}" for f in fits if f.layer == i and not f.ok)
        cells = " ".join(_fmt(per_module[m][i]) for m in per_module)
        print(f"{i:>5} {_fmt(mean)} {cells}  {flags}".rstrip())


def _json_number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# ----------------------------------------------------------------------------- analyze
def analysis_json(model: str, note: str | None, estimator: str, dtype: str, fits: Sequence[Any],
                  layer_alpha: Sequence[float]) -> dict[str, Any]:
    """The JSON document of `moe-lora analyze`."""
    keys = ("layer", "module", "alpha", "xmin", "lambda_max", "num_eigs", "alpha_hat", "ks_distance", "num_tail", "status")
    return {
        "model": model,
        "quantization_note": note,
        "estimator": estimator,
        "options": {**HillOptions(estimator).describe(), "dtype": dtype},
        "matrices": [{k: f.to_json()[k] for k in keys} for f in fits],
        "layers": [{"layer": i, "alpha": _json_number(a)} for i, a in enumerate(layer_alpha)],
        "modules": {m: [_json_number(a) for a in v] for m, v in module_metric(fits, len(layer_alpha)).items()},
    }


def run_analyze(args: argparse.Namespace) -> int:
    _check_outputs(args)
    label, note = _model_label(args.model)
    _, fits, layer_alpha = _analyze(args.model, args.estimator, args.dtype)
    _print_alpha_table(fits, layer_alpha, f"PL_Alpha_Hill ({args.estimator}) of {label}", note)
    write_json_atomic(args.json, analysis_json(label, note, args.estimator, args.dtype, fits, layer_alpha))
    print(f"wrote {args.json}")
    if args.plot:
        plot_alphas(fits, layer_alpha, args.plot, title=f"PL_Alpha_Hill per layer ({args.estimator})", note=note)
        print(f"wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------- allocate
def _check_allocate_args(args: argparse.Namespace) -> None:
    if args.method in LEGACY_SHAPE_NAMES:
        raise legacy_shape_error(args.method, "--method ")
    if args.method not in METHODS:
        raise MoeLoraError(f"--method {args.method!r}: choose from {', '.join(METHODS)}")
    if args.top_k < 1:
        raise MoeLoraError(f"--top-k={args.top_k}: give a positive number of experts per token")
    if not (math.isfinite(args.beta) and args.beta > 0):
        raise MoeLoraError(f"--beta={args.beta}: give a finite number > 0 (AlphaLoRA uses 2.5)")
    if args.total < 1:
        raise MoeLoraError(f"--total={args.total}: give a positive number of experts")


def run_allocate(args: argparse.Namespace) -> int:
    _check_allocate_args(args)
    _check_outputs(args)
    label, note = _model_label(args.model)
    limits = dict(min_experts=args.min_experts, max_experts=args.max_experts)
    provenance = {"model": label, "quantization_note": note}
    config = load_llama_config(resolve_model_path(args.model))  # the shapes need only the number of layers
    num_layers = config.num_hidden_layers
    mola_shape("5555", num_layers, args.total, **limits)  # a budget no layout can meet fails before the analysis
    fits, metric = None, None
    if args.method == "alphalora":  # the table first: it is what the counts are read from
        _, fits, metric = _analyze(args.model, args.estimator)
        _print_alpha_table(fits, metric, f"PL_Alpha_Hill ({args.estimator}) of {label}", note)
    alloc = allocate_recipe(args.method, num_layers, args.total, fits=fits, beta=args.beta, estimator=args.estimator,
                            rounding=args.rounding, top_k=args.top_k, **limits, provenance=provenance)
    _print_counts(alloc, metric)
    alloc.to_json(args.json)
    print(f"wrote {args.json}")
    if args.plot:
        plot_allocation(alloc, args.plot, note=note)
        print(f"wrote {args.plot}")
    return 0


def _print_counts(alloc: Any, metric: Sequence[float] | None) -> None:
    counts = alloc.experts_per_layer
    top_k = alloc.top_k(alloc.modules[0])
    print(f"{alloc.method}: {sum(counts)} experts over {len(counts)} layers (per target module)")
    print(f"{'layer':>5} {'experts':>7}" + (f" {'top_k':>5}" if top_k is not None else "")
          + (f" {'alpha':>7}" if metric is not None else ""))
    for i, n in enumerate(counts):
        print(f"{i:>5} {n:>7}" + (f" {top_k[i]:>5}" if top_k is not None else "")
              + (f" {_fmt(metric[i])}" if metric is not None else ""))
    print("experts_per_layer: " + ",".join(str(n) for n in counts))
    if top_k is not None:
        print("top_k_per_layer: " + ",".join(str(k) for k in top_k))


# ----------------------------------------------------------------------------- plots
def _save_figure(fig: Any, path: str | Path) -> None:
    """Save through a temporary sibling file that is linked into place (never replaces an existing file)."""
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alphas(fits: Sequence[Any], layer_alpha: Sequence[float], path: str | Path, *, title: str,
                note: str | None = None) -> None:
    """Alpha per layer, one line per module type and the layer mean (AlphaLoRA's figure 2)."""
    plt = _pyplot()
    layers = list(range(len(layer_alpha)))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for module, alphas in module_metric(fits, len(layers)).items():
        ax.plot(layers, alphas, marker="o", markersize=3, linewidth=1, label=module)
    ax.plot(layers, layer_alpha, color="black", linewidth=2.5, label="layer mean")
    ax.set_xlabel("layer")
    ax.set_ylabel("PL_Alpha_Hill")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9 if note else 11)
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)


def plot_allocation(alloc: Any, path: str | Path, *, note: str | None = None) -> None:
    """Bars of the allocation with the MoLA shapes at the same budget as step lines (AlphaLoRA's figure 3)."""
    plt = _pyplot()
    counts = alloc.experts_per_layer
    layers = list(range(len(counts)))
    total = sum(counts)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(layers, counts, color="tab:blue", alpha=0.6, label=f"{alloc.method} (T={total})")
    for shape, style in (("5555", ":"), ("8642", "--"), ("2468", "-."), ("8228", "-")):
        try:
            ref = mola_shape(shape, len(counts), total)
        except MoeLoraError:  # a budget some shape cannot meet (e.g. below one per layer): skip that line
            continue
        ax.step(layers, ref, where="mid", linestyle=style, linewidth=1.5, label=f"mola-{shape}")
    ax.set_xlabel("layer")
    ax.set_ylabel("experts")
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts are whole numbers
    ax.set_title(f"experts per layer: {alloc.method} vs MoLA shapes" + (f"\n{note}" if note else ""),
                 fontsize=9 if note else 11)
    ax.legend(ncol=3, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)
