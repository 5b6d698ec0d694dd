"""`moe-lora plan`: will the train step fit a TPU slice? Compiled ahead of time on this machine (needs libtpu).

    moe-lora plan --model llama2-7b --topology v5p-8 --config run.yaml --set model.remat=full --json plan.json
    moe-lora plan --model llama2-70b --topology v5p-64 --set mesh.fsdp=16 --set mesh.tensor=2 --suggest
"""

from __future__ import annotations

import argparse

from moe_lora_jax.atomic import check_new_file, write_json_atomic
from moe_lora_jax.plan import NAMED_SHAPES, format_report, parse_topology, plan_train_step, suggest_remat
from moe_lora_jax.train.config import load_config


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="compile the train step for a TPU topology: per-chip memory, fit, FLOPs (needs libtpu)")
    p.add_argument("--model", default=None,
                   help=f"a built-in shape ({', '.join(NAMED_SHAPES)}), a model directory or config.json (default: the config's model.path)")
    p.add_argument("--topology", required=True, help="TPU slice: v5p-8, v5p:2x2x1, v4-8, v4:2x2x2, v5p-64, v5e-16, v6e:4x4, ...")
    p.add_argument("--config", default=None, help="train config YAML (default: every default setting)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. model.remat=full (repeatable)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON (a new file)")
    p.add_argument("--suggest", action="store_true", help="try the remat policies from least to most recomputation; report the first that fits")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    if args.json:
        check_new_file(args.json)  # before the compile: an existing file is refused, not replaced
    config = load_config(args.config, args.set)
    topology = parse_topology(args.topology)
    plan = suggest_remat if args.suggest else plan_train_step
    report = plan(config, args.model, topology)
    print(format_report(report))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"report: {args.json}")
    return 0
