"""A bundled multi-task instruction set, generated from a seed, scorable by exact match.

Six task families with different formats and short answers, small enough that a
135M model learns them in minutes on a CPU, and different enough that routers
have something to specialise on:

    arithmetic       "What is 47 + 18?"                                   -> "65"
    sort             "Sort these numbers in ascending order." / "7, 2, 9" -> "2, 7, 9"
    reverse          "Reverse the letters of this word." / "planet"       -> "tenalp"
    unit_conversion  "Convert 7 km to m."                                 -> "7000"
    date             "What date is 5 days after 2021-02-26?"              -> "2021-03-03"
    word_count       "How many words are in this text?" / "red fox ran"  -> "3"

Every example has the fields instruction, input (possibly empty), output, task.
The same seed gives byte-identical files; (instruction, input) pairs are unique
across the three splits, so the test split measures generalisation, not recall.

Other task lists (`tasks=`; the train config's data.bundled_tasks) draw from every family,
including those outside the default six:

    capital          "Name the capital of each country." / "Japan, Peru"  -> "Tokyo, Lima"

KIND_TASKS = (capital, reverse, arithmetic) are three families that differ in kind: a
knowledge lookup, a string manipulation and arithmetic (for routing specialisation studies).
The default list's examples do not depend on the families added to the table.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import random
from pathlib import Path
from typing import Callable

from moe_lora_jax.atomic import atomic_dir
from moe_lora_jax.errors import MoeLoraError

TASKS = ("arithmetic", "sort", "reverse", "unit_conversion", "date", "word_count")
KIND_TASKS = ("capital", "reverse", "arithmetic")
SPLITS = ("train", "validation", "test")
DEFAULT_SIZE = 10_000
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

_WORDS = (
    "apple river stone cloud green quick lamp tiger music paper orange window silver candle forest "
    "planet garden rocket yellow bridge honey winter summer pencil coffee butter dragon marble castle "
    "violet mirror jacket saddle button rabbit harbor meadow falcon pepper copper shadow velvet anchor "
    "basket cactus dolphin engine feather glacier island jungle kettle lemon magnet needle ocean parrot "
    "quartz ribbon sunset tunnel umbrella valley walnut zebra"
).split()
_MONTHS = (
    "January February March April May June July August September October November December"
).split()

# (from-unit, to-unit, factor): every answer is an integer.
_CONVERSIONS = (
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("cm", "mm", 10),
    ("kg", "g", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
    ("liters", "milliliters", 1000),
    ("dozen", "items", 12),
)

_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Australia", "Canberra"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Cuba", "Havana"),
    ("Colombia", "Bogota"), ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Brazil", "Brasilia"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Indonesia", "Jakarta"),
    ("South Korea", "Seoul"),
)


def _capital(rng: random.Random) -> tuple[str, str, str]:
    pairs = rng.sample(_CAPITALS, rng.randint(1, 3))
    instruction = rng.choice(("Name the capital of each country.", "Give the capital city of each country.",
                              "What are the capitals of these countries?"))
    return instruction, ", ".join(c for c, _ in pairs), ", ".join(cap for _, cap in pairs)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        value = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b
    phrasing = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate: {a} {op} {b}"))
    return phrasing.format(a=a, op=op, b=b), "", str(value)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    values = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    descending = rng.random() < 0.3
    order = "descending" if descending else "ascending"
    instruction = rng.choice(
        (f"Sort these numbers in {order} order.", f"Arrange the list in {order} order.", f"Put the numbers in {order} order.")
    )
    return instruction, ", ".join(map(str, values)), ", ".join(map(str, sorted(values, reverse=descending)))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        word = rng.choice(_WORDS)
    else:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
    instruction = rng.choice(("Reverse the letters of this word.", "Write this word backwards.", "Spell the word in reverse."))
    return instruction, word, word[::-1]


def _unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    src, dst, factor = rng.choice(_CONVERSIONS)
    amount = rng.randint(1, 99)
    phrasing = rng.choice(("Convert {n} {src} to {dst}.", "How many {dst} are in {n} {src}?", "{n} {src} is how many {dst}?"))
    return phrasing.format(n=amount, src=src, dst=dst), "", str(amount * factor)


def _date(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.6:
        start = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 365 * 30))
        days = rng.randint(1, 9)
        after = rng.random() < 0.7
        answer = start + datetime.timedelta(days=days if after else -days)
        word = "after" if after else "before"
        return f"What date is {days} day{'s' * (days > 1)} {word} {start.isoformat()}?", "", answer.isoformat()
    month = rng.randrange(12)
    shift = rng.randint(1, 11)
    return f"Which month comes {shift} month{'s' * (shift > 1)} after {_MONTHS[month]}?", "", _MONTHS[(month + shift) % 12]


def _word_count(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 9))]
    instruction = rng.choice(("How many words are in this text?", "Count the words.", "Give the number of words in the text."))
    return instruction, " ".join(words), str(len(words))


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic,
    "sort": _sort,
    "reverse": _reverse,
    "unit_conversion": _unit_conversion,
    "date": _date,
    "word_count": _word_count,
    "capital": _capital,
}


def check_tasks(tasks: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The task list to generate (None: TASKS), refusing unknown or repeated names."""
    if tasks is None:
        return TASKS
    tasks = tuple(str(t) for t in tasks)
    unknown = [t for t in tasks if t not in _GENERATORS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise MoeLoraError(
            f"bundled tasks {list(tasks)}: name each at most once, some of {', '.join(_GENERATORS)} "
            f"(default: {', '.join(TASKS)}; KIND_TASKS: {', '.join(KIND_TASKS)})"
        )
    return tasks


@functools.lru_cache(maxsize=8)
def _generate(seed: int, size: int, tasks: tuple[str, ...] = TASKS) -> dict[str, tuple[dict[str, str], ...]]:
    if size < 30:
        raise MoeLoraError(f"bundled data size {size} is too small: use at least 30 examples (default {DEFAULT_SIZE})")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    examples: list[dict[str, str]] = []
    attempts = 0
    while len(examples) < size:
        attempts += 1
        if attempts > 50 * size:  # pragma: no cover - the task space is far larger than any sensible size
            raise MoeLoraError(f"could not generate {size} distinct examples: use a smaller size")
        task = tasks[len(examples) % len(tasks)]  # balanced families
        instruction, inp, out = _GENERATORS[task](rng)
        if (instruction, inp) in seen:
            continue
        seen.add((instruction, inp))
        examples.append({"instruction": instruction, "input": inp, "output": out, "task": task})
    rng.shuffle(examples)
    n_train = int(round(size * SPLIT_FRACTIONS[0]))
    n_val = int(round(size * SPLIT_FRACTIONS[1]))
    return {
        "train": tuple(examples[:n_train]),
        "validation": tuple(examples[n_train : n_train + n_val]),
        "test": tuple(examples[n_train + n_val :]),
    }


def load_bundled(split: str = "train", seed: int = 0, size: int = DEFAULT_SIZE,
                 tasks: tuple[str, ...] | list[str] | None = None) -> list[dict[str, str]]:
    """One split of the bundled set, generated in memory (copies; callers may mutate them).
    tasks: the families to draw from in turn (None: TASKS)."""
    if split not in SPLITS:
        raise MoeLoraError(f"unknown bundled split {split!r}: use one of {', '.join(SPLITS)}")
    return [dict(e) for e in _generate(int(seed), int(size), check_tasks(tasks))[split]]


def to_jsonl(examples: list[dict[str, str]]) -> str:
    return "".join(json.dumps(e, sort_keys=True, ensure_ascii=True) + "\n" for e in examples)


def write_bundled(out_dir: str | os.PathLike, seed: int = 0, size: int = DEFAULT_SIZE) -> dict[str, Path]:
    """Write train.jsonl, validation.jsonl, test.jsonl into the new directory `out_dir`.

    Refuses a non-empty `out_dir` (nothing is overwritten); the directory appears
    only once all three files are complete.
    """

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            (tmp / f"{split}.jsonl").write_text(to_jsonl(load_bundled(split, seed, size)))
        (tmp / "README.txt").write_text(
            f"Bundled multi-task instruction set (moe_lora_jax.data.bundled), seed={seed}, size={size}.\n"
            f"Tasks: {', '.join(TASKS)}. Fields: instruction, input, output, task. Score by exact match of output.\n"
        )
    return {split: out / f"{split}.jsonl" for split in SPLITS}


def exact_match(prediction: str, reference: str) -> bool:
    """The bundled set's metric: equal after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()
