"""Base weights streamed into their shards, and sharded orbax restores, on 8 fake CPU devices and on two processes.

- memory: a random ~340 MB float32 checkpoint loaded over fsdp=8 in a fresh process adds at
  most its own shards + the largest tensor + 0.5 GB scaled to the model (0.5 GB per GB);
  the loader before streaming (whole tensors on device 0, then placed) adds more than that.
- exact: the sharded load (HF safetensors and orbax, float32 and bfloat16, meshes (1,8,1)
  and (2,2,2)) equals the unsharded load bit for bit, every array has the requested sharding,
  and each distinct slice a process holds is read once and nothing else is read.
- two processes (jax.distributed, 4 CPU devices each): each reads only the slices of its own
  devices; HF, orbax base and a sharded train-checkpoint restore match the reference.

All run in subprocesses: XLA_FLAGS and jax.distributed must be set before JAX starts.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import textwrap

import numpy as np
import pytest

from subprocess_testlib import REPO, finish, free_port, start

BENCH = REPO / "experiments" / "bench_load.py"
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=256, tie_word_embeddings=False)
# ~340 MB float32: big enough that the old path's extra copies dwarf allocator noise, small enough for CI
MEMORY_SIZES = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                    vocab_size=16000, tie_word_embeddings=False)


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # writes 340 MB and starts two processes: about 40 s on the shared 2-core machine
def test_streamed_load_peak_memory_stays_within_own_shards_plus_one_tensor(tmp_path):
    bench = bench_module()
    info = bench.write_random_llama(tmp_path / "hf", MEMORY_SIZES)
    assert 0.3e9 < info["bytes"] < 0.4e9
    runs = {mode: start(BENCH, tmp_path / f"{mode}.log", "measure", mode, str(tmp_path / "hf"), "--devices", "8")
            for mode in ("hf-new", "hf-old")}
    new, old = (finish(runs[mode]) for mode in ("hf-new", "hf-old"))
    slack = 0.5 * info["bytes"] / 2**30 * 2**30  # 0.5 GB per GB of model
    for r in (new, old):
        assert r["shard_bytes"] == r["bytes"] == info["bytes"] and r["largest"] == info["largest"] and r["shardings_match"]
    bound = new["shard_bytes"] + new["largest"] + slack
    added_new = (new["peak_kb"] - new["baseline_kb"]) * 1024
    added_old = (old["peak_kb"] - old["baseline_kb"]) * 1024
    assert added_new < bound, (added_new, bound)
    assert added_old > bound, (added_old, bound)  # the old path's second copy (and open file maps) break it


# every slice the loader reads, as (tensor name, index), in `reads`
RECORD_READS = """
from moe_lora_jax.convert import load
reads = []
real_read_block = load._read_block
def recording(view, spec, index, dtype, path):
    reads.append((spec.hf_name, str(index)))
    return real_read_block(view, spec, index, dtype, path)
load._read_block = recording
"""


def with_reads_recorded(script: str) -> str:
    return textwrap.dedent(script).replace("# RECORD_READS", RECORD_READS.strip())


SHARDED_VS_WHOLE = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from moe_lora_jax.convert import load, load_llama, save_orbax_llama
from moe_lora_jax.model import LlamaForCausalLM
from moe_lora_jax.parallel import make_mesh, param_shardings

hf_dir, orbax_dir = sys.argv[1], sys.argv[2]
# RECORD_READS

out = {}
config, whole = load_llama(hf_dir)
save_orbax_llama(config, whole, orbax_dir)
for dtype in ("float32", "bfloat16"):
    _, whole = load_llama(hf_dir, param_dtype=dtype)
    for mesh_shape in [(1, 8, 1), (2, 2, 2)]:
        mesh = make_mesh(mesh_shape)
        sh = param_shardings(LlamaForCausalLM(config.replace(param_dtype=dtype)), mesh)["params"]
        for source in (hf_dir, orbax_dir):
            reads.clear()
            _, params = load_llama(source, shardings=sh, param_dtype=dtype)
            leaves, shs, ref = jax.tree.leaves(params), jax.tree.leaves(sh), jax.tree.leaves(whole)
            out[f"{dtype} {mesh_shape} {'orbax' if source == orbax_dir else 'hf'}"] = {
                "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, ref)),
                "dtypes": sorted({str(x.dtype) for x in leaves}),
                "sharding": all(x.sharding == s for x, s in zip(leaves, shs)),
                "sharded_leaves": sum(not x.sharding.is_fully_replicated for x in leaves),
                "reads": len(reads), "distinct_reads": len(set(reads)),
                "distinct_wanted": sum(len({str(i) for i in s.addressable_devices_indices_map(x.shape).values()})
                                       for x, s in zip(leaves, shs)),
            }
print("RESULT " + json.dumps(out))
"""


