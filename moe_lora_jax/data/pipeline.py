"""From files to per-host batches: load, template, tokenize, truncate, bucket, shuffle.

    records = load_records("data/train.jsonl", "train")
    tasks = build_task_table(records)
    train = tokenize_split(records, tokenizer, "alpaca", max_len=256, task_names=tasks)
    it = BatchIterator(train, global_batch=32, seed=0, pad_id=tokenizer.pad_token_id,
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)            # this host's rows: dict of numpy arrays
    saved = it.state()          # {"epoch": 0, "step_in_epoch": 1, ...}; it.restore(saved) resumes exactly

Batches (numpy, this host's rows of the global batch, right-padded):

    input_ids       int32 [b, L]
    attention_mask  int32 [b, L]   1 = token, 0 = padding
    loss_mask       int32 [b, L]   1 where token t is a response token; the loss of position t-1
                                   predicting token t is weighted by loss_mask[:, t] (shift by one)
    prompt_mask     int32 [b, L]   1 on the prompt's tokens (what MiLoRA's router pools, in training as in decoding)
    task_id         int32 [b]      index into `task_names`

Batching is length bucketing with padding, not packing: an example never shares a
row, so no segment ids are needed and attention masks stay the model's own. Each
epoch draws a permutation from (seed, epoch); within windows of
`bucket_window * global_batch` examples the rows are sorted by length and cut into
global batches, whose order is then shuffled. The padded length of a batch is the
longest example rounded up to `pad_multiple` (capped at max_len), so only a few
shapes ever compile. Every host computes the same plan and takes its own
contiguous slice of each global batch, so the data order does not depend on the
number of hosts and a checkpoint restores onto a different host count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from moe_lora_jax.data.bundled import load_bundled
from moe_lora_jax.data.records import Records, read_json_records
from moe_lora_jax.data.templates import MissingFieldError, render_many
from moe_lora_jax.errors import MoeLoraError

log = logging.getLogger(__name__)

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_TASK = "default"


# ----------------------------------------------------------------------------- loading
def load_records(
    source: str | Path | None,
    split: str = "train",
    *,
    bundled_seed: int = 0,
    bundled_size: int = 10_000,
    setting: str | None = None,
    bundled_tasks: Sequence[str] | None = None,
) -> list[dict]:
    """Rows of one split as dicts.

    `source` is None (the bundled set), a .json/.jsonl/.parquet file, a directory
    holding `{split}.jsonl` (or .json/.parquet, as `write_bundled` produces), or a
    hub dataset name (needs a network). JSON files are read as written (strings stay
    strings) into `Records` that remember each row's line; `setting` names where the
    source came from in error messages (default: data.<split>).
    """
    if source is None:
        return load_bundled(split, seed=bundled_seed, size=bundled_size, tasks=bundled_tasks)
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / f"{split}{ext}" for ext in FILE_FORMATS if (path / f"{split}{ext}").is_file()]
        if not found:
            raise MoeLoraError(f"{path} has no {split}.jsonl, {split}.json or {split}.parquet: name the data file directly")
        path = found[0]
    if path.is_file():
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise MoeLoraError(f"{path} is not .json, .jsonl or .parquet: convert it to one of those formats")
        return _load_file(path, fmt)
    if path.suffix.lower() in FILE_FORMATS or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise MoeLoraError(f"data file {source} does not exist: check the path in {setting or f'data.{split}'}")
    return _load_hub(str(source), split)


def _load_file(path: Path, fmt: str) -> list[dict]:
    if fmt == "json":  # read as written, with line numbers (see moe_lora_jax.data.records)

        return read_json_records(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # malformed JSON, schema conflicts, unreadable parquet
        raise MoeLoraError(f"could not read {path} as {fmt} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): fix the file") from None
    return Records(ds.to_list(), str(path))


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise MoeLoraError(
            f"could not load the hub dataset {name!r} split {split!r} ({type(e).__name__}): "
            "pass a local .json/.jsonl/.parquet file, or run where the hub is reachable"
        ) from None
    return ds.to_list()


def build_task_table(*record_lists: Sequence[Mapping[str, Any]], task_field: str = "task") -> tuple[str, ...]:
    """Sorted task names over all splits (rows without the field count as 'default')."""
    names = {str(r[task_field]) if r.get(task_field) is not None else DEFAULT_TASK for rows in record_lists for r in rows}
    return tuple(sorted(names))


def task_type_table(task_names: Sequence[str], world_knowledge_tasks: Sequence[str]) -> np.ndarray:
    """LoRAMoE's task type of every task id: int32 [len(task_names)], 1 where the task is named in
    `world_knowledge_tasks` (data.world_knowledge_tasks), else 0. A name not in the table is an error."""
    known = set(task_names)
    unknown = [t for t in world_knowledge_tasks if t not in known]
    if unknown:
        raise MoeLoraError(
            f"data.world_knowledge_tasks names {unknown}, which no example has: use some of {list(task_names)}"
        )
    wanted = set(world_knowledge_tasks)
    return np.asarray([1 if t in wanted else 0 for t in task_names], np.int32)


# ----------------------------------------------------------------------------- tokenizing
@dataclass(frozen=True)
class TruncationStats:
    examples: int  # rows read
    truncated: int  # rows shortened to max_len
    tokens_cut: int  # tokens removed by truncation
    dropped: int  # rows removed (too long for `drop`, or nothing of the response left)

    def summary(self, name: str = "data") -> str:
        kept = self.examples - self.dropped
        return (
            f"{name}: {kept}/{self.examples} examples kept, {self.truncated} truncated "
            f"({self.tokens_cut} tokens cut), {self.dropped} dropped"
        )


@dataclass(frozen=True)
class TokenizedSplit:
    """Tokenized examples of one split. `tokens[i]` is prompt + response, `prompt_lens[i]` its prompt part."""

    tokens: tuple[np.ndarray, ...]
    prompt_lens: np.ndarray  # int32 [N]
    task_ids: np.ndarray  # int32 [N]
    task_names: tuple[str, ...]
    stats: TruncationStats
    examples: tuple[dict, ...]  # the rows kept, aligned with tokens (for exact-match evaluation)
    max_len: int
    name: str = "data"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), np.int32, len(self.tokens))


def tokenize_split(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    template: str,
    max_len: int,
    task_names: Sequence[str] | None = None,
    *,
    task_field: str = "task",
    truncation: str = "right",
    name: str = "data",
) -> TokenizedSplit:
    """Template and tokenize `records`; truncate or drop rows longer than `max_len` and count them."""

    if truncation not in ("right", "drop"):
        raise MoeLoraError(f"unknown truncation {truncation!r}: use right or drop")
    if not records:
        raise MoeLoraError(f"{name} is empty: the data file has no rows")
    task_names = tuple(task_names) if task_names is not None else build_task_table(records, task_field=task_field)
    task_index = {t: i for i, t in enumerate(task_names)}
    try:
        prompts, responses = render_many(records, template, tokenizer)
    except MissingFieldError as e:
        raise MoeLoraError(f"{name}: {e}") from None
    tokens, prompt_lens, task_ids, kept = [], [], [], []
    truncated = tokens_cut = dropped = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = p + r
        if len(row) > max_len:
            if truncation == "drop" or len(p) >= max_len:
                dropped += 1
                continue
            truncated += 1
            tokens_cut += len(row) - max_len
            row = row[:max_len]
        task = records[i].get(task_field)
        task = DEFAULT_TASK if task is None else str(task)
        if task not in task_index:
            raise MoeLoraError(f"{name}: row {i} has task {task!r}, which is not in the task table {list(task_names)}: build the table from every split")
        tokens.append(np.asarray(row, np.int32))
        prompt_lens.append(len(p))
        task_ids.append(task_index[task])
        kept.append(dict(records[i]))
    stats = TruncationStats(examples=len(records), truncated=truncated, tokens_cut=tokens_cut, dropped=dropped)
    if not tokens:
        raise MoeLoraError(
            f"{name}: nothing left after filtering: all {len(records)} examples are longer than max_len={max_len} "
            "(or have no room for the response): raise data.max_len or use data.truncation=right"
        )
    if truncated or dropped:
        log.warning(stats.summary(name))
    return TokenizedSplit(
        tokens=tuple(tokens),
        prompt_lens=np.asarray(prompt_lens, np.int32),
        task_ids=np.asarray(task_ids, np.int32),
        task_names=task_names,
        stats=stats,
        examples=tuple(kept),
        max_len=max_len,
        name=name,
    )


# ----------------------------------------------------------------------------- batching
def check_global_batch(global_batch: int, data_parallel: int = 1, process_count: int = 1, grad_accum: int = 1) -> int:
    """Validate the batch layout and return this host's rows per micro-batch."""
    if global_batch <= 0:
        raise MoeLoraError(f"global batch {global_batch} must be positive")
    if global_batch % grad_accum:
        raise MoeLoraError(f"global batch {global_batch} is not divisible by grad_accum={grad_accum}: change one of them")
    micro = global_batch // grad_accum
    if micro % data_parallel:
        raise MoeLoraError(
            f"micro-batch {micro} (global batch {global_batch} / grad_accum {grad_accum}) is not divisible by "
            f"mesh data x fsdp = {data_parallel}: use a global batch that is a multiple of {data_parallel * grad_accum}"
        )
    if global_batch % process_count:
        raise MoeLoraError(
            f"global batch {global_batch} is not divisible by the process count {process_count}: "
            f"every host needs an equal share; use a multiple of {process_count}"
        )
    if (global_batch // process_count) % grad_accum:
        raise MoeLoraError(
            f"each host's {global_batch // process_count} rows do not split into grad_accum={grad_accum} micro-batches: "
            f"use a global batch that is a multiple of {process_count * grad_accum}"
        )
    return global_batch // process_count


def pad_rows(
    split: TokenizedSplit, indices: Sequence[int], length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-padded arrays for `indices` (-1 = an empty row with all masks zero)."""
    n = len(indices)
    input_ids = np.full((n, length), pad_id, np.int32)
    attention = np.zeros((n, length), np.int32)
    loss = np.zeros((n, length), np.int32)
    prompt = np.zeros((n, length), np.int32)
    task = np.zeros((n,), np.int32)
    for row, i in enumerate(indices):
        if i < 0:
            continue
        t = split.tokens[i]
        input_ids[row, : len(t)] = t
        attention[row, : len(t)] = 1
        loss[row, split.prompt_lens[i] : len(t)] = 1
        prompt[row, : min(split.prompt_lens[i], len(t))] = 1
        task[row] = split.task_ids[i]
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss, "prompt_mask": prompt, "task_id": task}


def padded_length(longest: int, max_len: int, pad_multiple: int) -> int:
    return int(min(max_len, -(-longest // pad_multiple) * pad_multiple))


class BatchIterator:
    """Endless, resumable iterator over this host's share of shuffled, length-bucketed global batches."""

    def __init__(
        self,
        split: TokenizedSplit,
        global_batch: int,
        *,
        seed: int,
        pad_id: int,
        batching: str = "bucket",
        pad_multiple: int = 32,
        bucket_window: int = 16,
        process_index: int = 0,
        process_count: int = 1,
        data_parallel: int = 1,
        grad_accum: int = 1,
    ) -> None:
        if batching not in ("bucket", "fixed"):
            raise MoeLoraError(f"unknown batching {batching!r}: use bucket or fixed")
        if not 0 <= process_index < process_count:
            raise MoeLoraError(f"process_index={process_index} is outside 0..{process_count - 1}")
        self.local_batch = check_global_batch(global_batch, data_parallel, process_count, grad_accum)
        self.steps_per_epoch = len(split) // global_batch
        if self.steps_per_epoch == 0:
            raise MoeLoraError(
                f"{split.name} has {len(split)} examples, fewer than one global batch of {global_batch}: "
                "lower loop.global_batch or add data"
            )
        self.split, self.global_batch, self.seed, self.pad_id = split, global_batch, int(seed), int(pad_id)
        self.batching, self.pad_multiple, self.bucket_window = batching, pad_multiple, bucket_window
        self.process_index, self.process_count = process_index, process_count
        self._lengths = split.lengths
        self.epoch, self.step_in_epoch = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list[np.ndarray] = []

    # -- plan
    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches (arrays of example indices) of `epoch`; a pure function of (seed, epoch)."""
        if self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        used = self.steps_per_epoch * self.global_batch
        perm = rng.permutation(len(self.split))[:used]
        if self.batching == "bucket":
            window = self.bucket_window * self.global_batch
            batches = []
            for start in range(0, used, window):
                chunk = perm[start : start + window]
                chunk = chunk[np.argsort(-self._lengths[chunk], kind="stable")]
                batches.extend(np.split(chunk, len(chunk) // self.global_batch))
            order = rng.permutation(len(batches))
            plan = [batches[j] for j in order]
        else:
            plan = np.split(perm, self.steps_per_epoch)
        self._plan_epoch, self._plan = epoch, plan
        return plan

    def batch_length(self, global_indices: np.ndarray) -> int:
        if self.batching == "fixed":
            return self.split.max_len
        return padded_length(int(self._lengths[global_indices].max()), self.split.max_len, self.pad_multiple)

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        global_indices = self.epoch_plan(self.epoch)[self.step_in_epoch]
        lo = self.process_index * self.local_batch
        batch = pad_rows(self.split, global_indices[lo : lo + self.local_batch], self.batch_length(global_indices), self.pad_id)
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return batch

    # -- position
    def state(self) -> dict[str, Any]:
        """Small JSON-serialisable position; `restore` of it continues with the same next batch."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_examples": len(self.split),
            "global_batch": self.global_batch,
            "batching": self.batching,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        expected = self.state()
        for key in ("seed", "num_examples", "global_batch", "batching"):
            if key in state and state[key] != expected[key]:
                raise MoeLoraError(
                    f"data state was saved with {key}={state[key]!r} but this run has {key}={expected[key]!r}: "
                    "resume with the same data and batch settings, or start a new run"
                )
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise MoeLoraError(f"data state epoch={epoch}, step_in_epoch={step} is outside this data ({self.steps_per_epoch} steps per epoch)")
        self.epoch, self.step_in_epoch = epoch, step


def eval_batches(
    split: TokenizedSplit,
    global_batch: int,
    pad_id: int,
    *,
    pad_multiple: int = 32,
    process_index: int = 0,
    process_count: int = 1,
    limit: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over every example (length-sorted, last batch filled with empty rows).

    Each batch also has `example_index` int32 [b]: the row's index in `split`, -1 for filler.
    `limit > 0` stops after that many batches.
    """
    local = check_global_batch(global_batch, 1, process_count)
    order = np.argsort(-split.lengths, kind="stable")
    n_batches = -(-len(order) // global_batch)
    if limit > 0:
        n_batches = min(n_batches, limit)
    for b in range(n_batches):
        idx = order[b * global_batch : (b + 1) * global_batch]
        idx = np.concatenate([idx, -np.ones(global_batch - len(idx), idx.dtype)])
        length = padded_length(int(split.lengths[idx[idx >= 0]].max()), split.max_len, pad_multiple)
        mine = idx[process_index * local : (process_index + 1) * local]
        batch = pad_rows(split, mine, length, pad_id)
        batch["example_index"] = mine.astype(np.int32)
        yield batch


# ----------------------------------------------------------------------------- one call for the train loop
@dataclass(frozen=True)
class TrainData:
    train: BatchIterator
    validation: TokenizedSplit | None
    test: TokenizedSplit | None
    task_names: tuple[str, ...]


def make_train_data(
    data: Any,
    tokenizer: Any,
    global_batch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    data_parallel: int = 1,
    grad_accum: int = 1,
) -> TrainData:
    """Build everything the train loop needs from a `DataSection` (moe_lora_jax.train.config)."""
    bundled = data.train is None
    sources = {
        "train": data.train,
        "validation": data.validation if (data.validation is not None or not bundled) else None,
        "test": data.test if (data.test is not None or not bundled) else None,
    }
    kwargs = dict(bundled_seed=data.bundled_seed, bundled_size=data.bundled_size,
                  bundled_tasks=getattr(data, "bundled_tasks", None))
    records = {"train": load_records(sources["train"], "train", **kwargs)}
    for split in ("validation", "test"):
        if sources[split] is not None or bundled:
            records[split] = load_records(sources[split], split, **kwargs)
    tasks = build_task_table(*records.values(), task_field=data.task_field)
    splits = {
        name: tokenize_split(
            rows, tokenizer, data.template, data.max_len, tasks, task_field=data.task_field, truncation=data.truncation, name=name
        )
        for name, rows in records.items()
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = BatchIterator(
        splits["train"],
        global_batch,
        seed=data.seed,
        pad_id=pad_id,
        batching=data.batching,
        pad_multiple=data.pad_multiple,
        bucket_window=data.bucket_window,
        process_index=process_index,
        process_count=process_count,
        data_parallel=data_parallel,
        grad_accum=grad_accum,
    )
    return TrainData(train=train, validation=splits.get("validation"), test=splits.get("test"), task_names=tasks)

