"""Shared by the benchmark scripts: command line, alternating timing, the machine's description, output."""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, TypeVar

K = TypeVar("K", bound=Hashable)


def benchmark_parser(doc: str, *, rounds: int, tokens: bool = True) -> argparse.ArgumentParser:
    """--rounds and --out, plus --batch/--length (default 4x256) when the benchmark feeds token ids."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if tokens:
        parser.add_argument("--batch", type=int, default=4)
        parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", default=None, help="write the results (markdown) here")
    return parser


def alternating_times(fns: Mapping[K, Callable[[], Any]], rounds: int, progress: bool = False
                      ) -> tuple[dict[K, list[float]], dict[K, Any]]:
    """Run every fn once per round, in turn, for `rounds` rounds (so drifts of a shared machine hit
    all alike). Returns the seconds of each run and each fn's last result."""
    times: dict[K, list[float]] = {name: [] for name in fns}
    last: dict[K, Any] = {}
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
        if progress:
            print(f"round {r + 1}/{rounds} done", flush=True)
    return times, last


def medians(times: Mapping[K, list[float]]) -> dict[K, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_name() -> str:
    """The CPU model from lscpu (platform.processor() where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def emit(text: str, out: str | None) -> None:
    """Print the result and, with --out, write it there."""
    print(text)
    if out:
        Path(out).write_text(text + "\n")