def test_sharded_load_equals_whole_load_and_has_the_requested_shardings(tmp_path):
    bench_module().write_random_llama(tmp_path / "hf", TINY_SIZES)
    (tmp_path / "script.py").write_text(with_reads_recorded(SHARDED_VS_WHOLE))
    result = finish(start(tmp_path / "script.py", tmp_path / "log", str(tmp_path / "hf"), str(tmp_path / "orbax")))
    assert len(result) == 8
    for case, r in result.items():
        assert r["equal"] and r["sharding"], case
        assert r["dtypes"] == [case.split()[0]], case
        assert r["sharded_leaves"] >= 15, case  # embedding, head and every kernel are split
        if case.endswith("hf"):  # each distinct slice read exactly once, and nothing else
            assert r["reads"] == r["distinct_reads"] == r["distinct_wanted"], case
        else:
            assert r["reads"] == 0, case


TWO_PROCESS_LOAD = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
from moe_lora_jax.parallel import initialize_distributed
initialize_distributed()
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from moe_lora_jax.convert import load, load_llama, load_llama_config
from moe_lora_jax.convert.names import tensor_specs
from moe_lora_jax.model import LlamaForCausalLM
from moe_lora_jax.parallel import make_mesh, param_shardings
from moe_lora_jax.train.checkpoint import CheckpointStore, base_fingerprint
from moe_lora_jax.train.state import TrainState

hf_dir, orbax_dir, ckpt_dir = sys.argv[1], sys.argv[2], sys.argv[3]
# RECORD_READS

config = load_llama_config(hf_dir)
mesh = make_mesh((1, 4, 2))
sh = param_shardings(LlamaForCausalLM(config), mesh)["params"]
reference = {}
for spec in tensor_specs(config):  # the whole file, for checking only
    with safe_open(str(load._weight_files(load.Path(hf_dir))[spec.hf_name]), "numpy") as f:
        t = f.get_tensor(spec.hf_name)
    reference[spec.path] = t.T if spec.transpose else t

def check(params):
    ok, local = True, set()
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        key = tuple(k.key for k in path)
        for s in x.addressable_shards:
            ok &= np.array_equal(np.asarray(s.data), reference[key][s.index])
            local.add((key, str(s.index)))
    return ok, local

_, params = load_llama(hf_dir, shardings=sh)
hf_ok, local = check(params)
by_name = {s.path: s.hf_name for s in tensor_specs(config)}
local_names = {(by_name[k], i) for k, i in local}
_, restored = load_llama(orbax_dir, shardings=sh)
orbax_ok, _ = check(restored)

# a train checkpoint whose adapter is split over both processes' devices
w_sh, rep = NamedSharding(mesh, P(("fsdp", "tensor"), None)), NamedSharding(mesh, P())
W = np.arange(64, dtype=np.float32).reshape(16, 4)
glob = lambda value, s: jax.make_array_from_callback(np.shape(value), s, lambda i: np.asarray(value)[i])
state = TrainState(step=glob(np.int32(3), rep), adapter={"w": glob(W, w_sh)}, opt_state={"mu": glob(2 * W, w_sh)},
                   rng=glob(np.zeros(2, np.uint32), rep), nonfinite_total=glob(np.int32(0), rep), nonfinite_run=glob(np.int32(0), rep))
