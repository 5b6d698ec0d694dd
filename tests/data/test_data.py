"""Bundled data, templates, loading, truncation, bucketing, sharding across hosts, resumable position."""

from __future__ import annotations

import datetime
import json
import re

import numpy as np
import pytest

from moe_lora_jax.data import bundled
from moe_lora_jax.data.pipeline import (
    BatchIterator,
    build_task_table,
    check_global_batch,
    eval_batches,
    load_records,
    make_train_data,
    tokenize_split,
)
from moe_lora_jax.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, prompt_ids, prompt_text
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.train.config import DataSection


class CharTokenizer:
    """One token per character (id = ord), BOS=1 added to prompts, EOS=2, a two-turn chat template."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = "<u>{user}</u><a>{assistant}</a>"

    def __call__(self, texts, add_special_tokens=True):
        bos = [self.bos_token_id] if add_special_tokens else []
        return {"input_ids": [bos + [ord(c) for c in t] for t in texts]}

    def decode(self, ids):
        return "".join("<eos>" if i == 2 else "<bos>" if i == 1 else chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role'][0]}>{m['content']}</{m['role'][0]}>" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")


class NoChatTokenizer(CharTokenizer):
    chat_template = None


TOK = CharTokenizer()


def rows(n, task_of=lambda i: f"t{i % 3}"):
    return [{"instruction": f"do {i}", "input": "x" * (i % 7), "output": f"ans{i}", "task": task_of(i)} for i in range(n)]


# ----------------------------------------------------------------------------- bundled data
def test_bundled_is_deterministic_and_seeded(tmp_path):
    a = bundled.write_bundled(tmp_path / "a", seed=3, size=600)
    b = bundled.write_bundled(tmp_path / "b", seed=3, size=600)
    c = bundled.write_bundled(tmp_path / "c", seed=4, size=600)
    for split in bundled.SPLITS:
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    train = [json.loads(line) for line in a["train"].read_text().splitlines()]
    assert train == bundled.load_bundled("train", seed=3, size=600)
    with pytest.raises(MoeLoraError, match="already exists and is not empty"):
        bundled.write_bundled(tmp_path / "a", seed=3, size=600)


def test_bundled_default_splits_tasks_and_uniqueness():
    splits = {s: bundled.load_bundled(s) for s in bundled.SPLITS}
    assert [len(splits[s]) for s in bundled.SPLITS] == [8000, 1000, 1000]
    keys = {s: {(e["instruction"], e["input"]) for e in splits[s]} for s in splits}
    assert sum(len(k) for k in keys.values()) == 10000  # unique within and across splits
    counts = {t: sum(e["task"] == t for e in splits["train"]) for t in bundled.TASKS}
    assert len(counts) == 6 and min(counts.values()) > 1200  # balanced families
    for e in splits["train"]:
        assert set(e) == {"instruction", "input", "output", "task"} and len(e["output"]) <= 40


def _check_answer(e):
    ins, inp, out = e["instruction"], e["input"], e["output"]
    task = e["task"]
    if task == "arithmetic":
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", ins).groups()
        return int(out) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    if task == "sort":
        values = [int(x) for x in inp.split(", ")]
        return out == ", ".join(map(str, sorted(values, reverse="descending" in ins)))
    if task == "reverse":
        return out == inp[::-1]
    if task == "unit_conversion":
        n = int(re.search(r"\d+", ins).group())
        factor = next(f for s, d, f in bundled._CONVERSIONS if f" {s} " in f" {ins} ".replace("?", " ").replace(".", " ") and d in ins)
        return int(out) == n * factor
    if task == "date":
        m = re.search(r"(\d) days? (after|before) (\d{4}-\d\d-\d\d)", ins)
        if m:
            days = int(m.group(1)) * (1 if m.group(2) == "after" else -1)
            return out == (datetime.date.fromisoformat(m.group(3)) + datetime.timedelta(days=days)).isoformat()
        shift, month = re.search(r"comes (\d+) months? after (\w+)", ins).groups()
        return out == bundled._MONTHS[(bundled._MONTHS.index(month) + int(shift)) % 12]
    if task == "word_count":
        return int(out) == len(inp.split())
    raise AssertionError(task)


def test_bundled_answers_are_correct():
    examples = bundled.load_bundled("test")
    assert all(_check_answer(e) for e in examples)
    assert bundled.exact_match(" 42\n", "42") and not bundled.exact_match("41", "42")


# ----------------------------------------------------------------------------- templates
def test_alpaca_template_masks_the_prompt():
    data = [{"instruction": "Add", "input": "1 2", "output": "3", "task": "a"}, {"instruction": "Hi", "output": "yo"}]
    split = tokenize_split(data, TOK, "alpaca", max_len=512)
    assert split.task_names == ("a", "default")
    batch = next(BatchIterator(split, 2, seed=0, pad_id=0, batching="fixed", pad_multiple=8))
    for row, example, text in zip(range(2), data, (ALPACA_WITH_INPUT, ALPACA_NO_INPUT)):
        ids = batch["input_ids"][row]
        expected_prompt = text.format(instruction=example["instruction"], input=example.get("input", ""))
        assert TOK.decode(ids[batch["loss_mask"][row] == 1]) == example["output"] + "<eos>"
        n = int(batch["attention_mask"][row].sum())
        assert TOK.decode(ids[:n]) == "<bos>" + expected_prompt + example["output"] + "<eos>"
        # the training prompt is exactly what generation starts from
        assert list(ids[: split.prompt_lens[row]]) == prompt_ids(example, "alpaca", TOK)
    # the row with the longer text is the one whose attention mask is longer
    assert batch["input_ids"].shape == (2, 512)


def test_chat_template_masks_the_prompt():
    data = [{"instruction": "Add", "input": "1 2", "output": "3"}]
    split = tokenize_split(data, TOK, "chat", max_len=64)
    assert prompt_text(data[0], "chat", TOK) == "<u>Add\n\n1 2</u><a>"
    tokens, plen = split.tokens[0], split.prompt_lens[0]
    assert TOK.decode(tokens[:plen]) == "<u>Add\n\n1 2</u><a>"
    assert TOK.decode(tokens[plen:]) == "3</a>"  # the end-of-turn marker carries loss too
    with pytest.raises(MoeLoraError, match="no chat template: set data.template=alpaca"):
        tokenize_split(data, NoChatTokenizer(), "chat", max_len=64)


def test_missing_fields_name_row_and_field():
    data = rows(3)
    del data[2]["output"]
    with pytest.raises(MoeLoraError, match=r"train: row 2 lacks the field 'output' \(fields present: instruction, input, task\)"):
        tokenize_split(data, TOK, "alpaca", max_len=512, name="train")
    with pytest.raises(MoeLoraError, match="unknown template 'vicuna'"):
        tokenize_split(rows(2), TOK, "vicuna", max_len=512)


def test_truncation_is_counted_and_reported():
    data = [{"instruction": "i", "output": "o" * n} for n in (1, 10, 30)]
    plen = len(prompt_ids(data[0], "chat", TOK))  # "<u>i</u><a>" = 11
    assert plen == 11
    # full lengths: prompt 11 + response n + 4 ("</a>") = 16, 25, 45
    split = tokenize_split(data, TOK, "chat", max_len=20, truncation="right")
    assert len(split) == 3 and split.stats.truncated == 2 and split.stats.tokens_cut == (25 - 20) + (45 - 20)
    assert split.stats.dropped == 0 and split.lengths.tolist() == [16, 20, 20]
    assert "3/3 examples kept, 2 truncated (30 tokens cut), 0 dropped" in split.stats.summary()
    dropped = tokenize_split(data, TOK, "chat", max_len=20, truncation="drop")
    assert len(dropped) == 1 and dropped.stats.dropped == 2 and dropped.examples[0]["output"] == "o"
    # a prompt that fills max_len leaves nothing to learn: dropped even under `right`
    assert tokenize_split(data, TOK, "chat", max_len=12).stats.dropped == 0
    with pytest.raises(MoeLoraError, match="nothing left after filtering: all 3 examples"):
        tokenize_split(data, TOK, "chat", max_len=11)


# ----------------------------------------------------------------------------- loading files
def test_load_json_jsonl_parquet_and_directories(tmp_path):
    data = rows(5)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "d.json").write_text(json.dumps(data))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(data), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        assert load_records(str(tmp_path / name)) == data
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "validation.jsonl").write_text((tmp_path / "d.jsonl").read_text())
    assert load_records(tmp_path / "dir", "validation") == data
    with pytest.raises(MoeLoraError, match="has no train.jsonl"):
        load_records(tmp_path / "dir", "train")
    with pytest.raises(MoeLoraError, match="data file .*nope.jsonl does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(MoeLoraError, match=r"bad.jsonl line 2 is not valid JSON \(Expecting property name"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(MoeLoraError, match="not .json, .jsonl or .parquet"):
        load_records(tmp_path / "d.csv")
    assert len(load_records(None, "validation", bundled_size=100)) == 10


# ----------------------------------------------------------------------------- batching
@pytest.fixture(scope="module")
def split():
    data = rows(103)
    return tokenize_split(data, TOK, "chat", max_len=64, task_names=build_task_table(data))


def test_batches_shapes_padding_and_bucketing(split):
    it = BatchIterator(split, 8, seed=1, pad_id=0, pad_multiple=4, bucket_window=4)
    assert it.steps_per_epoch == 12  # 103 // 8, remainder dropped
    seen = []
    for _ in range(12):
        b = next(it)
        n_tokens = b["attention_mask"].sum(1)
        L = b["input_ids"].shape[1]
        assert L % 4 == 0 and L - 4 < n_tokens.max() <= L
        assert b["input_ids"].dtype == np.int32 and b["task_id"].shape == (8,)
        assert np.all(b["input_ids"][b["attention_mask"] == 0] == 0)
        assert np.all(b["loss_mask"] <= b["attention_mask"])
        seen.append(b)
    assert it.state()["epoch"] == 1 and it.state()["step_in_epoch"] == 0
    plan = np.concatenate(it.epoch_plan(0))
    assert len(plan) == 96 and len(set(plan.tolist())) == 96  # each example at most once per epoch
    # task ids are the task names of the rows
    row0 = split.examples[int(it.epoch_plan(0)[0][0])]
    assert split.task_names[seen[0]["task_id"][0]] == row0["task"]
    # bucketing pads less than padding every batch to max_len
    bucketed = sum(b["input_ids"].size for b in seen)
    assert bucketed < 12 * 8 * 64


def test_shuffle_is_seeded_and_epoch_dependent(split):
    a = BatchIterator(split, 8, seed=1, pad_id=0)
    b = BatchIterator(split, 8, seed=1, pad_id=0)
    c = BatchIterator(split, 8, seed=2, pad_id=0)
    assert all(np.array_equal(x, y) for x, y in zip(a.epoch_plan(0), b.epoch_plan(0)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.epoch_plan(0), c.epoch_plan(0)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.epoch_plan(0), a.epoch_plan(1)))


def test_hosts_take_disjoint_shares_of_the_same_global_batch(split):
    whole = BatchIterator(split, 8, seed=5, pad_id=0)
    hosts = [BatchIterator(split, 8, seed=5, pad_id=0, process_index=p, process_count=4) for p in range(4)]
    for _ in range(14):  # crosses the epoch boundary
        full = next(whole)
        parts = [next(h) for h in hosts]
        assert all(p["input_ids"].shape == (2, full["input_ids"].shape[1]) for p in parts)
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_state_restores_exactly(split):
    it = BatchIterator(split, 8, seed=7, pad_id=0)
    for _ in range(10):
        next(it)
    state = json.loads(json.dumps(it.state()))  # serialisable
    expected = [next(it) for _ in range(5)]  # crosses into epoch 1
    fresh = BatchIterator(split, 8, seed=7, pad_id=0, process_index=1, process_count=2)
    fresh.restore(state)  # onto a different host count: same global order
    for e in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["input_ids"], e["input_ids"][4:])
    assert fresh.state()["epoch"] == 1 and fresh.state()["step_in_epoch"] == 3
    with pytest.raises(MoeLoraError, match="saved with seed=7 but this run has seed=8"):
        BatchIterator(split, 8, seed=8, pad_id=0).restore(state)
    with pytest.raises(MoeLoraError, match="outside this data"):
        BatchIterator(split, 8, seed=7, pad_id=0).restore({**state, "step_in_epoch": 12})


def test_batch_layout_errors(split):
    assert check_global_batch(32, data_parallel=8, process_count=4) == 8
    with pytest.raises(MoeLoraError, match="not divisible by mesh data x fsdp = 3"):
        check_global_batch(32, data_parallel=3)
    with pytest.raises(MoeLoraError, match="not divisible by the process count 3"):
        check_global_batch(32, process_count=3)
    with pytest.raises(MoeLoraError, match="micro-batch 8 .* not divisible by mesh data x fsdp = 16"):
        check_global_batch(32, data_parallel=16, grad_accum=4)
    with pytest.raises(MoeLoraError, match="fewer than one global batch of 128"):
        BatchIterator(split, 128, seed=0, pad_id=0)


def test_eval_batches_cover_every_example_once(split):
    got = []
    for b in eval_batches(split, 16, pad_id=0, pad_multiple=8):
        idx = b["example_index"]
        assert b["input_ids"].shape[0] == 16
        assert np.all(b["attention_mask"][idx < 0] == 0)
        got.extend(idx[idx >= 0].tolist())
    assert sorted(got) == list(range(len(split)))
    halves = [list(eval_batches(split, 16, 0, process_index=p, process_count=2)) for p in range(2)]
    assert len(halves[0]) == 7 and all(b["input_ids"].shape[0] == 8 for b in halves[1])


def test_make_train_data_bundled_and_files(tmp_path):
    section = DataSection(template="chat", max_len=128, bundled_size=300)
    data = make_train_data(section, TOK, 16, process_index=0, process_count=2, data_parallel=2)
    assert data.task_names == tuple(sorted(bundled.TASKS))
    assert len(data.train.split) + data.train.split.stats.dropped == 240
    assert len(data.validation) == 30 and len(data.test) == 30
    assert next(data.train)["input_ids"].shape[0] == 8
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(40)))
    files = make_train_data(DataSection(train=str(tmp_path / "t.jsonl"), template="chat", max_len=64), TOK, 8)
    assert files.validation is None and files.test is None and files.task_names == ("t0", "t1", "t2")
    with pytest.raises(MoeLoraError, match="not divisible by mesh data x fsdp = 3"):
        make_train_data(DataSection(train=str(tmp_path / "t.jsonl"), template="chat", max_len=64), TOK, 8, data_parallel=3)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from moe_lora_jax.embedded import default_model_path
    from moe_lora_jax.tokenizer import load_tokenizer

    try:
        return load_tokenizer(default_model_path())
    except MoeLoraError as e:  # pragma: no cover - the embedded model is a test requirement
        pytest.skip(str(e))


def test_real_tokenizer_chat_and_alpaca(smollm_tokenizer):
    tok = smollm_tokenizer
    data = bundled.load_bundled("validation", size=300)[:8]
    for template, end in (("chat", "<|im_end|>\n"), ("alpaca", tok.eos_token)):
        split = tokenize_split(data, tok, template, max_len=256)
        for i, example in enumerate(data):
            ids = split.tokens[i]
            assert list(ids[: split.prompt_lens[i]]) == prompt_ids(example, template, tok)
            assert tok.decode(ids[split.prompt_lens[i] :]) == example["output"] + end
