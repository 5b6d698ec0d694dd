"""Mesh, logical-axis rules, shardings and multi-process start-up.

The multi-device checks run in subprocesses: one with 8 forced CPU devices
(XLA_FLAGS must be set before JAX starts, and must not leak into this process),
and two processes joined by jax.distributed over a local coordinator. Both start
when the module's first test asks for them and run side by side.
"""

from __future__ import annotations

import textwrap
import types

import pytest
from jax.sharding import PartitionSpec as P

from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.parallel.mesh import resolve_mesh_shape
from moe_lora_jax.parallel.multihost import distributed_plan
from moe_lora_jax.parallel.rules import LOGICAL_AXIS_RULES, fit_spec, mesh_spec
from subprocess_testlib import finish, free_port, start, stop

# SmolLM2-135M's layer shapes (hidden 576, 9 heads, 3 KV heads of 64, MLP 1536), one layer, small vocab.
MODEL = """
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.model import LlamaForCausalLM
cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                  rope_theta=100000.0)
model = LlamaForCausalLM(cfg)
abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
rng = np.random.default_rng(0)  # numpy init: no compilation before the checks start
params = jax.tree_util.tree_map_with_path(
    lambda path, a: ((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.05 * rng.standard_normal(a.shape)).astype(np.float32),
    abstract)
ids = rng.integers(0, 256, (8, 16)).astype(np.int32)
mask = np.ones((8, 16), np.int32)
mask[3, 11:] = 0
"""

EIGHT_DEVICES = (
    """
import os, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
"""
    + MODEL
    + """
from moe_lora_jax.parallel import make_mesh, shardings_for, abstract_variables, batch_sharding, shard_batch
assert jax.device_count() == 8
ref = np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask))
abstract = abstract_variables(model)
out = {}
for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
    mesh = make_mesh(shape)
    sh = shardings_for(abstract["params"], mesh)
    p = jax.device_put(params, sh)
    batch = shard_batch({"input_ids": ids, "attention_mask": mask}, mesh)
    fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m),
                  in_shardings=(sh, batch_sharding(mesh), batch_sharding(mesh)))
    logits = np.asarray(fwd(p, batch["input_ids"], batch["attention_mask"]))
    q = p["layers_0"]["self_attn"]["q_proj"]["kernel"]
    out[str(shape)] = {
        "diff": float(np.abs(logits - ref).max()),
        "q_spec": str(sh["layers_0"]["self_attn"]["q_proj"]["kernel"].spec),
        "q_shard": list(q.addressable_shards[0].data.shape),
        "k_shard": list(p["layers_0"]["self_attn"]["k_proj"]["kernel"].addressable_shards[0].data.shape),
        "embed_shard": list(p["embed_tokens"]["embedding"].addressable_shards[0].data.shape),
        "ids_shard": list(batch["input_ids"].addressable_shards[0].data.shape),
    }
out["ref_absmax"] = float(np.abs(ref).max())
print("RESULT " + json.dumps(out))
"""
)

TWO_PROCESSES = (
    """
import os, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from moe_lora_jax.parallel import initialize_distributed, is_main_process
plan = initialize_distributed()
"""
    + MODEL
    + """
from jax.experimental import multihost_utils
from moe_lora_jax.parallel import make_mesh, shardings_for, abstract_variables, shard_batch
pid, n = jax.process_index(), jax.process_count()
mesh = make_mesh((2, 1, 2))  # 4 devices over 2 processes: the batch split across processes
sh = shardings_for(abstract_variables(model)["params"], mesh)
gparams = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x)[idx]), params, sh)
local = {"input_ids": ids[pid * 4:(pid + 1) * 4], "attention_mask": mask[pid * 4:(pid + 1) * 4]}
batch = shard_batch(local, mesh)
logits = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(gparams, batch["input_ids"], batch["attention_mask"])
full = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
ranks = np.asarray(multihost_utils.process_allgather(np.asarray([pid + 1.0])))
ref = np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask))
print("RESULT " + json.dumps({"kind": plan.kind, "pid": pid, "n": n, "devices": jax.device_count(),
      "local_devices": jax.local_device_count(), "main": is_main_process(),
      "ranks": ranks.ravel().tolist(), "diff": float(np.abs(full - ref).max()), "shape": list(full.shape)}))
"""
)


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory):
    """Start the 8-device run and the two-process run together; yield their handles."""
    d = tmp_path_factory.mktemp("parallel")
    (d / "eight.py").write_text(textwrap.dedent(EIGHT_DEVICES))
    (d / "two.py").write_text(textwrap.dedent(TWO_PROCESSES))
    port = free_port()
    procs = {
        "eight": start(d / "eight.py", d / "eight.log"),
        "two": [
            start(d / "two.py", d / f"two-{i}.log", MOE_LORA_COORDINATOR=f"127.0.0.1:{port}",
                  MOE_LORA_NUM_PROCESSES="2", MOE_LORA_PROCESS_ID=str(i))
            for i in range(2)
        ],
    }
    yield procs
    for p in [procs["eight"], *procs["two"]]:
        stop(p)


