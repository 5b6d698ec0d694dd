"""The bundled generator's task lists: the default six unchanged, other lists deterministic, KIND_TASKS' families."""

from __future__ import annotations

import hashlib

import pytest

from moe_lora_jax.data import bundled, load_records
from moe_lora_jax.errors import MoeLoraError


def _digest(tasks=None, size=300) -> str:
    text = "".join(bundled.to_jsonl(bundled.load_bundled(s, size=size, tasks=tasks)) for s in bundled.SPLITS)
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_default_six_tasks_are_unchanged_by_the_added_families():
    # recorded before the capital family and task lists existed
    assert _digest() == "6045457a7a99ad0cc16df4c0ac819cd04633506c9322c0ae85bf1cbe8bd1158d"
    assert _digest(bundled.TASKS) == _digest()


def test_kind_tasks_are_balanced_deterministic_and_correct():
    train = bundled.load_bundled("train", size=300, tasks=bundled.KIND_TASKS)
    assert train == bundled.load_bundled("train", size=300, tasks=list(bundled.KIND_TASKS))
    every = [e for s in bundled.SPLITS for e in bundled.load_bundled(s, size=300, tasks=bundled.KIND_TASKS)]
    assert {t: sum(e["task"] == t for e in every) for t in bundled.KIND_TASKS} == {"capital": 100, "reverse": 100, "arithmetic": 100}
    capitals = dict(bundled._CAPITALS)
    for e in (e for e in train if e["task"] == "capital"):
        assert e["output"] == ", ".join(capitals[c] for c in e["input"].split(", "))
    ex = next(e for e in train if e["task"] == "capital")
    assert ex["instruction"] in ("Name the capital of each country.", "Give the capital city of each country.",
                                 "What are the capitals of these countries?")
    assert load_records(None, "validation", bundled_size=300, bundled_tasks=bundled.KIND_TASKS) == \
        bundled.load_bundled("validation", size=300, tasks=bundled.KIND_TASKS)


@pytest.mark.parametrize("tasks", [["capital", "trivia"], [], ["reverse", "reverse"]])
def test_unknown_or_repeated_task_names_are_refused(tasks):
    with pytest.raises(MoeLoraError, match=r"bundled tasks .* name each at most once, some of arithmetic, sort"):
        bundled.load_bundled("train", size=300, tasks=tasks)
