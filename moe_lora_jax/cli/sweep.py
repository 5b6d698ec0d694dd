"""`moe-lora sweep`: run (or resume) a study of arms x seeds and write results.json, results.md and plots."""

from __future__ import annotations

import argparse

from moe_lora_jax.sweep import load_study, run_study
from moe_lora_jax.sweep.runner import default_out_dir


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train and evaluate every arm x seed of a study file; tables and plots (docs/reproduce.md)")
    p.add_argument("--study", required=True, help="study YAML (base, seeds, arms), e.g. experiments/reproduce/quick.yaml")
    p.add_argument("--out", default=None, help="study directory (default: runs/sweep-<study name>); rerun to resume")
    p.add_argument("--overlay", action="append", default=[], metavar="FILE",
                   help="YAML merged over the study (base, seeds, eval), e.g. experiments/reproduce/paper_scale/mola.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="study key (seeds=[0], eval.examples=20) or a train override for every arm (loop.steps=5)")
    p.add_argument("--progress", action="store_true", help="progress bars inside each run")
    p.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    study = load_study(args.study, overlays=args.overlay, sets=args.set)
    out = args.out if args.out is not None else default_out_dir(study)
    results = run_study(study, out, progress=args.progress)
    return 0 if all(not a["failed"] for a in results["arms"]) else 1
