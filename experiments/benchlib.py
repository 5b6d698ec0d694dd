"""Shared by the benchmark scripts: the machine's description for recorded results."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """The CPU model from lscpu (platform.processor() where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
