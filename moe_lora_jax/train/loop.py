"""The train loop, top to bottom: set-up, resume, steps, evaluation, checkpoints, outputs.

    from moe_lora_jax.train import load_config, train
    result = train(load_config("experiments/configs/quickstart.yaml"))

Reads a `TrainConfig`; writes under `output_dir`:

    config.yaml          the resolved config (never overwritten: see `save_resolved`)
    allocation.json      the per-layer expert counts the adapter was built from (expert methods)
    metrics.jsonl        one JSON object per logged step (and TensorBoard events when installed)
    checkpoints/<step>/  orbax: adapter, optimizer state, step, RNG, data position, run identity
    adapter/             the final adapter (moe_lora_jax native format; `load_adapter` reads it)
    loss.png             train (and validation) loss against step

Every process runs this function; process 0 alone logs, plots and writes files
other than checkpoints (orbax coordinates those).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.train.config import TrainConfig, config_to_dict, save_resolved



@dataclass
class RunResult:
    output_dir: Path
    step: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)  # logged metrics, one dict per logged step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "eval/loss"} per evaluation
    adapter_dir: Path | None = None
    state: Any = None  # the final TrainState (on device)


@dataclass
class Run:
    """Everything the loop builds once: model, base weights, adapter config, data, optimizer, mesh."""

    config: TrainConfig
    model_path: Any
    model: Any
    model_config: Any
    adapter_config: Any
    base: Any
    base_shardings: Any
    tokenizer: Any
    data: Any
    mesh: Any
    optimizer: Any
    schedule: Callable


# ----------------------------------------------------------------------------- set-up
def resolve_allocation(spec: Any, params: Any, num_layers: int, *, progress: bool = False) -> Any:
    """An `Allocation` from the config's `adapter.allocation`: a JSON path, a dict of counts
    ({"experts_per_layer": [...]} or {"modules": {...}}), or a recipe
    {"method": alphalora|uniform|mola-*, "total": T, "beta": B, "estimator": ...}."""
    from moe_lora_jax.allocation import (
        ALPHALORA_DEFAULT_BETA, Allocation, HillOptions, allocate_alphalora, allocate_shape, analyze_params, layer_metric,
    )

    if spec is None or isinstance(spec, Allocation):
        return spec
    if isinstance(spec, (str, Path)):
        alloc = Allocation.from_json(spec)
    elif isinstance(spec, Mapping) and "method" in spec and "total" in spec:
        method, total = str(spec["method"]), int(spec["total"])
        limits = {k: spec[k] for k in ("min_experts", "max_experts") if k in spec}
        if method == "alphalora":
            estimator = str(spec.get("estimator", "fix-finger"))
            fits = analyze_params(params, HillOptions(estimator), progress=progress)
            metric = layer_metric(fits, num_layers)
            alloc = allocate_alphalora(metric, total, float(spec.get("beta", ALPHALORA_DEFAULT_BETA)), provenance={"estimator": estimator}, **limits)
        else:
            alloc = allocate_shape(method, num_layers, total, **limits)
    elif isinstance(spec, Mapping):
        alloc = Allocation.from_dict(spec, source="adapter.allocation")
    else:
        raise MoeLoraError(f"adapter.allocation={spec!r}: give a JSON file, counts, or {{method: alphalora, total: T}}")
    alloc.check_num_layers(num_layers)
    return alloc


def adapter_config_from(raw: Mapping[str, Any], params: Any, model_config: Any, *, progress: bool = False) -> Any:
    from moe_lora_jax.adapters import AdapterConfig

    raw = dict(raw)
    if raw.get("allocation") is not None:
        raw["allocation"] = resolve_allocation(raw["allocation"], params, model_config.num_hidden_layers, progress=progress)
    names = {f.name for f in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise MoeLoraError(f"unknown adapter key(s) {unknown}: valid keys are {', '.join(sorted(names))}")
    ac = AdapterConfig(**{k: tuple(v) if k == "target_modules" and v is not None else v for k, v in raw.items()})
    ac.validate_for(model_config)
    return ac


def build_run(config: TrainConfig, *, progress: bool = True) -> Run:
    from moe_lora_jax.convert import load_llama, load_llama_config
    from moe_lora_jax.data import make_train_data
    from moe_lora_jax.embedded import resolve_model_path
    from moe_lora_jax.model import LlamaForCausalLM
    from moe_lora_jax.parallel.mesh import data_parallel_size, make_mesh
    from moe_lora_jax.parallel.rules import param_shardings, put_global
    from moe_lora_jax.tokenizer import load_tokenizer
    from moe_lora_jax.train.optim import make_optimizer, make_schedule

    mesh = make_mesh(config.mesh)
    path = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(path)  # before the weights: a bad template or data fails fast
    loop = config.loop
    data = make_train_data(
        config.data, tokenizer, loop.global_batch, process_index=jax.process_index(),
        process_count=jax.process_count(), data_parallel=data_parallel_size(mesh), grad_accum=loop.grad_accum,
    )
    overrides = dict(param_dtype=config.model.param_dtype, dtype=config.model.dtype)
    model_config = load_llama_config(path).replace(remat=config.model.remat, **overrides)
    base_sh = param_shardings(LlamaForCausalLM(model_config), mesh)["params"]
    model_config, base = load_llama(path, progress=progress and jax.process_index() == 0, **overrides)
    model_config = model_config.replace(remat=config.model.remat)
    base = put_global(base, base_sh)
    ac = adapter_config_from(config.adapter, base, model_config, progress=progress)
    return Run(
        config=config, model_path=path, model=LlamaForCausalLM(model_config, ac), model_config=model_config,
        adapter_config=ac, base=base, base_shardings=base_sh, tokenizer=tokenizer, data=data, mesh=mesh,
        optimizer=make_optimizer(config.optim, loop.steps), schedule=make_schedule(config.optim, loop.steps),
    )


def _batch_for_step(batch: Mapping[str, np.ndarray], ac: Any) -> dict[str, np.ndarray]:
    out = dict(batch)
    if ac is not None and ac.method == "loramoe":
        # LoRAMoE's constraint wants a binary type per example: the data's task label, which must be 0/1.
        if np.any(out["task_id"] > 1):
            raise MoeLoraError(
                "LoRAMoE needs a binary task label (1 = world knowledge, 0 = other): give data with two task "
                "names, or set adapter.loramoe_coef=0"
            )
        out["task_types"] = out["task_id"]
    out.pop("task_id", None)
    return out


def _nonfinite_fix(flags: Any) -> str:
    """What to try, by the group that went non-finite (loss, gradients, updated adapter, optimizer state)."""
    loss, grads, adapter, opt = (bool(x) for x in np.asarray(flags).tolist())
    if loss or grads:
        return "lower optim.lr or check the data"
    if adapter:
        return "the optimizer's update is NaN/Inf from finite gradients: check optim.lr and optim.eps (eps > 0)"
    return "the optimizer state overflowed: lower optim.lr, set optim.clip_norm, or check the data"


# ----------------------------------------------------------------------------- loop
def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    run: Run | None = None,
    batch_hook: Callable[[int, dict], dict] | None = None,
) -> RunResult:
    """Train (or resume) as `config` says. `stop_after=k` ends after step k with a checkpoint,
    as an interruption would; `batch_hook(step, batch)` may rewrite a batch (tests use it)."""
    from moe_lora_jax.adapters.io import save_adapter
    from moe_lora_jax.data import eval_batches
    from moe_lora_jax.parallel.multihost import is_main_process
    from moe_lora_jax.parallel.rules import put_global, shard_batch
    from moe_lora_jax.train.checkpoint import CheckpointStore, base_fingerprint
    from moe_lora_jax.train.metrics import MetricsWriter, Progress, plot_losses
    from moe_lora_jax.train.state import TrainState, init_adapter, state_shardings
    from moe_lora_jax.train.step import CompiledSteps, describe_nonfinite, make_eval_step, make_train_step

    out_dir = Path(config.output_dir)
    main = is_main_process()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(config, out_dir)
    run = run or build_run(config, progress=progress)
    ac, loop = run.adapter_config, config.loop
    if main and ac.allocation is not None and not (out_dir / "allocation.json").exists():
        ac.allocation.to_json(out_dir / "allocation.json")

    state = TrainState.create(init_adapter(run.model, jax.random.key(config.seed)), run.optimizer, seed=config.seed)
    state_sh = state_shardings(state, run.mesh)
    state = put_global(state, state_sh)
    meta = {
        "base_model": str(run.model_path),
        "base_fingerprint": base_fingerprint(run.base),
        "adapter_config": ac.to_dict(),
        "train_config": config_to_dict(config),
    }
    ckpt = config.checkpoint
    store = CheckpointStore(Path(ckpt.dir) if ckpt.dir else out_dir / "checkpoints", keep=ckpt.keep, async_save=ckpt.async_save, meta=meta)
    restored = store.restore_latest(state)
    if restored is not None:
        state, data_state, _ = restored
        run.data.train.restore(data_state)
    start = int(state.step)

    step_fn = make_train_step(run.model, ac, run.optimizer, grad_accum=loop.grad_accum, lr_schedule=run.schedule, mesh=run.mesh)
    steps = CompiledSteps(step_fn, run.mesh, state, state_sh, run.base, run.base_shardings)
    eval_step = jax.jit(make_eval_step(run.model, ac))

    def validate() -> float | None:
        split = run.data.validation
        if split is None:
            return None
        ce_sum = n = 0.0
        for batch in eval_batches(split, loop.global_batch, run.data.train.pad_id, limit=loop.eval_batches,
                                  process_index=jax.process_index(), process_count=jax.process_count()):
            batch = _batch_for_step({k: v for k, v in batch.items() if k != "example_index"}, ac)
            out = eval_step(state.adapter, run.base, shard_batch(batch, run.mesh))
            ce_sum, n = ce_sum + float(out["ce_sum"]), n + float(out["tokens"])
        return ce_sum / max(n, 1.0)

    result = RunResult(output_dir=out_dir, step=start, stopped_early=False)
    end = loop.steps if stop_after is None else min(loop.steps, stop_after)
    writer = MetricsWriter(out_dir, enabled=main)
    bar = Progress(loop.steps, initial=start, desc="train", enabled=progress and main)

    def say(message: str) -> None:  # above the bar, or a plain line when there is none (batch jobs)
        if bar.enabled:
            bar.write(message)
        elif main:
            print(message, flush=True)

    t_last, tokens_since = time.perf_counter(), 0.0
    try:
        if start == 0 and start < end:  # the validation loss before any training, for comparison
            val = validate()
            if val is not None:
                writer.write(0, {"eval/loss": val})
                result.evals.append({"step": 0, "eval/loss": val})
        for step in range(start, end):
            batch = _batch_for_step(next(run.data.train), ac)
            if batch_hook is not None:
                batch = batch_hook(step, batch)
            state, metrics = steps(state, run.base, shard_batch(batch, run.mesh))
            done = step + 1
            tokens_since += float(np.sum(batch["attention_mask"])) * jax.process_count()
            if int(metrics["nonfinite"]):
                what = describe_nonfinite(metrics["nonfinite/flags"], metrics["nonfinite/leaf"], state.adapter, state.opt_state)
                say(f"step {done}: NaN/Inf in the {what}; update skipped ({int(state.nonfinite_run)} in a row)")
                if int(state.nonfinite_run) >= loop.max_nonfinite_steps:
                    result.stopped_early = True
                    raise MoeLoraError(
                        f"{int(state.nonfinite_run)} consecutive steps had NaN/Inf, the last in the {what} (loop.max_nonfinite_steps="
                        f"{loop.max_nonfinite_steps}): {_nonfinite_fix(metrics['nonfinite/flags'])}; the last good checkpoint is kept"
                    )
            if done % loop.log_every == 0 or done == end:
                now = time.perf_counter()
                row = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
                row["tokens_per_second"] = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0.0
                writer.write(done, row)
                result.history.append({"step": done, **row})
            if done % loop.eval_every == 0 or done == loop.steps:
                val = validate()
                if val is not None:
                    writer.write(done, {"eval/loss": val})
                    result.evals.append({"step": done, "eval/loss": val})
                    say(f"step {done}: validation loss {val:.4f}")
            if done % ckpt.every == 0 or done == end:
                store.save(done, state, run.data.train.state())
            bar.update(1, loss=f"{float(metrics['loss']):.4f}")
        result.step = int(state.step)
    finally:
        bar.close()
        store.close()
        writer.close()
    result.state = state
    if main and result.step == loop.steps:
        adapter_dir = out_dir / "adapter"
        if not adapter_dir.exists():
            save_adapter(adapter_dir, jax.device_get(state.adapter), ac, run.model_config, base_model_name_or_path=str(run.model_path))
        result.adapter_dir = adapter_dir
    if main and result.history:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    return result
