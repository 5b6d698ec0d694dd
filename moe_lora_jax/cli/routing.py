"""`moe-lora routing`: routing analyses of a trained adapter (moe_lora_jax.analysis), each as NAME.json + NAME.png."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moe_lora_jax.analysis import ANALYSES, DEFAULT_MAX_EXAMPLES, run_routing_analyses
from moe_lora_jax.analysis.collect import TOKEN_MASKS
from moe_lora_jax.cli.common import add_model_arg
from moe_lora_jax.errors import MoeLoraError


def add_routing_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("routing", help="routing analyses of a trained adapter: per-task expert load, MiLoRA modules, "
                                       "LoRAMoE groups, expert redundancy (JSON + PNG)")
    p.add_argument("--adapter", required=True, help="adapter directory (a run's RUN/adapter also supplies the run's model and data)")
    add_model_arg(p)
    p.add_argument("--data", default=None,
                   help="'bundled', or a .json/.jsonl/.parquet file or directory with SPLIT.jsonl "
                        "(default: the run's data when the adapter is RUN/adapter, else bundled)")
    p.add_argument("--split", default="validation", help="split to read (default: validation)")
    p.add_argument("--analysis", action="append", choices=tuple(ANALYSES), default=None, metavar="NAME",
                   help=f"one of {', '.join(ANALYSES)} (repeatable; default: every one that applies to the adapter's method)")
    p.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES,
                   help=f"N examples of the split, taken in turn from each task (default {DEFAULT_MAX_EXAMPLES}; 0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokens", choices=tuple(TOKEN_MASKS), default="all",
                   help="tokens the token routers are counted on: all (prompt and response), prompt or response")
    p.add_argument("--world-knowledge-tasks", default=None, metavar="A,B",
                   help="LoRAMoE: task names of type world knowledge (default: the run's data.world_knowledge_tasks)")
    p.add_argument("--template", choices=("chat", "alpaca"), default=None, help="prompt template (default: the run's, else chat)")
    p.add_argument("--max-len", type=int, default=None, help="longest example in tokens (default: the run's, else 256)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_routing)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def summary_line(name: str, doc: dict[str, Any]) -> str:
    """The headline number of one analysis document."""
    if name == "expert_load":
        return f"task separation (mean TV distance between tasks' expert loads) {_fmt(doc['task_separation'])}, " \
               f"per layer " + " ".join(_fmt(r["task_separation"]) for r in doc["layers"])
    if name == "milora_modules":
        return "task separation per layer " + " ".join(_fmt(x) for x in doc["task_separation"])
    if name == "loramoe_groups":
        by = doc["by_type"]
        return f"gate mass on the world-knowledge group: world-knowledge tasks {_fmt(by['world_knowledge'])}, " \
               f"other tasks {_fmt(by['other'])}"
    return f"mean pairwise distance of the experts' dW: cosine {_fmt(doc['mean_cosine_distance'])}, " \
           f"normalised Frobenius {_fmt(doc['mean_frobenius_distance'])}"


def run_routing(args: argparse.Namespace) -> int:
    if args.max_examples < 0:
        raise MoeLoraError(f"--max-examples={args.max_examples}: give a positive number (0 = all)")
    if args.max_len is not None and args.max_len < 2:
        raise MoeLoraError(f"--max-len={args.max_len}: give at least 2 tokens")
    wk = None if args.world_knowledge_tasks is None else [t.strip() for t in args.world_knowledge_tasks.split(",") if t.strip()]
    paths = run_routing_analyses(
        args.adapter, args.out, model=args.model, data=args.data, names=args.analysis,
        max_examples=args.max_examples or None, split=args.split, batch_size=args.batch_size, tokens=args.tokens,
        world_knowledge_tasks=wk, template=args.template, max_len=args.max_len, progress=not args.no_progress,
    )
    for name, path in paths.items():
        if name in ANALYSES:
            print(f"{name}: {summary_line(name, json.loads(Path(path).read_text()))}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0