# ----------------------------------------------------------------------------- pure pieces
def test_mesh_shape_resolution():
    assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape((1, 4, 2), 8) == (1, 4, 2)
    with pytest.raises(MoeLoraError, match=r"mesh \(data=2, fsdp=2, tensor=1\) has 4 devices but 8 are available"):
        resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(MoeLoraError, match="multiply to 3, which does not divide the 8 devices"):
        resolve_mesh_shape((-1, 3, 1), 8)
    with pytest.raises(MoeLoraError, match="more than one -1"):
        resolve_mesh_shape((-1, -1, 1), 8)


def test_make_mesh_on_this_process():
    import jax

    from moe_lora_jax.parallel import make_mesh
    from moe_lora_jax.train.config import MeshConfig

    n = jax.device_count()
    mesh = make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
    with pytest.raises(MoeLoraError, match=f"but {n} are available"):
        make_mesh({"data": n + 1, "fsdp": 1, "tensor": 1})


def test_rule_table():
    rules = dict(LOGICAL_AXIS_RULES)
    assert rules["embed"] == "fsdp" and rules["batch"] == ("data", "fsdp")
    assert all(rules[a] == "tensor" for a in ("mlp", "heads", "kv", "vocab"))
    assert all(rules[a] is None for a in ("expert", "rank", "layers"))
    assert mesh_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert mesh_spec(("expert", "embed", "rank")) == P(None, "fsdp", None)
    assert mesh_spec(("batch", None)) == P(("data", "fsdp"), None)


def test_fit_spec_replicates_dimensions_that_do_not_divide():
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 2})
    assert fit_spec(P("fsdp", "tensor"), (576, 192), mesh) == P("fsdp", "tensor")
    assert fit_spec(P("fsdp", "tensor"), (576, 9), mesh) == P("fsdp", None)  # 9 heads on tensor=2
    assert fit_spec(P(("data", "fsdp"), None), (12, 5), mesh) == P(None, None)  # 12 % 8
    assert fit_spec(P("tensor", "tensor"), (4, 4), mesh) == P("tensor", None)  # a mesh axis used once


def test_shardings_for_the_model_tree():
    import jax

    from moe_lora_jax.config import LlamaConfig
    from moe_lora_jax.model import LlamaForCausalLM
    from moe_lora_jax.parallel import abstract_variables, make_mesh, replicated_shardings, shardings_for

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    abstract = abstract_variables(LlamaForCausalLM(cfg))
    mesh = make_mesh(None)
    sh = shardings_for(abstract["params"], mesh)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}
    assert specs["['layers_1']['self_attn']['q_proj']['kernel']"] == P("fsdp", "tensor")
    assert specs["['layers_1']['self_attn']['o_proj']['kernel']"] == P("tensor", "fsdp")
    assert specs["['layers_0']['mlp']['down_proj']['kernel']"] == P("tensor", "fsdp")
    assert specs["['embed_tokens']['embedding']"] == P("tensor", "fsdp")
    assert specs["['lm_head']['kernel']"] == P("fsdp", "tensor")
    assert specs["['norm']['scale']"] == P("fsdp")
    assert len(specs) == 2 * 9 + 3
    assert all(s.spec == P() for s in jax.tree.leaves(replicated_shardings(abstract["params"], mesh)))


