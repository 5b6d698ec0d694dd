"""Ahead-of-time compilation of the train step for a TPU slice, from a machine without one.

    report = plan_train_step(load_config("run.yaml"), "llama2-7b", parse_topology("v5p-8"))
    report["fits"], report["per_chip_bytes"], report["flops_per_step"], report["analytic_flops_per_step"]

The step is the one `moe-lora train` runs for the config: the same model config (dtypes, remat,
scanned layers), adapter (`adapter_config_from`), objective, optimizer and schedule, `make_train_step`,
base shardings from the logical rules (`param_shardings`), replicated train state (`state_shardings`),
the batch over (data, fsdp), compiled through `CompiledSteps`. Only shapes exist: the base, the state
and the batch are ShapeDtypeStructs, so a 70B plan needs no weights and little host memory.

The batch is the largest the loop makes: loop.global_batch rows of data.max_len tokens (bucketing
pads shorter batches to fewer tokens). A config whose mesh is the default (data=-1) is planned as
fsdp over every chip (a replicated multi-billion base rarely fits); name mesh.* to plan another.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax.adapters.registry import get_method
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.model.remat import REMAT_POLICIES
from moe_lora_jax.model.scan import scan_plan, scans
from moe_lora_jax.plan.flops import analytic_flops
from moe_lora_jax.plan.hlo_flops import hlo_matmul_breakdown, hlo_matmul_flops
from moe_lora_jax.plan.shapes import plan_model_config
from moe_lora_jax.plan.topology import Topology, tpu_devices
from moe_lora_jax.train.config import MeshConfig, TrainConfig

HEADROOM = 0.10  # a plan fits when its peak per-chip bytes stay under (1 - HEADROOM) x HBM


def plan_mesh_config(config: TrainConfig) -> MeshConfig:
    """The config's mesh, or fsdp over every chip when the config leaves the mesh at its default."""
    return MeshConfig(data=1, fsdp=-1, tensor=1) if config.mesh == MeshConfig() else config.mesh


