"""PNG figures of the analyses' JSON documents (each a function of the document alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_lora_jax.atomic import atomic_file


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return Path(path)


def _arr(x: Any) -> np.ndarray:
    """A JSON matrix (null = NaN) as a float array."""
    return np.array([[np.nan if v is None else v for v in row] for row in x], np.float64)


def plot_expert_load(doc: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Top: task separation against layer per linear. Below, one heatmap per linear: tasks (rows) against
    every layer's experts (columns, grouped by layer), coloured by the share of the task's routing."""
    plt = pyplot()
    modules = sorted({r["module"] for r in doc["routers"]})
    tasks = doc["tasks"]
    fig, axes = plt.subplots(len(modules) + 1, 1, figsize=(12, 2.6 + 0.3 * len(tasks) * len(modules)), squeeze=False,
                             gridspec_kw={"height_ratios": [1.2] + [max(0.25 * len(tasks), 1.0)] * len(modules)})
    ax = axes[0, 0]
    for m in modules:
        rows = [r for r in doc["routers"] if r["module"] == m]
        ax.plot([r["layer"] for r in rows], [np.nan if r["task_separation"] is None else r["task_separation"] for r in rows],
                marker="o", markersize=3, label=m)
    ax.set_ylabel("task separation")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(ncol=min(len(modules), 7), fontsize=8)
    ax.set_title(title or f"{doc['method']}: per-task expert load ({doc['weighting']}; separation = mean TV distance between tasks)",
                 fontsize=9)
    vmax = max(float(np.nanmax(_arr(r["load"]))) for r in doc["routers"] if np.isfinite(_arr(r["load"])).any())
    for ax, m in zip(axes[1:, 0], modules):
        rows = [r for r in doc["routers"] if r["module"] == m]
        img = np.concatenate([_arr(r["load"]) for r in rows], axis=1)
        im = ax.imshow(img, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        edges = np.cumsum([r["num_experts"] for r in rows])
        for e in edges[:-1]:
            ax.axvline(e - 0.5, color="white", linewidth=0.8)
        centres = edges - np.asarray([r["num_experts"] for r in rows]) / 2 - 0.5
        step = max(1, len(rows) // 16)
        ax.set_xticks(centres[::step], [str(r["layer"]) for r in rows][::step], fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_ylabel(m, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("layer (each block: its experts, left to right)")
    return save_figure(fig, path)


def plot_milora_modules(doc: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """One heatmap per task (and all tasks): layers (rows) against the LoRA modules, coloured by the share
    of the task's prompts that select the module in that layer (MiLoRA's Figure 2)."""
    plt = pyplot()
    panels = [(t, _arr(doc["selection_rate"][t])) for t in doc["tasks"]] + [("all tasks", _arr(doc["all_tasks"]))]
    n_layers = panels[0][1].shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels) + 1, 1.2 + 0.18 * n_layers), squeeze=False,
                             sharey=True)
    for ax, (name, rates) in zip(axes[0], panels):
        im = ax.imshow(rates, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(len(doc["modules"])), doc["modules"], rotation=90, fontsize=7)
        ax.set_title(name, fontsize=8)
    axes[0, 0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0, -1], fraction=0.2, pad=0.05, label="share of prompts selecting")
    fig.suptitle(title or f"MiLoRA: LoRA modules selected per layer (top-{doc['top_k']})", fontsize=10)
    return save_figure(fig, path)


def plot_loramoe_groups(doc: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Gate mass on the world-knowledge group against layer: a thin line per task, a thick one per task type."""
    plt = pyplot()
    layers = [r["layer"] for r in doc["layers"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {1: "tab:blue", 0: "tab:orange", None: "tab:gray"}
    for t in doc["tasks"]:
        kind = doc["task_types"][t]
        ys = [np.nan if r["world_knowledge_mass"][t] is None else r["world_knowledge_mass"][t] for r in doc["layers"]]
        ax.plot(layers, ys, color=colours[kind], linewidth=0.8, alpha=0.6)
        ax.annotate(t, (layers[-1], ys[-1]), fontsize=6, color=colours[kind])
    for group, kind in (("world_knowledge", 1), ("other", 0)):
        ys = [r["by_type"][group] for r in doc["layers"]]
        if any(y is not None for y in ys):
            ax.plot(layers, [np.nan if y is None else y for y in ys], color=colours[kind], linewidth=2.5,
                    label=f"{group.replace('_', '-')} tasks")
    ax.axhline(0.5, color="black", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("gate mass on the world-knowledge group")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(title or "LoRAMoE: group utilisation by task type (thin: one task)", fontsize=10)
    return save_figure(fig, path)


def plot_expert_redundancy(doc: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Mean pairwise distance of the experts' dW against layer, per linear and the layer mean, both distances."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    modules = sorted({r["module"] for r in doc["linears"]})
    none = lambda v: np.nan if v is None else v  # noqa: E731
    for ax, key, label in ((axes[0], "mean_cosine_distance", "cosine distance"),
                           (axes[1], "mean_frobenius_distance", "normalised Frobenius distance")):
        for m in modules:
            rows = [r for r in doc["linears"] if r["module"] == m]
            ax.plot([r["layer"] for r in rows], [none(r[key]) for r in rows], marker="o", markersize=3, linewidth=1, label=m)
        ax.plot([r["layer"] for r in doc["layers"]], [none(r[key]) for r in doc["layers"]], color="black", linewidth=2.5,
                label="layer mean")
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean pairwise {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=4, fontsize=7)
    fig.suptitle(title or f"{doc['method']}: expert redundancy (0: identical experts, 1: orthogonal)", fontsize=10)
    return save_figure(fig, path)


PLOTS = {
    "expert_load": plot_expert_load,
    "milora_modules": plot_milora_modules,
    "loramoe_groups": plot_loramoe_groups,
    "expert_redundancy": plot_expert_redundancy,
}
