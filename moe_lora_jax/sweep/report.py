"""The study's report: results.md (one row per arm) and three plots.

    loss_curves.png           train task loss (and validation loss) against step, every seed, one colour per arm
    metrics_bars.png          validation loss and exact match per arm: mean with the seeds' std as error bars
    exact_match_per_task.png  exact match per task, one bar group per task, one bar per arm (mean over seeds)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from moe_lora_jax.atomic import atomic_file, atomic_write_text


def _cell(stats: Mapping[str, Any] | None, digits: int = 4) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown: arm, trainable params, seeds, validation loss, exact match, per-task exact match, tokens/s, wall time."""
    arms = results["arms"]
    tasks = sorted({k.split("/", 1)[1] for a in arms for k in a["metrics"] if k.startswith("exact_match/")})
    head = ["arm", "trainable params", "seeds", "eval/loss", "exact match", *tasks, "train tok/s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        m = a["metrics"]
        params = "n/a" if a.get("trainable_params") is None else f"{a['trainable_params']:,}"
        seeds = f"{len(a['seeds'])}" + (f" ({len(a['failed'])} failed)" if a.get("failed") else "")
        row = [a["name"], params, seeds, _cell(m.get("eval/loss")), _cell(m.get("exact_match"), 3),
               *(_cell(m.get(f"exact_match/{t}"), 3) for t in tasks), _cell(m.get("train/tokens_per_s"), 0), _cell(m.get("wall_s"), 0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def decode_table(results: Mapping[str, Any]) -> str:
    rows = [(a["name"], a["decode"]) for a in results["arms"] if a.get("decode")]
    if not rows:
        return ""
    beams = sorted({b for _, d in rows for b in d}, key=lambda b: int(b[4:]))
    lines = ["| arm | " + " | ".join(f"{b} tokens/s" for b in beams) + " |", "|---|" + "---|" * len(beams)]
    for name, d in rows:
        lines.append(f"| {name} | " + " | ".join(f"{d[b]['tokens_per_s']:.1f}" if b in d else "n/a" for b in beams) + " |")
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any], study: Any) -> str:
    src = "" if study.path is None else f" `{study.path}`"
    parts = [f"# Study{src}", "", f"seeds {list(study.seeds)}; mean ± std over seeds (ddof 1); study hash {results['study_hash'][:12]}", "",
             results_table(results), ""]
    if results.get("budget_warning"):
        parts += [results["budget_warning"], ""]
    dec = decode_table(results)
    if dec:
        parts += ["Decode speed (batch 1, unmerged adapter, first seed):", "", dec, ""]
    failed = [(a["name"], f) for a in results["arms"] for f in a.get("failed", [])]
    if failed:
        parts += ["Failed runs (rerun the same command to retry):", ""] + [f"- {n} seed {f['seed']}: {f['error']}" for n, f in failed] + [""]
    parts += ["Plots: loss_curves.png, metrics_bars.png, exact_match_per_task.png", ""]
    return "\n".join(parts)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path, overwrite=True, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def plot_loss_curves(out: Path, arm_names: Sequence[str], runs: Sequence[Mapping[str, Any]]) -> Path:
    from moe_lora_jax.sweep.runner import _metrics_rows

    fig = _figure(11, 4)
    ax_train, ax_eval = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {name: f"C{i % 10}" for i, name in enumerate(arm_names)}
    labelled: set[str] = set()
    plotted = False
    for r in runs:
        rows = _metrics_rows(out / r["arm"] / f"seed{r['seed']}")
        key = "ce" if any("ce" in x for x in rows) else "loss"
        label = None if r["arm"] in labelled else r["arm"]
        labelled.add(r["arm"])
        for ax, k in ((ax_train, key), (ax_eval, "eval/loss")):
            pts = [(x["step"], x[k]) for x in rows if x.get(k) is not None]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, color=colours[r["arm"]], alpha=0.8, lw=1, label=label if ax is ax_train else None,
                        marker="." if len(pts) < 20 else None)
                plotted = plotted or ax is ax_train
    ax_train.set_title("train task loss (every seed)")
    ax_eval.set_title("validation loss")
    for ax in (ax_train, ax_eval):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if plotted:
        ax_train.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "loss_curves.png")
    return out / "loss_curves.png"


def plot_metric_bars(out: Path, results: Mapping[str, Any]) -> Path:
    arms = results["arms"]
    fig = _figure(max(6, 1.2 * len(arms) + 3), 4)
    for j, (key, title) in enumerate((("eval/loss", "validation loss"), ("exact_match", "exact match"))):
        ax = fig.add_subplot(1, 2, j + 1)
        means = [a["metrics"].get(key, {}).get("mean") for a in arms]
        stds = [a["metrics"].get(key, {}).get("std") or 0.0 for a in arms]
        xs = range(len(arms))
        ax.bar(xs, [m if m is not None else 0.0 for m in means], yerr=stds, capsize=4, color=[f"C{i % 10}" for i in xs])
        for i, a in enumerate(arms):  # every seed's value on its bar
            vals = a["metrics"].get(key, {}).get("values", [])
            ax.plot([i] * len(vals), vals, "k.", ms=4)
        ax.set_xticks(list(xs), [a["name"] for a in arms], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mean ± std over seeds (dots: each seed)", fontsize=10)
    fig.tight_layout()
    _save(fig, out / "metrics_bars.png")
    return out / "metrics_bars.png"


def plot_per_task(out: Path, results: Mapping[str, Any]) -> Path:
    arms = results["arms"]
    tasks = sorted({k.split("/", 1)[1] for a in arms for k in a["metrics"] if k.startswith("exact_match/")})
    fig = _figure(max(7, 1.0 * len(tasks) * max(1, len(arms)) * 0.35 + 3), 4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(arms))
    for i, a in enumerate(arms):
        stats = [a["metrics"].get(f"exact_match/{t}", {}) for t in tasks]
        ax.bar([t + i * width for t in range(len(tasks))], [s.get("mean") or 0.0 for s in stats], width,
               yerr=[s.get("std") or 0.0 for s in stats], capsize=2, label=a["name"], color=f"C{i % 10}")
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("exact match")
    ax.set_title("exact match per task (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    if arms:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "exact_match_per_task.png")
    return out / "exact_match_per_task.png"


def write_report(out: Path, results: Mapping[str, Any], study: Any, runs: Sequence[Mapping[str, Any]]) -> None:
    """results.md and the three plots (replaced on every call: they are the study's own outputs)."""
    atomic_write_text(out / "results.md", results_markdown(results, study), overwrite=True)
    plot_loss_curves(out, [a.name for a in study.arms], runs)
    plot_metric_bars(out, results)
    plot_per_task(out, results)