store = CheckpointStore(ckpt_dir, async_save=False)
store.save(3, state, {"position": 1})
store.wait()
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
back, data_state, _ = store.restore(3, abstract)
store.close()
w, mu = back.adapter["w"], back.opt_state["mu"]
print("RESULT " + json.dumps({
    "pid": jax.process_index(), "devices": jax.device_count(), "local_devices": jax.local_device_count(),
    "hf_ok": bool(hf_ok), "orbax_ok": bool(orbax_ok),
    "reads_are_local": set(reads) == local_names and len(reads) == len(set(reads)), "reads": len(reads),
    "fingerprint": base_fingerprint(params),
    "fully_addressable": any(x.is_fully_addressable for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated),
    "ckpt_ok": w.sharding == w_sh and not w.is_fully_addressable and int(back.step) == 3 and data_state == {"position": 1}
               and all(np.array_equal(np.asarray(s.data), W[s.index]) for s in w.addressable_shards)
               and all(np.array_equal(np.asarray(s.data), 2 * W[s.index]) for s in mu.addressable_shards),
}))
"""


@pytest.mark.slow  # two jax.distributed processes: about 30 s on the shared 2-core machine
def test_two_processes_each_read_only_their_own_shards(tmp_path):
    import jax

    from moe_lora_jax.convert import load_hf_llama, save_orbax_llama
    from moe_lora_jax.train.checkpoint import base_fingerprint

    bench = bench_module()
    bench.write_random_llama(tmp_path / "hf", TINY_SIZES)
    config, params = load_hf_llama(tmp_path / "hf")
    save_orbax_llama(config, jax.device_get(params), tmp_path / "orbax")
    (tmp_path / "two.py").write_text(with_reads_recorded(TWO_PROCESS_LOAD))
    port = free_port()
    args = [str(tmp_path / "hf"), str(tmp_path / "orbax"), str(tmp_path / "ckpt")]
    started = [start(tmp_path / "two.py", tmp_path / f"two_{i}.log", *args, MOE_LORA_COORDINATOR=f"127.0.0.1:{port}",
                     MOE_LORA_NUM_PROCESSES="2", MOE_LORA_PROCESS_ID=str(i)) for i in range(2)]
    results = sorted((finish(s) for s in started), key=lambda r: r["pid"])
    assert [(r["pid"], r["devices"], r["local_devices"]) for r in results] == [(0, 8, 4), (1, 8, 4)]
    for r in results:
        assert r["hf_ok"] and r["orbax_ok"] and r["reads_are_local"] and r["ckpt_ok"], r
        assert not r["fully_addressable"], r  # the split tensors really span both processes
        assert r["fingerprint"] == base_fingerprint(params)  # the run identity reads values held by the other process
    total_slices = results[0]["reads"] + results[1]["reads"]
    assert results[0]["reads"] < total_slices and results[1]["reads"] < total_slices


def test_orbax_restore_refuses_shardings_of_another_tree(tmp_path):
    import jax

    from moe_lora_jax import MoeLoraError
    from moe_lora_jax.convert import load_hf_llama, load_llama, save_orbax_llama

    bench_module().write_random_llama(tmp_path / "hf", TINY_SIZES)
    config, params = load_hf_llama(tmp_path / "hf")
    save_orbax_llama(config, params, tmp_path / "orbax")
    sh = jax.tree.map(lambda x: x.sharding, params)
    _, back = load_llama(tmp_path / "orbax", shardings=sh, param_dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 and x.sharding == s for x, s in zip(jax.tree.leaves(back), jax.tree.leaves(sh)))
    del sh["layers_1"]
    with pytest.raises(MoeLoraError, match="holds another parameter tree than the shardings describe"):
        load_llama(tmp_path / "orbax", shardings=sh)
    for entry in (tmp_path / "orbax" / "params").iterdir():  # a damaged copy: its arrays are gone
        if entry.is_dir():
            shutil.rmtree(entry)
    with pytest.raises(MoeLoraError, match="is not a readable orbax checkpoint"):
        load_llama(tmp_path / "orbax")
