"""`moe-lora train` and `moe-lora quickstart`.

quickstart: the packaged quickstart config (embedded SmolLM2, an AlphaLoRA allocation of
MoLA experts, the bundled multi-task data), exact match on held-out examples before and
after training, the loss going down, a checkpoint, the metrics and a loss plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import yaml

from moe_lora_jax.adapters.io import init_adapter
from moe_lora_jax.atomic import run_lock, write_json_atomic
from moe_lora_jax.data import load_records
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.infer.evaluate import exact_match_eval
from moe_lora_jax.parallel.multihost import initialize_distributed, is_main_process
from moe_lora_jax.train.config import load_config
from moe_lora_jax.train.loop import build_run, check_output_dir, train

QUICKSTART_CONFIG = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) an adapter from a YAML config")
    p.add_argument("--config", required=True, help="YAML file (see moe_lora_jax/configs/quickstart.yaml)")
    _add_common(p)
    p.set_defaults(func=run_train)


def add_quickstart_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="a few minutes of AlphaLoRA-allocated MoLA training on the embedded model")
    p.add_argument("--eval-examples", type=int, default=60, help="held-out test examples scored by exact match")
    _add_common(p)
    p.set_defaults(func=run_quickstart)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. optim.lr=3e-4 (repeatable)")
    p.add_argument("--output-dir", default=None, help="run directory (overrides output_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(path: Path, args: argparse.Namespace) -> Any:
    overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_config(path, overrides)
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        flag = "--output-dir" if args.output_dir else "output_dir"
        raise MoeLoraError(f"{flag} {out} is a file, not a directory: name a new or existing run directory")
    return config


def _announce(config: Any, config_file: Path) -> None:
    """Say what is about to run; an empty config file means every default, which deserves a sentence."""
    if config_file.is_file() and not yaml.safe_load(config_file.read_text()):
        print(f"{config_file} is empty: training with every default setting (see moe_lora_jax/configs/quickstart.yaml)")
    adapter = config.adapter.get("method", "lora")
    print(
        f"train: {adapter} adapter on {config.model.path or 'the embedded SmolLM2-135M-Instruct'}, "
        f"data {config.data.train or 'bundled multi-task set'}, {config.loop.steps} steps of {config.loop.global_batch} "
        f"examples, writing to {config.output_dir}",
        flush=True,
    )


def run_train(args: argparse.Namespace) -> int:
    initialize_distributed()
    config = _config(Path(args.config), args)
    if is_main_process():
        _announce(config, Path(args.config))
    result = train(config, progress=not args.no_progress)
    _print_summary(result)
    return 0


def fresh_dir(base: Path) -> Path:
    """`base`, or base-1, base-2, ... whichever does not exist yet (a quickstart never overwrites)."""
    candidate, n = base, 0
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def run_quickstart(args: argparse.Namespace) -> int:
    config = _config(QUICKSTART_CONFIG, args)
    if args.output_dir is None:
        config = config.replace(output_dir=str(fresh_dir(Path(config.output_dir))))
    if args.eval_examples < 1:
        raise MoeLoraError(f"--eval-examples={args.eval_examples}: score at least 1 example")
    report = Path(config.output_dir) / "quickstart.json"
    if report.exists():
        raise MoeLoraError(f"{config.output_dir} holds a finished quickstart ({report}): choose a new --output-dir")
    check_output_dir(config)  # before the slow model load: another run's directory is refused
    with run_lock(config.output_dir, "quickstart"):
        return _quickstart(config, args, report)


def _quickstart(config: Any, args: argparse.Namespace, report_path: Path) -> int:
    check_output_dir(config)  # again, now that the directory is ours
    progress = not args.no_progress
    print(f"quickstart: writing to {config.output_dir}")
    run = build_run(config, progress=progress)
    ac = run.adapter_config
    if ac.allocation is not None:
        print(f"allocation ({ac.allocation.method}): experts per layer {list(ac.allocation.experts_per_layer)}")
    data = config.data
    records = load_records(data.test, "test", bundled_seed=data.bundled_seed, bundled_size=data.bundled_size,
                           bundled_tasks=data.bundled_tasks)
    records = records[: args.eval_examples]

    def score(adapter: Any) -> dict[str, Any]:
        return exact_match_eval(run.model, {"params": run.base, "adapter": adapter}, run.tokenizer, records,
                                data.template, task_field=data.task_field, progress=progress)

    before = score(init_adapter(run.model_config, ac, jax.random.key(config.seed)))
    print(f"exact match before training: {before['accuracy']:.3f} on {before['n']} held-out examples")
    result = train(config, progress=progress, run=run)
    after = score(result.state.adapter)
    summary = _print_summary(result)
    print(f"\n{'task':<18}{'before':>8}{'after':>8}")
    for task in after["per_task"]:
        print(f"{task:<18}{before['per_task'][task]:>8.3f}{after['per_task'][task]:>8.3f}")
    print(f"{'all':<18}{before['accuracy']:>8.3f}{after['accuracy']:>8.3f}")
    report = {**summary, "exact_match_before": before, "exact_match_after": after}
    write_json_atomic(report_path, report, allow_nan=True)
    print(f"report: {report_path}")
    return 0


def _print_summary(result: Any) -> dict[str, Any]:
    hist = result.history
    summary: dict[str, Any] = {"output_dir": str(result.output_dir), "step": result.step}
    if hist:
        first, last = hist[0], hist[-1]
        summary.update(first_loss=first["ce"], last_loss=last["ce"], first_step=first["step"], last_step=last["step"])
        print(f"\ntrain loss (task CE) {first['ce']:.4f} at step {first['step']} -> {last['ce']:.4f} at step {last['step']}")
    if result.evals:
        summary["eval_loss"] = result.evals
        print("validation loss " + ", ".join(f"{e['eval/loss']:.4f} (step {e['step']})" for e in result.evals))
    out = Path(result.output_dir)
    for name in ("metrics.jsonl", "loss.png", "checkpoints"):
        if (out / name).exists():
            print(f"  {out / name}")
    if result.adapter_dir is not None:  # only an adapter this run wrote (not one an earlier, shorter run left)
        print(f"  {result.adapter_dir} (step {result.step})")
    return summary
