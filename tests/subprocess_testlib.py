"""Running test scripts in fresh Python processes (multi-device and multi-process checks).

XLA_FLAGS and jax.distributed must be set before JAX starts, so these checks cannot run
in the pytest process. Output goes to a file, not a pipe: a process that prints more
than a pipe holds blocks while the test waits on its sibling, and then both miss the
jax.distributed barrier.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the project's, SLURM's, TPU and XLA settings, on the CPU, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_LORA_", "SLURM_", "XLA_FLAGS", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script_path: Path, log_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start `python script_path args` with `clean_env(**env)`, stdout and stderr to `log_path`."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(script_path), *args], env=clean_env(**env), stdout=log,
                            stderr=subprocess.STDOUT, text=True, cwd=str(REPO))
    log.close()  # the child holds its own descriptor
    return proc, log_path


def finish(started: tuple[subprocess.Popen, Path], timeout: float = 400) -> dict:
    """Wait for a started script (killing it after `timeout`); return the JSON of its `RESULT ` line."""
    proc, log_path = started
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = Path(log_path).read_text()
    assert proc.returncode == 0, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def stop(started: tuple[subprocess.Popen, Path]) -> None:
    """Kill a started script if it still runs."""
    proc, _ = started
    if proc.poll() is None:
        proc.kill()
        proc.wait()