def test_distributed_plan_from_environment():
    assert distributed_plan({}).kind == "single"
    plan = distributed_plan({"MOE_LORA_COORDINATOR": "10.0.0.1:8476", "MOE_LORA_NUM_PROCESSES": "4", "MOE_LORA_PROCESS_ID": "3"})
    assert (plan.kind, plan.coordinator, plan.num_processes, plan.process_id) == ("explicit", "10.0.0.1:8476", 4, 3)
    # under srun the count and id come from SLURM
    plan = distributed_plan({"MOE_LORA_COORDINATOR": "node1:1234", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "MOE_LORA_LOCAL_DEVICE_IDS": "0,1"})
    assert (plan.num_processes, plan.process_id, plan.local_device_ids) == (2, 1, (0, 1))
    assert distributed_plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}).kind == "slurm"
    assert distributed_plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).kind == "single"
    assert distributed_plan({"MOE_LORA_TPU_POD": "1"}).kind == "tpu"
    assert distributed_plan({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).kind == "tpu"
    assert distributed_plan({"TPU_WORKER_HOSTNAMES": "localhost"}).kind == "single"
    with pytest.raises(MoeLoraError, match="lacks a port"):
        distributed_plan({"MOE_LORA_COORDINATOR": "10.0.0.1"})
    with pytest.raises(MoeLoraError, match="process count or id is not"):
        distributed_plan({"MOE_LORA_COORDINATOR": "10.0.0.1:1"})
    with pytest.raises(MoeLoraError, match="process id 2 is outside 0..1"):
        distributed_plan({"MOE_LORA_COORDINATOR": "h:1", "MOE_LORA_NUM_PROCESSES": "2", "MOE_LORA_PROCESS_ID": "2"})


def test_single_process_initialize_is_a_no_op():
    from moe_lora_jax.parallel import initialize_distributed, is_main_process

    assert initialize_distributed({}).kind == "single" and is_main_process()


# ----------------------------------------------------------------------------- multi-device
def test_sharded_forward_matches_one_device_on_8_devices(subprocess_runs):
    result = finish(subprocess_runs["eight"], timeout=240)
    assert result.pop("ref_absmax") > 0.5  # logits of a useful size, so 1e-5 is a real bound
    assert set(result) == {"(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"}
    for shape, r in result.items():
        assert r["diff"] < 1e-5, (shape, r)
        assert r["q_spec"] in ("PartitionSpec('fsdp', 'tensor')", "P('fsdp', 'tensor')")
    # the weights really are split: [576, 576] over fsdp x tensor, [576, 192] likewise, embedding [256, 576] over tensor x fsdp
    assert result["(1, 4, 2)"]["q_shard"] == [144, 288] and result["(1, 4, 2)"]["k_shard"] == [144, 96]
    assert result["(1, 4, 2)"]["embed_shard"] == [128, 144]
    assert result["(2, 2, 2)"]["q_shard"] == [288, 288] and result["(8, 1, 1)"]["q_shard"] == [576, 576]
    # the batch of 8 rows is split over data x fsdp
    assert result["(8, 1, 1)"]["ids_shard"] == [1, 16] and result["(2, 2, 2)"]["ids_shard"] == [2, 16]
    assert result["(1, 4, 2)"]["ids_shard"] == [2, 16]


def test_two_process_distributed_forward(subprocess_runs):
    results = sorted((finish(p, timeout=240) for p in subprocess_runs["two"]), key=lambda r: r["pid"])
    for pid, r in enumerate(results):
        assert (r["kind"], r["pid"], r["n"], r["devices"], r["local_devices"]) == ("explicit", pid, 2, 4, 2)
        assert r["main"] is (pid == 0)
        assert r["ranks"] == [1.0, 2.0]  # an all-gather across the processes
        assert r["shape"] == [8, 16, 256] and r["diff"] < 1e-5


def test_initialize_after_the_backend_started_is_a_clear_error():
    import jax

    from moe_lora_jax.parallel import initialize_distributed

    jax.devices()  # the backend is up in this test process
    env = {"MOE_LORA_COORDINATOR": "127.0.0.1:1", "MOE_LORA_NUM_PROCESSES": "2", "MOE_LORA_PROCESS_ID": "0"}
    with pytest.raises(MoeLoraError, match="call it first"):
        initialize_distributed(env)
