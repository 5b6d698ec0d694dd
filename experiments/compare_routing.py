"""Compare `expert_load.json` documents of several adapters (`moe-lora routing` outputs): task separation
against layer in one PNG, and a markdown table of the mean separations.

    python experiments/compare_routing.py --out cmp.png init=runs/a/routing/expert_load.json trained=runs/b/routing/expert_load.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moe_lora_jax.analysis.plots import pyplot, save_figure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=EXPERT_LOAD_JSON")
    p.add_argument("--out", required=True, help="PNG to write (must not exist)")
    args = p.parse_args()
    docs = {}
    for item in args.runs:
        label, path = item.split("=", 1)
        docs[label] = json.loads(Path(path).read_text())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    print("| adapter | tasks | tokens | mean task separation | min / max over layers |")
    print("|---|---|---|---|---|")
    for label, doc in docs.items():
        layers = [r["layer"] for r in doc["layers"]]
        sep = np.array([np.nan if r["task_separation"] is None else r["task_separation"] for r in doc["layers"]])
        ax.plot(layers, sep, marker="o", markersize=3, label=f"{label} (mean {np.nanmean(sep):.3f})")
        print(f"| {label} | {len(doc['tasks'])} | {doc['tokens']} | {doc['task_separation']:.3f} | "
              f"{np.nanmin(sep):.3f} / {np.nanmax(sep):.3f} |")
    for label, doc in docs.items():  # which pairs of tasks are routed apart, averaged over every router
        tasks = doc["tasks"]
        tv = np.zeros((len(tasks), len(tasks)))
        for r in doc["routers"]:
            load = np.array(r["load"], np.float64)
            tv += 0.5 * np.abs(load[:, None, :] - load[None, :, :]).sum(-1) / len(doc["routers"])
        print(f"\n{label}: mean TV distance between tasks' loads over the {len(doc['routers'])} routers\n")
        print("| | " + " | ".join(tasks) + " |")
        print("|---" * (len(tasks) + 1) + "|")
        for t, row in zip(tasks, tv):
            print(f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    ax.set_xlabel("layer")
    ax.set_ylabel("task separation (mean TV distance, mean over the layer's routers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("per-task expert load: how differently tasks are routed", fontsize=10)
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
