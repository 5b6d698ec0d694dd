"""Instruction data: the bundled multi-task set, templates, and the batch pipeline."""

from moe_lora_jax.data.bundled import TASKS, exact_match, load_bundled, write_bundled
from moe_lora_jax.data.pipeline import (
    BatchIterator,
    TokenizedSplit,
    TrainData,
    TruncationStats,
    build_task_table,
    check_global_batch,
    eval_batches,
    load_records,
    make_train_data,
    task_type_table,
    tokenize_split,
)
from moe_lora_jax.data.templates import TEMPLATES, prompt_ids, prompt_text

__all__ = [
    "TASKS",
    "TEMPLATES",
    "BatchIterator",
    "TokenizedSplit",
    "TrainData",
    "TruncationStats",
    "build_task_table",
    "check_global_batch",
    "eval_batches",
    "exact_match",
    "load_bundled",
    "load_records",
    "make_train_data",
    "prompt_ids",
    "prompt_text",
    "task_type_table",
    "tokenize_split",
    "write_bundled",
]
