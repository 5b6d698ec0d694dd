"""Evaluation: exact match of greedy generations, multiple choice by log-likelihood, and perplexity.

    result = exact_match_eval(model, {"params": base, "adapter": adapter}, tokenizer, records, "chat")
    result["accuracy"], result["per_task"]["arithmetic"], result["examples"][0]

    records = load_eval_records("arc.jsonl", "test", parse_columns("label=answerKey,task=subject"))
    mc = multiple_choice_eval(model, variables, tokenizer, records, prompt_format="Question: {question}\nAnswer:")
    mc["accuracy"], mc["accuracy_norm"], mc["per_task"]

    ppl = perplexity_eval(model, variables, tokenizer, [{"text": "..."}])["perplexity"]

Exact match: prompts are built exactly as in training (`moe_lora_jax.data.prompt_ids`),
left-padded to a multiple of `pad_multiple` so batches of similar length reuse compiled
code, and decoded greedily with the KV cache until an end-of-sequence token.

Multiple choice (ARC, BoolQ, PIQA, OpenBookQA style): each option's score is the sum of
the log-probabilities of its tokens (the delimiter, " " by default, then the option text)
given the prompt; the prediction is the best-scoring option. `accuracy_norm` divides each
score by the option's length in characters, as lm-evaluation-harness's acc_norm does.

Perplexity: exp of the mean negative log-likelihood per predicted token over the whole
set (token-weighted). Rows with `text` score every token after the first; instruction rows
(instruction/input/output) score the response tokens given the prompt, as training does.

Records come from the bundled set, a .json/.jsonl/.parquet file, or any Hugging Face
dataset (`name` or `name:config`), renamed by a column mapping onto the fields used here.
Every result has a per-task breakdown keyed by the records' `task` field.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moe_lora_jax.data import load_records
from moe_lora_jax.data.bundled import exact_match
from moe_lora_jax.data.records import Records, row_label
from moe_lora_jax.data.templates import check_text_fields, prompt_ids, render_many
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.infer.generate import generate


def stop_ids(tokenizer: Any, template: str, eos_token_ids: Sequence[int] = ()) -> tuple[int, ...]:
    """Token ids that end a completion: the model's EOS ids, the tokenizer's, and the chat end-of-turn marker."""
    ids = set(int(i) for i in eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if template == "chat":
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end != tokenizer.unk_token_id:
            ids.add(end)
    return tuple(sorted(ids))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, pad_multiple: int,
             max_width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[B, L] ids and mask with every row right-aligned; L rounded up to `pad_multiple`, at most `max_width`."""
    width = -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple
    if max_width is not None:
        width = max(min(width, max_width), max(len(r) for r in rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def exact_match_eval(
    model: Any,
    variables: Mapping[str, Any],
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    template: str,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    pad_multiple: int = 32,
    task_field: str = "task",
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy completions of `records` scored by exact match against their `output` field."""
    if not records:
        raise MoeLoraError("no examples to evaluate: give at least one record with instruction and output")
    check_text_fields(records)  # every row, named by file and line, before any decoding
    config = model.config
    stops = stop_ids(tokenizer, template, config.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)
    prompts = [prompt_ids(r, template, tokenizer) for r in records]
    order = np.argsort([-len(p) for p in prompts], kind="stable")  # similar lengths share a batch
    completions: list[str] = [""] * len(records)
    bar = tqdm(total=len(records), desc="exact match", unit="ex", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [prompts[i] for i in idx]
        rows += [rows[-1]] * (batch_size - len(rows))  # fixed batch shape: one compilation per prompt width
        ids, mask = left_pad(rows, pad_id, pad_multiple)
        out = np.asarray(
            generate(model, variables, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=max_new_tokens,
                     eos_token_ids=stops, pad_token_id=pad_id)
        )
        for row, i in enumerate(idx):
            tokens = [int(t) for t in out[row]]
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            completions[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    hits = [exact_match(c, str(r["output"])) for c, r in zip(completions, records)]
    per_task: dict[str, list[bool]] = {}
    for hit, r in zip(hits, records):
        per_task.setdefault(str(r.get(task_field, "default")), []).append(hit)
    return {
        "accuracy": float(np.mean(hits)),
        "n": len(hits),
        "per_task": {t: float(np.mean(v)) for t, v in sorted(per_task.items())},
        "per_task_n": {t: len(v) for t, v in sorted(per_task.items())},
        "examples": [
            {"prompt": r.get("instruction"), "input": r.get("input"), "reference": r["output"], "completion": c, "match": h}
            for r, c, h in zip(records, completions, hits)
        ],
    }


# ----------------------------------------------------------------------------- records and column mappings
def parse_columns(spec: str | None) -> dict[str, str]:
    """"question=goal,choices=sol1|sol2,label=label" -> {"question": "goal", ...}.

    A value names a column; "a|b" gathers several columns into a list (PIQA's sol1, sol2);
    "[no|yes]" is a literal list (BoolQ's fixed options).
    """
    if not spec:
        return {}
    out: dict[str, str] = {}
    for item in spec.split(","):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise MoeLoraError(f"--columns item {item!r} is not FIELD=COLUMN: write e.g. question=goal,label=answerKey")
        out[field.strip()] = column.strip()
    return out


def _mapped_value(row: Mapping[str, Any], source: str, index: int | str) -> Any:
    if source.startswith("[") and source.endswith("]"):
        return [s.strip() for s in source[1:-1].split("|")]
    names = source.split("|")
    missing = [n for n in names if n not in row]
    if missing:
        raise MoeLoraError(
            f"{index if isinstance(index, str) else f'row {index}'} has no column {missing[0]!r} (columns: {', '.join(map(str, row)) or 'none'}): fix --columns"
        )
    return [row[n] for n in names] if len(names) > 1 else row[names[0]]


def apply_columns(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> list[dict[str, Any]]:
    """Rows with each mapped field set from its column(s); other columns are kept as they are."""
    return [{**row, **{f: _mapped_value(row, src, row_label(rows, i)) for f, src in columns.items()}} for i, row in enumerate(rows)]


def _load_hub_config(name: str, config: str, split: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, config, split=split).to_list()
    except Exception as e:  # noqa: BLE001 - no network, unknown name, unknown config
        raise MoeLoraError(
            f"could not load the hub dataset {name!r} (config {config!r}) split {split!r} ({type(e).__name__}): "
            "pass a local .json/.jsonl/.parquet file, or run where the hub is reachable"
        ) from None


def load_eval_records(
    source: str | None, split: str = "test", columns: Mapping[str, str] | None = None, *, limit: int | None = None
) -> list[dict[str, Any]]:
    """Records of `split` from the bundled set (None or "bundled"), a file or directory, or a hub dataset
    ("name" or "name:config"), renamed by `columns` and cut to the first `limit`."""
    if source in (None, "bundled"):
        rows = load_records(None, split)
    elif ":" in source and not Path(source).expanduser().exists() and "://" not in source:
        name, config = source.split(":", 1)
        rows = _load_hub_config(name, config, split)
    else:
        rows = load_records(source, split, setting="--data")
    if limit is not None:
        if limit < 1:
            raise MoeLoraError(f"limit={limit}: evaluate at least 1 example")
    kept = rows[:limit] if limit is not None else rows
    if isinstance(rows, Records):
        kept = rows.derived(kept)
    mapped = apply_columns(kept, columns or {})
    return rows.derived(mapped) if isinstance(rows, Records) else mapped  # keeps file and line numbers for errors


def _per_task(values: Sequence[Any], records: Sequence[Mapping[str, Any]], task_field: str) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for v, r in zip(values, records):
        task = r.get(task_field)
        groups.setdefault("default" if task is None else str(task), []).append(v)
    return dict(sorted(groups.items()))


# ----------------------------------------------------------------------------- log-likelihood scoring
@functools.partial(jax.jit, static_argnames=("model",))
def _score_batch(model, variables, ids_BxL, mask_BxL, target_BxL, prompt_BxL):
    """Per row: (sum of log p(token) over target positions, whether every target token is the argmax).

    Rows are right-padded, so default positions 0..L-1 are right; MiLoRA pools over `prompt_BxL`.
    """
    logits_BxLxV = model.apply(variables, ids_BxL, mask_BxL, prompt_mask_BxL=prompt_BxL)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1], axis=-1)  # position t predicts token t+1
    next_BxL = ids_BxL[:, 1:]
    token_logp_BxL = jnp.take_along_axis(logp_BxLxV, next_BxL[..., None], axis=-1)[..., 0]
    target_BxL = target_BxL[:, 1:].astype(bool)
    total_B = jnp.sum(jnp.where(target_BxL, token_logp_BxL, 0.0), axis=1)
    greedy_B = jnp.all(~target_BxL | (jnp.argmax(logp_BxLxV, axis=-1) == next_BxL), axis=1)
    return total_B, greedy_B


def score_sequences(
    model: Any,
    variables: Mapping[str, Any],
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    pad_multiple: int = 32,
    pad_id: int = 0,
    desc: str = "scoring",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """For each (prompt ids, target ids): (log p(target | prompt) summed over tokens, target is the greedy path).

    The prompt must hold at least one token. Rows are sorted by length and right-padded to a
    multiple of `pad_multiple` in batches of fixed size, so few shapes compile.
    """
    limit = model.config.max_position_embeddings
    lengths = [len(p) + len(t) for p, t in rows]
    order = np.argsort([-n for n in lengths], kind="stable")
    logp, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    bar = tqdm(total=len(rows), desc=desc, unit="seq", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = list(order[start : start + batch_size])
        width = min(-(-lengths[idx[0]] // pad_multiple) * pad_multiple, limit)
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask, target, prompt = (np.zeros((batch_size, width), np.int32) for _ in range(3))
        for row, i in enumerate(idx):
            p, t = rows[i]
            ids[row, : len(p) + len(t)] = list(p) + list(t)
            mask[row, : len(p) + len(t)] = 1
            prompt[row, : len(p)] = 1
            target[row, len(p) : len(p) + len(t)] = 1
        total, is_greedy = _score_batch(model, variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(target),
                                        jnp.asarray(prompt))
        logp[idx], greedy[idx] = np.asarray(total)[: len(idx)], np.asarray(is_greedy)[: len(idx)]
        bar.update(len(idx))
    bar.close()
    return logp, greedy


def _pad_id(tokenizer: Any, config: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)


# ----------------------------------------------------------------------------- multiple choice
def _choices_and_labels(value: Any, index: int) -> tuple[list[str], list[str] | None]:
    """Option texts, and their own labels when the dataset gives them (ARC: {"text": [...], "label": [...]})."""
    if isinstance(value, Mapping):
        if "text" not in value:
            raise MoeLoraError(f"row {index}: choices is a mapping without 'text' ({', '.join(value)}): map choices to a list column")
        labels = value.get("label")
        return [str(c) for c in value["text"]], None if labels is None else [str(lab) for lab in labels]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise MoeLoraError(f"row {index}: choices is {type(value).__name__}, not a list of options: fix --columns")
    return [str(c) for c in value], None


def _label_index(label: Any, choices: Sequence[str], choice_labels: Sequence[str] | None, index: int) -> int:
    """The gold option's index from an int, a bool (BoolQ: [no, yes]), a choice label ("B"), a digit or the option text."""
    if isinstance(label, (bool, np.bool_)):
        k = int(label)
    elif isinstance(label, (int, np.integer)):
        k = int(label)
    else:
        text = str(label).strip()
        if choice_labels is not None and text in choice_labels:
            k = choice_labels.index(text)
        elif text.lstrip("-").isdigit():
            k = int(text)
        elif len(text) == 1 and text.isalpha():
            k = ord(text.upper()) - ord("A")
        elif text in choices:
            k = list(choices).index(text)
        else:
            raise MoeLoraError(f"row {index}: label {label!r} is neither an index, a letter nor one of the options")
    if not 0 <= k < len(choices):
        raise MoeLoraError(f"row {index}: label {label!r} is out of range for {len(choices)} options")
    return k


def mc_prompt(record: Mapping[str, Any], prompt_format: str | None = None) -> str:
    """The text the options continue: `prompt_format` filled from the record, else context + newline + question."""
    question, context = str(record.get("question", "")), record.get("context")
    if prompt_format is not None:
        fields = {**{k: v for k, v in record.items() if isinstance(k, str)}, "question": question, "context": context or ""}
        try:
            return prompt_format.format(**fields)
        except (KeyError, IndexError) as e:
            raise MoeLoraError(f"prompt format {prompt_format!r} names a field the records lack: {e}") from None
    return f"{context}\n{question}" if context else question


def multiple_choice_eval(
    model: Any,
    variables: Mapping[str, Any],
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    prompt_format: str | None = None,
    delimiter: str = " ",
    batch_size: int = 16,
    pad_multiple: int = 32,
    task_field: str = "task",
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of picking the option with the highest log-likelihood (and length-normalised accuracy).

    Records need `question`, `choices` (a list, or {"text": [...], "label": [...]}) and `label`
    (index, bool, choice label, letter or option text); `context` is optional.
    """
    if not records:
        raise MoeLoraError("no examples to evaluate: give at least one record with question, choices and label")
    limit = model.config.max_position_embeddings
    rows, owner, options, golds = [], [], [], []
    for i, r in enumerate(records):
        for field in ("question", "choices", "label"):
            if r.get(field) is None:
                raise MoeLoraError(f"{row_label(records, i)} lacks {field!r} (fields: {', '.join(map(str, r))}): map it with --columns")
        choices, labels = _choices_and_labels(r["choices"], i)
        if not choices:
            raise MoeLoraError(f"row {i} has no options: every question needs at least one choice")
        golds.append(_label_index(r["label"], choices, labels, i))
        prompt = tokenizer(mc_prompt(r, prompt_format))["input_ids"]
        if not prompt:
            raise MoeLoraError(f"row {i}: the prompt is empty: give it a question")
        conts = [delimiter + c for c in choices]
        for cont in conts:
            target = tokenizer(cont, add_special_tokens=False)["input_ids"]
            if len(prompt) + len(target) > limit:
                raise MoeLoraError(
                    f"row {i}: prompt and option take {len(prompt) + len(target)} tokens, more than the model's "
                    f"context of {limit}: shorten the question"
                )
            rows.append((prompt, target))
        owner.append(len(options))
        options.append(conts)
    logp, _ = score_sequences(model, variables, rows, batch_size=batch_size, pad_multiple=pad_multiple,
                              pad_id=_pad_id(tokenizer, model.config), desc="multiple choice", progress=progress)
    examples, start = [], 0
    for r, conts, gold in zip(records, options, golds):
        scores = logp[start : start + len(conts)]
        start += len(conts)
        norm = scores / np.asarray([max(len(c), 1) for c in conts])
        pred, pred_norm = int(np.argmax(scores)), int(np.argmax(norm))
        examples.append({"question": r["question"], "choices": [c[len(delimiter):] for c in conts], "label": gold,
                         "scores": [float(s) for s in scores], "pred": pred, "pred_norm": pred_norm,
                         "correct": pred == gold, "correct_norm": pred_norm == gold})
    hits = [e["correct"] for e in examples]
    hits_norm = [e["correct_norm"] for e in examples]
    tasks, tasks_norm = _per_task(hits, records, task_field), _per_task(hits_norm, records, task_field)
    return {
        "accuracy": float(np.mean(hits)),
        "accuracy_norm": float(np.mean(hits_norm)),
        "n": len(hits),
        "per_task": {t: float(np.mean(v)) for t, v in tasks.items()},
        "per_task_norm": {t: float(np.mean(v)) for t, v in tasks_norm.items()},
        "per_task_n": {t: len(v) for t, v in tasks.items()},
        "examples": examples,
    }


# ----------------------------------------------------------------------------- perplexity
def _perplexity_rows(tokenizer: Any, records: Sequence[Mapping[str, Any]], template: str, limit: int):
    """(prompt ids, target ids) per record, cut to `limit` tokens, and how many records were cut."""
    rows, cut = [], 0
    for i, r in enumerate(records):
        if r.get("text") is not None:
            if not isinstance(r["text"], str):  # no str(): a list or object is not a text
                raise MoeLoraError(f"{row_label(records, i)} has a {type(r['text']).__name__} in 'text', not a string: map a text column with --columns")
            ids = list(tokenizer(r["text"])["input_ids"])
            if len(ids) < 2:
                raise MoeLoraError(f"row {i}: the text has {len(ids)} token(s): perplexity needs at least 2")
            prompt, target = ids[:1], ids[1:]
        else:
            try:
                (prompt,), (target,) = render_many([r], template, tokenizer)
            except MoeLoraError as e:
                raise MoeLoraError(f"{row_label(records, i)} has no 'text' and is no instruction record ({e}): map text with --columns") from None
        if len(prompt) >= limit:
            raise MoeLoraError(f"row {i}: the prompt alone has {len(prompt)} tokens, the model's context is {limit}")
        if len(prompt) + len(target) > limit:
            target, cut = target[: limit - len(prompt)], cut + 1
        rows.append((prompt, target))
    return rows, cut


def perplexity_eval(
    model: Any,
    variables: Mapping[str, Any],
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    template: str = "alpaca",
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    pad_multiple: int = 64,
    task_field: str = "task",
    progress: bool = False,
) -> dict[str, Any]:
    """Token-weighted perplexity exp(sum NLL / tokens) of `text` rows or of instruction rows' responses."""
    if not records:
        raise MoeLoraError("no examples to evaluate: give at least one record with text (or instruction and output)")
    limit = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
    rows, cut = _perplexity_rows(tokenizer, records, template, limit)
    logp, _ = score_sequences(model, variables, rows, batch_size=batch_size, pad_multiple=pad_multiple,
                              pad_id=_pad_id(tokenizer, model.config), desc="perplexity", progress=progress)
    counts = [len(t) for _, t in rows]
    nll = _per_task(list(zip(-logp, counts)), records, task_field)

    def ppl(pairs: Sequence[tuple[float, int]]) -> float:
        return float(np.exp(sum(p for p, _ in pairs) / sum(n for _, n in pairs)))

    return {
        "perplexity": ppl(list(zip(-logp, counts))),
        "nll_per_token": float(-logp.sum() / sum(counts)),
        "tokens": int(sum(counts)),
        "n": len(rows),
        "truncated": cut,
        "per_task": {t: ppl(v) for t, v in nll.items()},
        "per_task_n": {t: len(v) for t, v in nll.items()},
    }
