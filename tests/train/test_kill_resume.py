"""`moe-lora train` killed with SIGKILL at several moments, rerun each time, ends with the same
adapter.safetensors, byte for byte, as a run that was never interrupted.

The moments are reached deterministically: the child runs the real command line under a
driver that sends itself SIGKILL at one point of the run (named by KILL_AT), so no timing
race decides where the kill lands. 6 steps, a checkpoint every 2. The killed chain shares a
persistent XLA compilation cache (a rerun then skips compiling; the executable is the same).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import subprocess_testlib as sp
from conftest import tiny_overrides

DRIVER = '''
import os, signal, sys
from pathlib import Path

where, _, arg = os.environ.get("KILL_AT", "").partition(":")


def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if where == "after_metrics":  # mid-run, between checkpoints: right after step N's metrics row
    from moe_lora_jax.train import metrics
    write = metrics.MetricsWriter.write

    def patched(self, step, values):
        write(self, step, values)
        if step == int(arg) and "loss" in values:
            self._file.flush()
            die()

    metrics.MetricsWriter.write = patched
elif where == "checkpoint_commit":  # step N's checkpoint written to its temporary directory, not yet committed
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def patched(self, *a, **k):
        if Path(str(self._final_path)).name == arg:
            die()
        return await finalize(self, *a, **k)

    atomicity.AtomicRenameTemporaryPath.finalize = patched
elif where == "adapter_write":  # the final adapter's tensors written into its temporary directory
    import safetensors.numpy
    save_file = safetensors.numpy.save_file

    def patched(*a, **k):
        save_file(*a, **k)
        die()

    safetensors.numpy.save_file = patched

from moe_lora_jax.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow  # five processes of `moe-lora train`, four of them one after another
def test_sigkill_at_several_moments_then_resume_gives_the_same_adapter_bytes(tiny_model_dir, tmp_path):  # noqa: F811
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    (tmp_path / "run.yaml").write_text("{}\n")

    def args(out):
        sets = tiny_overrides(tiny_model_dir, out, "loop.eval_every=3", "adapter.method=lora", "adapter.target_modules=[q, v]",
                              "loop.global_batch=2", "data.max_len=48")
        return ["train", "--config", str(tmp_path / "run.yaml"), *[x for s in sets for x in ("--set", s)], "--no-progress"]

    def cache(name):
        return dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / name), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    reference = sp.start(driver, tmp_path / "reference.log", *args(ref_out), **cache("ref-cache"))  # alongside the others
    try:
        logs = []
        for i, kill_at in enumerate(["after_metrics:3", "checkpoint_commit:4", "adapter_write", ""]):
            log = tmp_path / f"killed{i}.log"
            proc, _ = started = sp.start(driver, log, *args(out), KILL_AT=kill_at, **cache("cache"))
            try:
                proc.wait(timeout=300)
            finally:
                sp.stop(started)
            logs.append(log.read_text())
            expected = -signal.SIGKILL if kill_at else 0
            assert proc.returncode == expected, (kill_at, logs[-1][-3000:])
            ckpts = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
            if kill_at == "after_metrics:3":  # step 3 ran, its checkpoint (4) never started
                assert ckpts == [2] and not (out / "adapter").exists()
            elif kill_at == "checkpoint_commit:4":  # checkpoint 4 written but not committed: 2 is the latest
                assert ckpts == [2] and any("4" in p.name for p in (out / "checkpoints").iterdir() if not p.name.isdigit())
            elif kill_at == "adapter_write":  # every checkpoint is there; the adapter directory is not
                assert ckpts == [2, 4, 6] and not (out / "adapter").exists()
        ref_log = Path(reference[1])
        reference[0].wait(timeout=300)
        assert reference[0].returncode == 0, ref_log.read_text()[-3000:]
    finally:
        sp.stop(reference)
    want = (ref_out / "adapter" / "adapter.safetensors").read_bytes()
    got = (out / "adapter" / "adapter.safetensors").read_bytes()
    assert len(want) > 1000 and got == want
    # without a progress bar the validation lines still print, as plain lines
    ref_text = ref_log.read_text()
    assert "step 3: validation loss" in ref_text and "step 6: validation loss" in ref_text, ref_text[-2000:]
    # each rerun resumed from the last committed checkpoint: 2 (step 3 ran again), 2 again, then 6 (no step ran)
    assert "step 3: validation loss" in logs[1] and "step 6: validation loss" in logs[2]
    assert "validation loss" not in logs[3]
