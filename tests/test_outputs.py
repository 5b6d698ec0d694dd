"""What the commands write: never over an existing output, atomically, with the user's umask, without
leftovers; and what a run directory guarantees: one run at a time, a final adapter that belongs to the
run that just ended, resume messages, metrics without replayed rows, refusals that write nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from subprocess_testlib import start, stop
from conftest import TINY, tiny_config

from moe_lora_jax.cli import build_parser, main
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.train.loop import build_run, train

PRECIOUS = "precious\n"


def snapshot(root) -> dict[str, tuple]:
    """Every entry under `root`: (kind, mode, size, mtime, sha256) for files; (kind, mode) for directories."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_dir():
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _modes(umask: int) -> tuple[int, int]:
    return 0o777 & ~umask, 0o666 & ~umask


# ----------------------------------------------------------------------------- never overwritten
def _precious_file(tmp_path):
    target = tmp_path / "x.json"
    target.write_text(PRECIOUS)
    return target


def _precious_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text(PRECIOUS)
    return target


def _data(tmp_path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    return str(path)


def _train_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 0\n")
    return str(path)


def _study_yaml(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(f"base: {{model: {{path: {tmp_path / 'nomodel'}}}}}\nseeds: [0]\narms: [{{name: a}}]\n")
    return str(path)


def _other_study_dir(tmp_path):
    """The directory of a finished study that is not the one the command names."""
    target = _precious_dir(tmp_path)
    (target / "study.json").write_text(json.dumps({"hash": "0" * 64}))
    (target / "results.json").write_text(PRECIOUS)
    return target


# name -> (make the existing output, argv given the tmp dir and that output). The model path never exists:
# each command must refuse its output before it loads anything.
WRITERS = {
    "train": (_precious_dir, lambda t, o: ["train", "--config", _train_yaml(t), "--output-dir", str(o),
                                           "--set", f"model.path={t / 'nomodel'}", "--no-progress"]),
    "quickstart": (_precious_dir, lambda t, o: ["quickstart", "--output-dir", str(o), "--set", f"model.path={t / 'nomodel'}",
                                                "--no-progress"]),
    "convert": (_precious_dir, lambda t, o: ["convert", "--model", str(t / "nomodel"), "--out", str(o)]),
    "analyze": (_precious_file, lambda t, o: ["analyze", "--model", str(t / "nomodel"), "--json", str(o)]),
    "analyze --plot": (lambda t: _precious_file(t).rename(t / "x.png"),
                       lambda t, o: ["analyze", "--model", str(t / "nomodel"), "--json", str(t / "new.json"), "--plot", str(o)]),
    "allocate": (_precious_file, lambda t, o: ["allocate", "--model", str(t / "nomodel"), "--method", "uniform", "--total", "4",
                                               "--json", str(o)]),
    "allocate --plot": (lambda t: _precious_file(t).rename(t / "x.png"),
                        lambda t, o: ["allocate", "--model", str(t / "nomodel"), "--method", "uniform", "--total", "4",
                                      "--json", str(t / "new.json"), "--plot", str(o)]),
    "eval": (_precious_file, lambda t, o: ["eval", "--model", str(t / "nomodel"), "--data", _data(t),
                                           "--json", str(o), "--no-progress"]),
    # `--data d.jsonl --json d.jsonl` must not destroy the data set
    "eval --json DATA": (lambda t: t / _data(t),
                         lambda t, o: ["eval", "--model", str(t / "nomodel"), "--data", str(o), "--json", str(o), "--no-progress"]),
    "sweep": (_precious_dir, lambda t, o: ["sweep", "--study", _study_yaml(t), "--out", str(o)]),
    "sweep --out OTHER_STUDY": (_other_study_dir, lambda t, o: ["sweep", "--study", _study_yaml(t), "--out", str(o)]),
    "routing": (_precious_dir, lambda t, o: ["routing", "--adapter", str(t / "noadapter"), "--model", str(t / "nomodel"),
                                             "--out", str(o), "--no-progress"]),
    "plan": (_precious_file, lambda t, o: ["plan", "--model", str(t / "nomodel"), "--topology", "v5p-8", "--json", str(o)]),
    # generate --json is a flag (print JSON lines), not a file: a path after it is an unknown argument
    "generate --json": (_precious_file, lambda t, o: ["generate", "--model", str(t / "nomodel"), "--prompt", "hi", "--json", str(o)]),
}
PRINT_ONLY = {"info"}  # commands that write no file


def test_every_command_that_writes_a_file_is_checked():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    checked = {name.split()[0] for name in WRITERS}
    assert commands - PRINT_ONLY == checked, "add the new command's outputs to WRITERS"


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_an_existing_output_is_refused_before_any_work_and_left_untouched(name, tmp_path, capsys):
    make, argv = WRITERS[name]
    target = make(tmp_path)
    args = argv(tmp_path, target)
    before = snapshot(tmp_path)
    if name == "generate --json":
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    else:
        t0 = time.perf_counter()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(target) in err, err
        assert re.search(r"already exists|is not empty", err), err
        assert time.perf_counter() - t0 < 15  # refused up front, not after loading or training (measured: < 0.2 s)
    assert snapshot(tmp_path) == before  # the output untouched, nothing else written (no config.yaml, .lock, partial)


def test_train_refuses_a_file_as_its_output_dir(tmp_path, capsys):
    target = _precious_file(tmp_path)
    assert main(["train", "--config", _train_yaml(tmp_path), "--output-dir", str(target), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == PRECIOUS


def test_writers_refuse_an_output_that_appears_meanwhile(tmp_path):
    from moe_lora_jax.atomic import atomic_file, write_json_atomic

    path = tmp_path / "late.json"
    with pytest.raises(MoeLoraError, match="already exists"):
        with atomic_file(path) as tmp:
            tmp.write_text("new")
            path.write_text(PRECIOUS)  # another process wins the race
    assert path.read_text() == PRECIOUS and os.listdir(tmp_path) == ["late.json"]
    write_json_atomic(tmp_path / "j.json", {"a": 1})
    with pytest.raises(MoeLoraError, match="already exists"):
        write_json_atomic(tmp_path / "j.json", {"a": 2})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": 1}


# ----------------------------------------------------------------------------- modes and leftovers
def test_outputs_are_created_with_the_umask(tmp_path):
    from safetensors.numpy import save_file

    from moe_lora_jax.atomic import atomic_dir, atomic_file, atomic_write_text, write_json_atomic
    from moe_lora_jax.train.config import load_config, save_resolved

    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "adapter") as tmp:
            save_file({"w": np.zeros(3, np.float32)}, str(tmp / "adapter.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        atomic_write_text(tmp_path / "t.txt", "t")
        with atomic_file(tmp_path / "p.png") as tmp:
            tmp.write_bytes(b"png")
        save_resolved(load_config(None, []), tmp_path / "run")
    finally:
        os.umask(old)
    dir_mode, file_mode = _modes(0o027)
    modes = {k: v[1] for k, v in snapshot(tmp_path).items()}
    assert modes == {"a.json": file_mode, "adapter": dir_mode, "adapter/adapter.safetensors": file_mode,
                     "adapter/sub": dir_mode, "p.png": file_mode, "run": dir_mode, "run/config.yaml": file_mode,
                     "t.txt": file_mode}


def test_convert_cleans_the_partial_directory_a_killed_convert_left(hf_llama_factory, tmp_path):
    hf_dir, _ = hf_llama_factory()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    host = socket.gethostname()
    killed = tmp_path / f".out.partial-{host}-{int(dead.stdout)}-k1ll3d"  # what a convert killed mid-write leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 4096)
    foreign = tmp_path / ".out.partial-otherhost-1-abcdef"  # another host's: it may still be writing, leave it
    foreign.mkdir()
    old = os.umask(0o022)
    try:
        assert main(["convert", "--model", str(hf_dir), "--out", str(tmp_path / "out"), "--to", "hf"]) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, hf_dir.name, "out"]
    dir_mode, file_mode = _modes(0o022)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {file_mode}


# ----------------------------------------------------------------------------- the run lock
HOLD_LOCK = """import sys, time
from moe_lora_jax.atomic import run_lock
with run_lock(sys.argv[1], "train run"):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    script = tmp_path / "hold.py"
    script.write_text(HOLD_LOCK)
    holder = start(script, tmp_path / "hold.log", str(out))
    try:
        deadline = time.time() + 60
        while "held" not in (tmp_path / "hold.log").read_text():
            assert holder[0].poll() is None and time.time() < deadline, (tmp_path / "hold.log").read_text()
            time.sleep(0.1)
        model = tmp_path / "config_only"  # the config is checked before the lock: a valid one, but no weights
        model.mkdir()
        (model / "config.json").write_text(json.dumps(TINY.to_hf()))
        argv = ["train", "--config", _train_yaml(tmp_path), "--output-dir", str(out), "--set", f"model.path={model}"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by another train run (pid {holder[0].pid} on {socket.gethostname()}" in err, err
        assert os.listdir(out) == [".lock"]  # the refused run wrote nothing
    finally:
        stop(holder)  # SIGKILL: a crash, which leaves its .lock file behind
    assert (out / ".lock").read_text().startswith(f"pid {holder[0].pid} ")
    from moe_lora_jax.atomic import run_lock

    with run_lock(out):  # the OS dropped the dead holder's flock: its leftover file does not block
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    assert not (out / ".lock").exists()


# ----------------------------------------------------------------------------- stale results, resume
@pytest.fixture(scope="module")
def finished3(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A finished 3-step MoLA run (checkpoints at 2 and 3, adapter/ and loss.png written)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(tiny_model_dir, out, "loop.steps=3"), progress=False)
    return out


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def test_extending_a_run_replaces_its_adapter_and_logs_each_step_once(finished3, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from moe_lora_jax.adapters import load_adapter

    run = tmp_path / "run"
    shutil.copytree(finished3, run)
    _, step3 = load_adapter(run / "adapter")
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:  # a run killed after logging steps 4 and 5, before their checkpoint
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n" + '{"step": 5, "lo')
    capsys.readouterr()
    # loss weights, dropout and jitter are not the adapter's identity: the run resumes with new values, logged
    config = tiny_config(tiny_model_dir, run, "loop.steps=5", "objective.z_loss_coef=0.001", "objective.switch_coef=0",
                         "adapter.dropout=0.1")
    built = build_run(config, progress=False)  # shared by both calls below: the rerun needs no new model or data
    result = train(config, progress=False, run=built)
    printed = capsys.readouterr().out
    assert f"resumed from step 3 ({run / 'checkpoints' / '3'})" in printed
    for line in ("objective.z_loss_coef 0.0 -> 0.001", "objective.switch_coef 0.001 -> 0.0", "adapter.dropout 0.0 -> 0.1"):
        assert f"resume: {line} (resume continues)" in printed, printed
    assert [h["step"] for h in result.history] == [4, 5]
    for row in result.history:  # the steps after the resume train with the new weights
        assert "switch_aux" not in row and np.isfinite(row["z_loss"]) and row["z_loss"] > 0
    assert "dropped 2 row(s) after step 3" in printed
    _, step5 = load_adapter(run / "adapter")
    final = _flat(result.state.adapter)
    assert _flat(step5).keys() == final.keys()
    for key, value in _flat(step5).items():
        np.testing.assert_array_equal(value, final[key])  # the step-5 state, exactly
    assert max(float(np.max(np.abs(a - _flat(step3)[k]))) for k, a in _flat(step5).items()) > 1e-4
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5] and 99.0 not in [r.get("loss") for r in rows]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 3, 5]
    dir_mode, file_mode = _modes(_current_umask())
    assert {stat.S_IMODE(p.stat().st_mode) for p in (run / "adapter").iterdir()} == {file_mode}
    assert stat.S_IMODE((run / "adapter").stat().st_mode) == dir_mode

    # killed after the adapter write, before the plot: the rerun says it is finished and plots
    (run / "loss.png").unlink()
    rows_before = metrics.read_bytes()
    again = train(config, progress=False, run=built)
    printed = capsys.readouterr().out
    assert f"already finished at step 5 (loop.steps=5): nothing to train" in printed
    assert again.step == 5 and again.history == [] and metrics.read_bytes() == rows_before
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in run.iterdir() if ".partial-" in p.name or p.name == ".lock") == []
    from moe_lora_jax.train.checkpoint import CheckpointStore

    store = CheckpointStore(run / "checkpoints", async_save=False)
    meta = store.check(5)  # the new weights are recorded with the checkpoint
    store.close()
    assert meta["objective"]["z_loss_coef"] == 0.001 and meta["adapter_config"]["dropout"] == 0.1


def _current_umask() -> int:
    from moe_lora_jax.atomic import current_umask

    return current_umask()


@pytest.mark.parametrize("override, field", [
    ("adapter.rank=2", "adapter.rank 4 -> 2"),
    ("adapter.method=lora", "adapter.method mola -> lora"),
])
def test_a_refused_resume_names_the_field_and_writes_nothing(finished3, tiny_model_dir, override, field):  # noqa: F811
    before = snapshot(finished3)
    with pytest.raises(MoeLoraError, match=re.escape(field) + ".*nothing was written"):
        train(tiny_config(tiny_model_dir, finished3, override, "loop.steps=5"), progress=False)
    assert snapshot(finished3) == before  # no config-1.yaml, no metrics rows, same adapter


def test_an_adapter_without_its_checkpoint_is_refused_up_front(finished3, tiny_model_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(finished3, run)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    with pytest.raises(MoeLoraError, match="adapter holds a final adapter but .* has no checkpoint"):
        train(tiny_config(tiny_model_dir, run, "adapter.method=lora"), progress=False)
    assert snapshot(run) == before


def test_a_checkpoint_missing_its_manifest_is_one_line(finished3, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    from moe_lora_jax.train.checkpoint import CheckpointStore

    run = tmp_path / "run"
    shutil.copytree(finished3, run)
    (run / "checkpoints" / "3" / "state" / "manifest.ocdbt").unlink()
    closed = []
    close = CheckpointStore.close
    monkeypatch.setattr(CheckpointStore, "close", lambda self: (closed.append(self.directory), close(self)))
    before = snapshot(run)
    with pytest.raises(MoeLoraError) as error:
        train(tiny_config(tiny_model_dir, run, "loop.steps=3", "checkpoint.async_save=true"), progress=False)
    assert str(error.value) == (f"checkpoint {run / 'checkpoints' / '3'} is damaged (state/manifest.ocdbt is missing): "
                                "delete that step directory to resume from an earlier one")
    # the store (orbax's async threads) is closed before the error surfaces: left open, its threads printed
    # "RuntimeError: Event loop is closed" tracebacks at exit after the one-line error
    assert closed == [run / "checkpoints"]
    assert snapshot(run) == before
