"""Record a finished `moe-lora sweep` study under experiments/results/: reproduce_<name>.md and its plots.

    python experiments/reproduce/record.py runs/studies/a_mola_shapes --reference mola-2468

Writes experiments/results/reproduce_<name>/ (results.json and the three plots, copied from the
study directory) and experiments/results/reproduce_<name>.md: the command, the dates and machine,
the runner's table, then what the table alone does not show:

- each arm against the reference arm: the difference of the seed means of validation loss and exact
  match, with two-sided p-values of Welch's t-test and of the paired t-test over seeds (with 2-3
  seeds a p above 0.05 means "no evidence", not "equal");
- the routing at the last logged train step (metrics.jsonl): mean load CV² and normalised entropy
  over the layers, mean ± std over seeds; and the routing analyses' headlines (task separation of the
  expert load, or of MiLoRA's module selection; the experts' mean cosine distance).

A "## Reading" section already in the file is kept (it is written by hand after looking at the numbers);
rerunning the script refreshes everything above it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from moe_lora_jax.sweep.analyses import HEADLINES, headline

ROOT = Path(__file__).resolve().parents[2]
PLOTS = ("loss_curves.png", "metrics_bars.png", "exact_match_per_task.png")
READING = "## Reading"


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test, or None with fewer than two values on a side (or no spread)."""
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) < 1e-12 and np.ptp(b) < 1e-12):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical samples: the p-value is still printed
        return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def paired(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test over seeds (seed k of both arms: same data order, same
    validation batches), or None when it is undefined (fewer than two pairs, identical differences)."""
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or np.ptp(d) < 1e-12:
        return None
    return float(sps.ttest_rel(a, b).pvalue)


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def last_routing(run_dir: Path) -> dict[str, float]:
    """Mean over layers of load_cv2 and entropy_norm at the last logged train step of one run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    if not train:
        return {}
    last = train[-1]
    out = {}
    for stat in ("load_cv2", "entropy_norm"):
        if f"router/mean/{stat}" in last:
            out[stat] = float(last[f"router/mean/{stat}"])
    return out


def comparison_table(arms: list[Mapping[str, Any]], reference: str) -> str:
    ref = next(a for a in arms if a["name"] == reference)
    lines = [f"| arm | Δ eval/loss vs {reference} | p Welch | p paired | Δ exact match | p Welch | p paired |",
             "|---|---|---|---|---|---|---|"]
    for a in arms:
        if a["name"] == reference:
            continue
        cells = [a["name"]]
        for key in ("eval/loss", "exact_match"):
            x, y = a["metrics"].get(key, {}).get("values", []), ref["metrics"].get(key, {}).get("values", [])
            if not x or not y:
                cells += ["n/a", "n/a", "n/a"]
                continue
            p, pp = welch(x, y), paired(x, y) if a["seeds"] == ref["seeds"] and len(x) == len(y) else None
            cells += [f"{np.mean(x) - np.mean(y):+.4f}", "n/a" if p is None else f"{p:.2f}", "n/a" if pp is None else f"{pp:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_separation(run: Path, analyses: Mapping[str, Any]) -> float | None:
    """The run's task separation: of its experts' load, or of MiLoRA's prompt-level module selection (mean
    over layers; read from routing/milora_modules.json for runs recorded before the sweep stored it)."""
    for name in (n for n, key in HEADLINES.items() if key == "task_separation"):
        if analyses.get(name, {}).get("task_separation") is not None:
            return analyses[name]["task_separation"]
    path = run / "routing" / "milora_modules.json"
    return headline(json.loads(path.read_text()), "task_separation") if path.exists() else None


def routing_table(study_dir: Path, arms: list[Mapping[str, Any]]) -> str:
    lines = ["| arm | load CV² (last step) | entropy / log E | task separation | experts' mean cosine distance |",
             "|---|---|---|---|---|"]
    any_row = False
    for a in arms:
        cv2, ent, sep, dist = [], [], [], []
        for seed in a["seeds"]:
            run = study_dir / a["name"] / f"seed{seed}"
            r = last_routing(run)
            if "load_cv2" in r:
                cv2.append(r["load_cv2"])
                ent.append(r["entropy_norm"])
            an = json.loads((run / "sweep_result.json").read_text()).get("analyses", {})
            if (ts := task_separation(run, an)) is not None:
                sep.append(ts)
            if "expert_redundancy" in an and an["expert_redundancy"].get("mean_cosine_distance") is not None:
                dist.append(an["expert_redundancy"]["mean_cosine_distance"])
        if cv2 or sep or dist:
            any_row = True
            lines.append(f"| {a['name']} | {mean_std(cv2)} | {mean_std(ent)} | {mean_std(sep)} | {mean_std(dist)} |")
    return "\n".join(lines) if any_row else ""


def run_times(study_dir: Path) -> tuple[str, str]:
    starts = [p.stat().st_mtime for p in study_dir.glob("*/seed*/config.yaml")]
    ends = [p.stat().st_mtime for p in study_dir.glob("*/seed*/sweep_result.json")]
    fmt = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: E731
    return fmt(min(starts)), fmt(max(ends))


def machine() -> str:
    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} CPU cores, jax {jax.__version__}, python {platform.python_version()}, float32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", type=Path, help="the sweep's --out directory")
    parser.add_argument("--name", default=None, help="record name (default: the directory's name)")
    parser.add_argument("--reference", required=True, help="the arm the others are compared with")
    parser.add_argument("--note", default="", help="a line about the conditions (load, pauses) for the record")
    args = parser.parse_args()
    study_dir = args.study_dir
    name = args.name or study_dir.name
    study = json.loads((study_dir / "study.json").read_text())
    results = json.loads((study_dir / "results.json").read_text())
    arms = results["arms"]
    if args.reference not in [a["name"] for a in arms]:
        raise SystemExit(f"--reference {args.reference!r} is not an arm of {study_dir}: choose one of {[a['name'] for a in arms]}")

    out_dir = ROOT / "experiments" / "results" / f"reproduce_{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(study_dir / "results.json", out_dir / "results.json")
    for plot in PLOTS:
        if (study_dir / plot).exists():
            shutil.copy2(study_dir / plot, out_dir / plot)

    table = (study_dir / "results.md").read_text().split("\n", 1)[1].strip()  # the runner's, without its title
    table = "\n".join(line for line in table.splitlines() if not line.startswith("Plots:")).strip()  # linked below
    start, end = run_times(study_dir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rel = os.path.relpath(study_dir, ROOT) if study_dir.resolve().is_relative_to(ROOT) else str(study_dir)
    parts = [
        f"# Reproduce, study {name}",
        "",
        f"- command: `moe-lora sweep --study {study['file']} --out {rel}`",
        f"- runs: {start} to {end}, at commit {commit} or earlier (the runs' code is the same in numbers: "
        "tests/model/test_scan_layers.py, tests/train/test_stacked_state.py)",
        f"- machine: {machine()}",
        *([f"- conditions: {args.note}"] if args.note else []),
        "",
        "## Table (the runner's results.md)",
        "",
        table,
        "",
        f"Plots: [loss curves](reproduce_{name}/loss_curves.png), [validation loss and exact match](reproduce_{name}/metrics_bars.png), "
        f"[exact match per task](reproduce_{name}/exact_match_per_task.png); [results.json](reproduce_{name}/results.json).",
        "",
        f"## Against {args.reference}",
        "",
        "Differences of the seed means (arm minus reference; lower loss and higher exact match are better), Welch's "
        "two-sided p-value over the seeds, and the paired t-test's (seed k of every arm trains on the same data order "
        "and is validated on the same batches, so the seed-to-seed spread partly cancels). n/a: undefined (no spread).",
        "",
        comparison_table(arms, args.reference),
        "",
    ]
    routing = routing_table(study_dir, arms)
    if routing:
        parts += ["## Routing", "",
                  "Mean over layers at the last logged train step (load CV²: variance over mean² of each expert's share of the "
                  "top-k selections; 0 is perfectly even), and the routing analyses' headlines (docs/analysis.md), mean ± std over seeds. "
                  "Task separation: the mean total-variation distance between two tasks' expert loads (MiLoRA: between their rates of "
                  "selecting each LoRA module), 0 when every task routes alike, 1 when no two share an expert.",
                  "", routing, ""]
    path = ROOT / "experiments" / "results" / f"reproduce_{name}.md"
    reading = ""
    if path.exists() and READING in path.read_text():
        reading = path.read_text()[path.read_text().index(READING):]
    path.write_text("\n".join(parts) + ("\n" + reading if reading else ""))
    print(f"wrote {path.relative_to(ROOT)} and {out_dir.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
