"""Peak resident memory and seconds of loading a base model sharded over 8 fake CPU devices: streamed vs the old path.

Writes a random float32 LLaMA-shaped checkpoint (config.json + safetensors, two files
and an index; about 1.1 GB by default) tensor by tensor, so the writer never holds the
model, then measures each way of loading it in its own fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and a mesh fsdp=8:

    hf-new      load_llama(dir, shardings=...): each shard read as a slice, placed as read
    hf-old      the loader before streaming: whole tensors from files kept open, onto
                device 0, then placed on the shardings (put_global), as build_run did
    orbax-new   load_llama(orbax_dir, shardings=...): orbax restores each shard in place
    orbax-old   the orbax restore before: every tensor whole on the host, then placed

Each measurement resets the process's peak (VmHWM, via /proc/self/clear_refs) after
JAX and the package are imported and the devices started, so `peak - baseline` is what
the load itself added. A process holding all 8 devices holds every shard, so the bound
the streamed path must keep is: baseline + its own shards + the largest tensor + 0.5 GB.

    python experiments/bench_load.py [--out experiments/results/bench_load.md] [--keep DIR]
    python experiments/bench_load.py measure MODE DIR [--devices 8]   # one measurement (prints RESULT {...})
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# About 1.1 GB in float32: hidden 2048, three layers, vocabulary 32000, untied head.
BENCH_CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=3, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)


def hf_config(**sizes: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32", **sizes}


def write_random_llama(out_dir: str | os.PathLike, sizes: dict, *, files: int = 2, seed: int = 0) -> dict:
    """A random float32 checkpoint in `out_dir`, written one tensor (in 16 MB pieces) at a time.

    Returns {"bytes": total, "largest": bytes of the largest tensor}.
    """
    sys.path.insert(0, str(REPO))
    from moe_lora_jax.config import LlamaConfig
    from moe_lora_jax.convert.names import tensor_specs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(**sizes)
    (out / "config.json").write_text(json.dumps(config))
    specs = tensor_specs(LlamaConfig.from_hf(config))
    groups = [list(g) for g in np.array_split(np.arange(len(specs)), files)]
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        header, offset = {}, 0
        for j in group:
            nbytes = 4 * int(np.prod(specs[j].hf_shape))
            header[specs[j].hf_name] = {"dtype": "F32", "shape": list(specs[j].hf_shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[specs[j].hf_name] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        with open(out / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for j in group:
                left = int(np.prod(specs[j].hf_shape))
                while left:
                    n = min(left, 4 * 2**20)
                    f.write(((rng.random(n, dtype=np.float32) - 0.5) * 0.04).tobytes())
                    left -= n
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sizes_b = [4 * int(np.prod(s.hf_shape)) for s in specs]
    return {"bytes": sum(sizes_b), "largest": max(sizes_b)}


# ----------------------------------------------------------------------------- one measurement (fresh process)
def _status_kb(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1])


def _old_hf_load(path: Path, shardings):
    """The loader as it was: files opened once for the whole load, each tensor read whole, transposed,
    cast, put on the default device; build_run then placed the whole tree (put_global)."""
    import jax
    from safetensors import safe_open

    from moe_lora_jax.config import LlamaConfig
    from moe_lora_jax.convert.load import _weight_files
    from moe_lora_jax.convert.names import set_path, tensor_specs
    from moe_lora_jax.parallel.rules import put_global

    config = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    file_of = _weight_files(path)
    handles, params = {}, {}
    for spec in tensor_specs(config):
        f = handles.get(file_of[spec.hf_name]) or handles.setdefault(file_of[spec.hf_name], safe_open(str(file_of[spec.hf_name]), "numpy"))
        array = f.get_tensor(spec.hf_name)
        assert np.isfinite(array).all()
        array = np.ascontiguousarray(array.T) if spec.transpose else array
        set_path(params, spec.path, jax.device_put(array.astype(np.float32, copy=False)))
    params = put_global(params, shardings)
    del handles
    return params


def _old_orbax_load(path: Path, shardings):
    """The orbax restore as it was: no target, every tensor whole on the host, then jnp arrays, then placed."""
    import warnings

    import jax
    import orbax.checkpoint as ocp

    from moe_lora_jax.parallel.rules import put_global

    with ocp.PyTreeCheckpointer() as checkpointer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = checkpointer.restore(path / "params")
    params = jax.tree.map(jax.numpy.asarray, params)
    return put_global(params, shardings)


def measure(mode: str, path: Path, devices: int) -> dict:
    """Load `path` the `mode` way over a mesh fsdp=`devices`; peak and seconds of the load alone."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    sys.path.insert(0, str(REPO))
    import jax
    import jax.numpy as jnp

    from moe_lora_jax.convert import load_llama, load_llama_config
    from moe_lora_jax.model import LlamaForCausalLM
    from moe_lora_jax.parallel import make_mesh, param_shardings

    config = load_llama_config(path)
    mesh = make_mesh((1, devices, 1))
    shardings = param_shardings(LlamaForCausalLM(config), mesh)["params"]
    jax.block_until_ready([jax.device_put(jnp.ones(8), d) for d in jax.devices()])  # every device started
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on is the load's
    baseline = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if mode in ("hf-new", "orbax-new"):
        _, params = load_llama(path, shardings=shardings)
    elif mode == "hf-old":
        params = _old_hf_load(path, shardings)
    elif mode == "orbax-old":
        params = _old_orbax_load(path, shardings)
    else:
        raise SystemExit(f"unknown mode {mode}")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    leaves = jax.tree.leaves(params)
    return {
        "mode": mode, "seconds": seconds, "baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"),
        "shard_bytes": sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
        "largest": max(x.nbytes for x in leaves), "bytes": sum(x.nbytes for x in leaves),
        "shardings_match": all(x.sharding == s for x, s in zip(leaves, jax.tree.leaves(shardings))),
    }


