"""Rows read from JSON and JSON-lines files exactly as written, remembering where each came from.

    rows = read_json_records(Path("train.jsonl"))     # Records: a list of dicts
    rows[3]["output"]                                  # "007" stays the string "007"
    row_label(rows, 3)                                 # "train.jsonl line 5" (blank lines are skipped)

JSON files are parsed with the standard library, one object per line (or one list of
objects per .json file), so every value keeps its JSON type: a quoted "007", "1e3",
"true" or "null" is a string, and a value of the wrong type can be refused with the
line it is on. (Reading them through `datasets` lets pandas convert a whole column
when one row holds a non-string value.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from moe_lora_jax.errors import MoeLoraError


class Records(list):
    """A list of row dicts that also knows its file and the line of each row (for error messages)."""

    def __init__(self, rows: Iterable[dict] = (), source: str | None = None, lines: Sequence[int] | None = None) -> None:
        super().__init__(rows)
        self.source = source
        self.lines = None if lines is None else tuple(lines)

    def derived(self, rows: Sequence[dict]) -> "Records":
        """`rows` (the first len(rows) of these rows, transformed) with this provenance."""
        lines = None if self.lines is None else self.lines[: len(rows)]
        return Records(rows, self.source, lines)


def row_label(records: Sequence[Any], index: int) -> str:
    """'FILE line N' for rows read from a JSON-lines file, 'FILE row i' for other files, else 'row i'."""
    source = getattr(records, "source", None)
    lines = getattr(records, "lines", None)
    if source is None:
        return f"row {index}"
    if lines is not None and index < len(lines):
        return f"{source} line {lines[index]}"
    return f"{source} row {index}"


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _json_lines(path: Path, data: bytes, first_line: int = 1) -> Records:
    rows, lines = [], []
    for n, raw in enumerate(data.splitlines(), start=first_line):
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise MoeLoraError(f"{path} line {n} is not valid UTF-8 (byte {e.start + 1}): save the file as UTF-8") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise MoeLoraError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}): fix that line") from None
        if not isinstance(row, dict):
            raise MoeLoraError(f"{path} line {n} is a JSON {_kind(row)}, not an object: write one {{...}} object per line")
        rows.append(row)
        lines.append(n)
    return Records(rows, str(path), lines)


def read_json_records(path: Path) -> Records:
    """Rows of a .jsonl file (one object per line) or a .json file (a list of objects, or JSON lines)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MoeLoraError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from None
    if not data.strip():
        raise MoeLoraError(f"{path} is empty: it holds no rows; add examples, one JSON object per line")
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            whole = None  # _json_lines names the line
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": several values, i.e. JSON lines in a .json file
                raise MoeLoraError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): fix the file") from None
            whole = None
        if isinstance(whole, list):
            for i, row in enumerate(whole):
                if not isinstance(row, dict):
                    raise MoeLoraError(f"{path} row {i} is a JSON {_kind(row)}, not an object: the file must be a list of objects")
            rows = Records(whole, str(path))
        elif isinstance(whole, dict):
            rows = Records([whole], str(path), [1])
        elif whole is not None:
            raise MoeLoraError(f"{path} holds a JSON {_kind(whole)}, not rows: write a list of objects or one object per line")
        else:
            rows = _json_lines(path, data)
    else:
        rows = _json_lines(path, data)
    if not rows:
        raise MoeLoraError(f"{path} is empty: it holds no rows; add examples, one JSON object per line")
    return rows
