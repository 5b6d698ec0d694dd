"""`moe-lora eval`: exact match, multiple choice or perplexity of a model (and adapter) on a data set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moe_lora_jax.atomic import check_new_file, write_json_atomic
from moe_lora_jax.cli.common import add_model_arg
from moe_lora_jax.convert import load_model_and_adapter
from moe_lora_jax.data.templates import check_text_fields
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.infer import evaluate
from moe_lora_jax.tokenizer import load_tokenizer

KINDS = ("exact-match", "multiple-choice", "perplexity")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model (and adapter): exact match, multiple choice or perplexity, per task")
    add_model_arg(p)
    p.add_argument("--adapter", default=None, help="adapter directory (native, PEFT LoRA or mixlora) to apply")
    p.add_argument("--data", required=True,
                   help="'bundled', a .json/.jsonl/.parquet file, a directory with SPLIT.jsonl, or a hub dataset (name or name:config)")
    p.add_argument("--split", default="test", help="split to read (default: test)")
    p.add_argument("--kind", choices=KINDS, default="exact-match")
    p.add_argument("--columns", default=None,
                   help="FIELD=COLUMN,... renaming the data's columns (exact-match: instruction, input, output; "
                        "multiple-choice: question, choices, label, context; perplexity: text; all: task). "
                        "a|b gathers columns into a list, [no|yes] is a literal list")
    p.add_argument("--prompt-format", default=None,
                   help="multiple-choice prompt, e.g. 'Question: {question}\\nAnswer:' (default: context, newline, question)")
    p.add_argument("--template", choices=("chat", "alpaca"), default="chat",
                   help="prompt template for instruction records (exact-match, perplexity of responses)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24, help="exact-match: longest completion")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the full result (examples included) to this new file (never overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)


def _check_args(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise MoeLoraError(f"--limit={args.limit}: evaluate at least 1 example")
    if args.batch_size < 1:
        raise MoeLoraError(f"--batch-size={args.batch_size}: use at least 1")
    if args.max_new_tokens < 1:
        raise MoeLoraError(f"--max-new-tokens={args.max_new_tokens}: ask for at least 1 token")
    if args.json_out is not None:
        if Path(args.json_out).is_dir():
            raise MoeLoraError(f"--json {args.json_out} is a directory: name a file")
        check_new_file(args.json_out)  # never overwritten (not even the --data file): fail before the slow work


def format_table(result: dict[str, Any], kind: str) -> str:
    """One row per task and one for all examples: n and the kind's metrics."""
    if kind == "multiple-choice":
        metrics = [("acc", "per_task", result["accuracy"]), ("acc_norm", "per_task_norm", result["accuracy_norm"])]
    elif kind == "perplexity":
        metrics = [("perplexity", "per_task", result["perplexity"])]
    else:
        metrics = [("exact", "per_task", result["accuracy"])]
    digits = 2 if kind == "perplexity" else 3
    lines = [f"{'task':<24}{'n':>7}" + "".join(f"{name:>12}" for name, _, _ in metrics)]
    for task, n in result["per_task_n"].items():
        lines.append(f"{task:<24}{n:>7}" + "".join(f"{result[key][task]:>12.{digits}f}" for _, key, _ in metrics))
    lines.append(f"{'all':<24}{result['n']:>7}" + "".join(f"{total:>12.{digits}f}" for _, _, total in metrics))
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    _check_args(args)
    columns = evaluate.parse_columns(args.columns)
    records = evaluate.load_eval_records(args.data, args.split, columns, limit=args.limit)
    if not records:
        raise MoeLoraError(f"{args.data} split {args.split} has no examples")
    if args.kind == "exact-match":  # bad rows fail before the model loads, named by file and line
        check_text_fields(records)
    path, config, model, variables = load_model_and_adapter(args.model, args.adapter)
    tokenizer = load_tokenizer(path)
    progress = not args.no_progress
    if args.kind == "exact-match":
        result = evaluate.exact_match_eval(model, variables, tokenizer, records, args.template, batch_size=args.batch_size,
                                           max_new_tokens=args.max_new_tokens, progress=progress)
    elif args.kind == "multiple-choice":
        result = evaluate.multiple_choice_eval(model, variables, tokenizer, records, prompt_format=args.prompt_format,
                                               batch_size=args.batch_size, progress=progress)
    else:
        result = evaluate.perplexity_eval(model, variables, tokenizer, records, args.template,
                                          batch_size=args.batch_size, progress=progress)
    print(format_table(result, args.kind))
    if args.json_out is not None:
        meta = {"model": str(path), "adapter": args.adapter, "data": args.data, "split": args.split, "kind": args.kind}
        write_json_atomic(args.json_out, {**meta, **result}, allow_nan=True, default=str)
        print(f"wrote {args.json_out}")
    return 0