def run_measure(mode: str, path: Path, devices: int = 8, timeout: float = 900) -> dict:
    """`measure` in a fresh process (CPU only, no inherited XLA/TPU settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "TPU_", "MOE_LORA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, "measure", mode, str(path), "--devices", str(devices)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _convert_to_orbax(hf_dir: Path, out: Path) -> None:
    """The same weights as an orbax base (as `moe-lora convert` writes), in a fresh process."""
    code = ("import sys; from moe_lora_jax.convert import load_hf_llama, save_orbax_llama; "
            "c, p = load_hf_llama(sys.argv[1]); save_orbax_llama(c, p, sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "TPU_", "MOE_LORA_"))}
    subprocess.run([sys.executable, "-c", code, str(hf_dir), str(out)], env={**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
                   check=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        parser = argparse.ArgumentParser()
        parser.add_argument("cmd")
        parser.add_argument("mode")
        parser.add_argument("path", type=Path)
        parser.add_argument("--devices", type=int, default=8)
        a = parser.parse_args()
        print("RESULT " + json.dumps(measure(a.mode, a.path, a.devices)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results (markdown) here")
    parser.add_argument("--keep", default=None, help="write the checkpoints here (default: a temporary directory)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import cpu_name, emit

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        t0 = time.perf_counter()
        info = write_random_llama(root / "hf", BENCH_CONFIG)
        written = time.perf_counter() - t0
        _convert_to_orbax(root / "hf", root / "orbax")
        rows = [run_measure(mode, root / ("hf" if mode.startswith("hf") else "orbax"))
                for mode in ("hf-new", "hf-old", "orbax-new", "orbax-old")]
    gb = 2**30
    bound = info["bytes"] + info["largest"] + 0.5 * gb
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {cpu_name()}, {os.cpu_count()} CPU cores visible; load average {os.getloadavg()[0]:.2f} at the end",
        f"model: random float32 LLaMA {BENCH_CONFIG}; {info['bytes'] / gb:.2f} GiB in two safetensors files "
        f"(written in {written:.0f} s); largest tensor {info['largest'] / 2**20:.0f} MiB",
        "devices: 8 fake CPU devices in one process, mesh fsdp=8 (so this process holds every shard)",
        f"bound for the streamed path: baseline + own shards + largest tensor + 0.5 GiB = baseline + {bound / gb:.2f} GiB",
        "",
        "| mode | load (s) | baseline RSS (GiB) | peak RSS (GiB) | peak - baseline (GiB) | within bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        added = (r["peak_kb"] - r["baseline_kb"]) * 1024
        lines.append(f"| {r['mode']} | {r['seconds']:.1f} | {r['baseline_kb'] * 1024 / gb:.2f} | {r['peak_kb'] * 1024 / gb:.2f} | "
                     f"{added / gb:.2f} | {'yes' if added < bound else 'no'} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
