"""The routing analyses run after each sweep run's evaluation (issue 13 item 2).

`run_analyses` is the one hook the runner calls; its result is stored in the run's
result file and in results.json under the arm's `analyses`. It returns {} until the
routing analyses (moe_lora_jax.analysis) are wired in here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_analyses(run_dir: Path, adapter_config: Any) -> dict[str, Any]:
    """Routing analyses of the finished run in `run_dir` (adapter/ and config.yaml there): name -> result or file.

    `adapter_config`: the run's AdapterConfig (method, allocation), to choose the analyses that apply."""
    return {}
