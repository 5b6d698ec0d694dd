"""`run_routing_analyses`: read a trained adapter (and data), write each analysis as NAME.json + NAME.png.

    from moe_lora_jax.analysis import run_routing_analyses
    paths = run_routing_analyses("runs/quickstart/adapter", "runs/quickstart/routing")

Defaults come from the run that wrote the adapter when `adapter_dir` sits in a run directory
(`RUN/adapter` next to `RUN/config.yaml`): its base model, its data (the held-out validation split),
template, max_len and LoRAMoE's world-knowledge task list. Otherwise: the embedded SmolLM2, the
bundled set, the chat template.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from moe_lora_jax.analysis.methods import ANALYSES, check_analyses
from moe_lora_jax.analysis.plots import PLOTS
from moe_lora_jax.analysis.redundancy import expert_redundancy_result
from moe_lora_jax.analysis.results import expert_load_result, loramoe_groups_result, milora_modules_result
from moe_lora_jax.atomic import atomic_dir, ensure_new_dir, write_json_atomic
from moe_lora_jax.errors import MoeLoraError

DEFAULT_MAX_EXAMPLES = 240  # 40 per bundled task: a minute of forwards of SmolLM2 on 2 CPU cores


@dataclass(frozen=True)
class DataChoice:
    """Where the examples come from: source (None = bundled), split, and how to template them."""

    source: str | None
    split: str
    template: str
    max_len: int
    task_field: str = "task"
    bundled_seed: int = 0
    bundled_size: int = 3000
    label: str = "bundled"
    bundled_tasks: tuple[str, ...] | None = None


def run_config_of(adapter_dir: str | os.PathLike) -> Any | None:
    """The TrainConfig of the run whose final adapter `adapter_dir` is (RUN/adapter, RUN/config.yaml), else None."""
    cfg = Path(adapter_dir).resolve().parent / "config.yaml"
    if Path(adapter_dir).name != "adapter" or not cfg.is_file():
        return None
    from moe_lora_jax.train.config import load_config

    return load_config(cfg)


def choose_data(data: str | os.PathLike | None, run_config: Any | None, split: str = "validation",
                template: str | None = None, max_len: int | None = None) -> DataChoice:
    """data: None (the run's data, else bundled), "bundled", or a .json/.jsonl/.parquet file or directory."""
    rc = None if run_config is None else run_config.data
    tpl = template or (rc.template if rc is not None else "chat")
    length = max_len or (rc.max_len if rc is not None else 256)
    field = rc.task_field if rc is not None else "task"
    if data is None and rc is not None:
        source = getattr(rc, split, None) if rc.train is not None else None
        if rc.train is not None and source is None:
            source = rc.train  # a run without that split: its train file (seen in training; said in the label)
        label = f"the run's data ({source or 'bundled'}, {split})"
        return DataChoice(source, split, tpl, length, field, rc.bundled_seed, rc.bundled_size, label,
                          getattr(rc, "bundled_tasks", None))
    if data is None or str(data) == "bundled":
        return DataChoice(None, split, tpl, length, field, label=f"bundled ({split})")
    return DataChoice(str(data), split, tpl, length, field, label=str(data))


def balanced_head(records: Sequence[Any], n: int, task_field: str = "task") -> list[Any]:
    """The first `n` rows taken in turn from each task (in order of first appearance), each task's rows in file
    order: every task gets n / T rows while it has them, so a small sample still covers every task."""
    by_task: dict[str, list[Any]] = {}
    for r in records:
        by_task.setdefault(str(r.get(task_field)), []).append(r)
    queues = [iter(rows) for rows in by_task.values()]
    out: list[Any] = []
    while len(out) < n and queues:
        for q in list(queues):
            row = next(q, None)
            if row is None:
                queues.remove(q)
            elif len(out) < n:
                out.append(row)
    return out


def _batches(choice: DataChoice, tokenizer: Any, max_examples: int | None, batch_size: int):
    from moe_lora_jax.data import build_task_table, eval_batches, load_records, tokenize_split

    records = load_records(choice.source, choice.split, bundled_seed=choice.bundled_seed, bundled_size=choice.bundled_size,
                           bundled_tasks=choice.bundled_tasks)
    if not records:
        raise MoeLoraError(f"{choice.label} has no examples")
    tasks = build_task_table(records, task_field=choice.task_field)
    if max_examples:
        records = balanced_head(records, max_examples, choice.task_field)
    split = tokenize_split(records, tokenizer, choice.template, choice.max_len, tasks, task_field=choice.task_field,
                           name=choice.label)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_size = min(batch_size, len(split))
    n_batches = -(-len(split) // batch_size)
    return tasks, eval_batches(split, batch_size, pad_id), n_batches


def run_routing_analyses(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
    split: str = "validation",
    batch_size: int = 16,
    tokens: str = "all",
    world_knowledge_tasks: Sequence[str] | None = None,
    template: str | None = None,
    max_len: int | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the analyses `names` (None: every one that applies to the adapter's method) of `adapter_dir` into the
    new directory `out_dir`, which appears only when all are written. Returns {name: NAME.json, name + "_plot": NAME.png}.

    model / data: see the module docstring (data: None, "bundled" or a file); max_examples: N examples of the split
    taken in turn from each task (`balanced_head`; None: all); tokens: the tokens counted for the token routers (all, prompt or response).
    Raises MoeLoraError, before any work, for an existing output, a bad adapter or an analysis that does not apply."""
    ensure_new_dir(out_dir)
    from moe_lora_jax.adapters.io import load_adapter

    ac, adapter = load_adapter(adapter_dir)
    names = check_analyses(names, ac)
    if max_examples is not None and max_examples < 1:
        raise MoeLoraError(f"max_examples={max_examples}: analyse at least 1 example (or None for all)")
    if batch_size < 1:
        raise MoeLoraError(f"batch_size={batch_size}: use at least 1")
    run_config = run_config_of(adapter_dir)
    meta = {"adapter": str(adapter_dir)}
    docs: dict[str, dict[str, Any]] = {}
    if "expert_redundancy" in names:
        docs["expert_redundancy"] = expert_redundancy_result(adapter, ac)
    data_names = [n for n in names if ANALYSES[n].needs_data]
    if data_names:
        totals, data_meta = _collect(adapter_dir, run_config, model, data, split, template, max_len, max_examples,
                                     batch_size, tokens, progress)
        meta.update(data_meta)
        wk = world_knowledge_tasks
        if wk is None and run_config is not None:
            wk = run_config.data.world_knowledge_tasks
        builders = {
            "expert_load": lambda: expert_load_result(totals, ac),
            "milora_modules": lambda: milora_modules_result(totals, ac),
            "loramoe_groups": lambda: loramoe_groups_result(totals, ac, wk),
        }
        for name in data_names:
            docs[name] = builders[name]()
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for name in names:
            write_json_atomic(tmp / f"{name}.json", {**meta, **docs[name]})
            PLOTS[name](docs[name], tmp / f"{name}.png")
    paths: dict[str, Path] = {}
    for name in names:
        paths[name] = out / f"{name}.json"
        paths[f"{name}_plot"] = out / f"{name}.png"
    return paths


def _collect(adapter_dir, run_config, model, data, split, template, max_len, max_examples, batch_size, tokens, progress):
    """Load the base model with the adapter, read the data, one pass of the routers: (RoutingTotals, metadata)."""
    from moe_lora_jax.analysis.collect import collect_routing
    from moe_lora_jax.convert import load_model_and_adapter
    from moe_lora_jax.model import LlamaForCausalLM
    from moe_lora_jax.tokenizer import load_tokenizer

    if model is None and run_config is not None:
        model = run_config.model.path
    choice = choose_data(data, run_config, split, template, max_len)
    path, config, llama, variables = load_model_and_adapter(model, adapter_dir, progress=progress)
    # scanned layers compile once for all layers (router statistics are stored per layer either way)
    llama = LlamaForCausalLM(config.replace(scan_layers=True), llama.adapter_config)
    tokenizer = load_tokenizer(path)
    tasks, batches, n_batches = _batches(choice, tokenizer, max_examples, batch_size)
    totals = collect_routing(llama, variables, llama.adapter_config, batches, tasks, tokens=tokens, progress=progress,
                             total=n_batches)
    meta = {"model": str(path), "data": choice.label, "split": choice.split, "template": choice.template,
            "max_len": choice.max_len, "max_examples": max_examples}
    return totals, meta