def abstract_batch(config: TrainConfig, method: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The keys, shapes and dtypes of the batches the train loop feeds the step (data/pipeline.py)."""
    B, L = config.loop.global_batch, config.data.max_len
    batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask", "prompt_mask")}
    if "task_types" in get_method(method).batch_needs and config.data.world_knowledge_tasks is not None:
        batch["task_types"] = jax.ShapeDtypeStruct((B,), jnp.int32)
    return batch


def _adapter_config(config: TrainConfig, model_config: Any) -> Any:
    from moe_lora_jax.train.loop import adapter_config_from, run_objective

    spec = config.adapter.get("allocation")
    if isinstance(spec, dict) and str(spec.get("method")) == "alphalora":
        raise MoeLoraError(
            "adapter.allocation.method=alphalora reads the base weights' spectra, which a plan does not have: plan with the "
            "counts it gives (`moe-lora allocate ... --out alloc.json`, then --set adapter.allocation=alloc.json) or with a "
            "fixed recipe of the same total, e.g. --set adapter.allocation.method=mola-2468"
        )
    ac = adapter_config_from(config.adapter, None, model_config)
    if run_objective(config, ac.method).contrastive_coef:
        ac = ac.replace(sow_expert_outputs=True)  # as build_run: the contrastive loss reads every expert's output
    return ac


def _tensor_rows(tree: Any, shardings: Any, prefix: str) -> list[dict[str, Any]]:
    rows = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for (path, leaf), sh in zip(flat, flat_sh):
        nbytes = int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        shard = sh.shard_shape(tuple(leaf.shape))
        per_chip = int(math.prod(shard)) * np.dtype(leaf.dtype).itemsize
        spec = getattr(sh, "spec", None)
        rows.append({"name": prefix + "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path),
                     "shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype)), "bytes": nbytes, "per_chip_bytes": per_chip,
                     "spec": str(tuple(spec)) if spec is not None else str(sh), "replicated": bool(sh.is_fully_replicated)})
    return rows


def plan_train_step(config: TrainConfig, model: str | None, topology: Topology, *, devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """Compile the config's train step for `topology` and report its per-chip memory and FLOPs (a JSON-able dict)."""
    import flax.linen as nn

    from moe_lora_jax.adapters.io import init_adapter
    from moe_lora_jax.model import LlamaForCausalLM
    from moe_lora_jax.parallel.mesh import make_mesh
    from moe_lora_jax.parallel.rules import abstract_variables, param_shardings
    from moe_lora_jax.train.optim import make_optimizer, make_schedule
    from moe_lora_jax.train.loop import run_objective
    from moe_lora_jax.train.state import TrainState, stack_state, state_shardings
    from moe_lora_jax.stacking import stack_layers
    from moe_lora_jax.train.step import CompiledSteps, make_train_step

    name, model_config = plan_model_config(model if model is not None else config.model.path)
    devices = list(tpu_devices(topology) if devices is None else devices)
    mesh_config = plan_mesh_config(config)
    mesh = make_mesh(mesh_config, devices=devices)
    m = config.model
    model_config = model_config.replace(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers)
    ac = _adapter_config(config, model_config)
    objective = run_objective(config, ac.method)
    loop = config.loop
    if loop.global_batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise MoeLoraError(f"loop.global_batch={loop.global_batch} does not split over data x fsdp = "
                           f"{mesh.shape['data'] * mesh.shape['fsdp']} chips: make it a multiple")
    base_sh = param_shardings(LlamaForCausalLM(model_config), mesh)["params"]
    base = nn.unbox(abstract_variables(LlamaForCausalLM(model_config))["params"])  # ShapeDtypeStructs: no weights
    if scans(model_config, ac):  # as build_run: the scanned model reads the layers stacked over `layers`
        base, base_sh = stack_layers(base), stack_layers(base_sh)
    optimizer = make_optimizer(config.optim, loop.steps)
    state = jax.eval_shape(lambda k: TrainState.create(init_adapter(model_config, ac, k), optimizer, seed=config.seed), jax.random.key(0))
    state_sh = state_shardings(state, mesh)
    like = state
    if scans(model_config, ac):  # as the train loop keeps it between steps: stacked over layers
        state, state_sh = stack_state(state), stack_state(state_sh)
    model_obj = LlamaForCausalLM(model_config, ac)
    step_fn = make_train_step(model_obj, ac, optimizer, grad_accum=loop.grad_accum, lr_schedule=make_schedule(config.optim, loop.steps),
                              mesh=mesh, objective=objective, state_like=like)
    steps = CompiledSteps(step_fn, mesh, state, state_sh, base, base_sh)
    batch = abstract_batch(config, ac.method)
    compiled = steps.compile(batch)  # every input carries its NamedSharding: no mesh context needed
    seconds = float(next(iter(steps.compile_seconds.values())))
    return _report(compiled, seconds, name, model_config, ac, config, topology, mesh, base, base_sh, state, state_sh, batch, steps)


def _report(compiled, seconds, name, model_config, ac, config, topology, mesh, base, base_sh, state, state_sh, batch, steps) -> dict[str, Any]:
    mem = compiled.memory_analysis()
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    peak = arg + out - alias + temp
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = mesh.devices.size
    hlo = compiled.as_text()
    per_chip_flops = hlo_matmul_flops(hlo)  # cost_analysis counts a scanned body once
    B, L = config.loop.global_batch, config.data.max_len
    scanned = bool(model_config.scan_layers) and scan_plan(model_config.num_hidden_layers, ac) is not None
    analytic = analytic_flops(model_config, ac, B, L, config.model.remat)
    hbm = topology.hbm_bytes
    rows = (_tensor_rows(base, base_sh, "params/") + _tensor_rows(state, state_sh, "state/")
            + _tensor_rows(batch, steps.batch_shardings(batch), "batch/"))
    base_rows = [r for r in rows if r["name"].startswith("params/")]
    replicated = [r for r in base_rows if r["replicated"]] if n > 1 else []
    largest = sorted(rows, key=lambda r: -r["bytes"])[:5]
    return {
        "model": name,
        "topology": topology.topology_name,
        "topology_name": topology.name,
        "chips": topology.chips,
        "hosts": topology.hosts,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "method": ac.method,
        "remat": config.model.remat,
        "scan_layers": bool(config.model.scan_layers),
        "scanned": scanned,
        "param_dtype": config.model.param_dtype,
        "dtype": config.model.dtype,
        "global_batch": B,
        "max_len": L,
        "tokens_per_step": B * L,
        "grad_accum": config.loop.grad_accum,
        "per_chip_bytes": {"argument": arg, "output": out, "temp": temp, "alias": alias, "peak": peak,
                           "generated_code": int(getattr(mem, "generated_code_size_in_bytes", 0))},
        "hbm_bytes": hbm,
        "hbm_fraction": peak / hbm,
        "headroom": HEADROOM,
        "fits": peak <= (1.0 - HEADROOM) * hbm,
        "flops_per_chip": per_chip_flops,
        "xla_cost_analysis_flops_per_chip": float(cost.get("flops", 0.0)),
        "flops_per_step": per_chip_flops * n,
        "flops_per_token": per_chip_flops * n / (B * L),
        "analytic_flops_per_step": analytic["total"],
        "analytic_flops_per_token": analytic["per_token"],
        "analytic_terms": analytic["terms"],
        "analytic_exact_adapters": analytic["exact_adapters"],
        "base_matmul_params": analytic["base_matmul_params"],
        "flops_ratio": (per_chip_flops * n / analytic["total"]) if analytic["total"] else None,
        "largest_products": hlo_matmul_breakdown(hlo, 24),
        "compile_seconds": seconds,
        "largest_tensors": largest,
        "replicated_base_tensors": [{k: r[k] for k in ("name", "shape", "bytes")} for r in replicated],
        "replicated_base_bytes": sum(r["bytes"] for r in replicated),
    }


def suggest_remat(config: TrainConfig, model: str | None, topology: Topology, *, devices: Sequence[Any] | None = None,
                  policies: Sequence[str] = REMAT_POLICIES) -> dict[str, Any]:
    """Compile the policies from least to most recomputation; the report of the first that fits (or of the
    last tried), with `suggest` = [{remat, fits, peak, flops_per_step, compile_seconds}, ...] and `suggested`."""
    devices = list(tpu_devices(topology) if devices is None else devices)
    tried, report = [], None
    for policy in policies:
        report = plan_train_step(config.replace(model=dataclasses.replace(config.model, remat=policy)),
                                 model, topology, devices=devices)
        tried.append({"remat": policy, "fits": report["fits"], "peak_bytes": report["per_chip_bytes"]["peak"],
                      "flops_per_step": report["flops_per_step"], "compile_seconds": report["compile_seconds"]})
        if report["fits"]:
            break
    assert report is not None
    report["suggest"] = tried
    report["suggested"] = report["remat"] if report["fits"] else None
    return report


def format_report(report: dict[str, Any]) -> str:
    """The plan as a few aligned lines of text."""
    G = 1024**3
    b = report["per_chip_bytes"]
    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [
        f"plan: {report['model']} {report['method']} on {report['topology']} ({report['chips']} chips, {report['hosts']} host(s)), "
        f"mesh {mesh}, remat {report['remat']}, scan_layers {report['scan_layers']}",
        f"  step: {report['global_batch']} x {report['max_len']} = {report['tokens_per_step']} tokens, "
        f"params {report['param_dtype']}, compute {report['dtype']}; compiled in {report['compile_seconds']:.1f} s",
        f"  per chip: arguments {b['argument'] / G:.2f} GiB, temporaries {b['temp'] / G:.2f} GiB, outputs {b['output'] / G:.2f} GiB "
        f"(aliased {b['alias'] / G:.2f}) -> peak {b['peak'] / G:.2f} GiB of {report['hbm_bytes'] / G:.0f} GiB HBM "
        f"({100 * report['hbm_fraction']:.1f}%): {'fits' if report['fits'] else 'does NOT fit'} with {100 * report['headroom']:.0f}% headroom",
        f"  FLOPs per step: compiled {report['flops_per_step']:.3e} ({report['flops_per_token']:.3e} per token), analytic "
        f"{report['analytic_flops_per_step']:.3e} ({report['analytic_flops_per_token']:.3e} per token): ratio {report['flops_ratio']:.3f}",
        "  largest products (FLOPs per chip): " + ", ".join(f"{'backward ' if 'transpose(' in p['op'] else ''}{p['op'].rsplit('/', 2)[-2]} {p['flops_per_chip']:.2e}"
                                                          for p in report.get("largest_products", [])[:4]),
        "  largest tensors:",
    ]
    for r in report["largest_tensors"]:
        lines.append(f"    {r['name']:<48} {str(tuple(r['shape'])):<20} {r['dtype']:<9} {r['bytes'] / 2**20:10.1f} MiB  "
                     f"spec {r['spec']}  ({r['per_chip_bytes'] / 2**20:.1f} MiB per chip)")
    rep = report["replicated_base_tensors"]
    if rep:
        big = sorted(rep, key=lambda r: -r["bytes"])[:3]
        lines.append(f"  replicated base tensors: {len(rep)}, {report['replicated_base_bytes'] / 2**20:.1f} MiB in all "
                     f"(largest: {', '.join(r['name'] for r in big)})")
    else:
        lines.append("  replicated base tensors: none")
    for t in report.get("suggest", []):
        lines.append(f"  suggest: remat {t['remat']:<14} peak {t['peak_bytes'] / G:8.2f} GiB  {'fits' if t['fits'] else 'does not fit'}")
    if "suggest" in report:
        lines.append(f"  suggested: model.remat={report['suggested']}" if report["suggested"] else
                     "  suggested: none of the remat policies fits: shard wider (mesh.fsdp, mesh.tensor), or lower loop.global_batch "
                     "(raise loop.grad_accum) or data.max_len")
    return "\n".join(lines)
