"""The train loop, top to bottom: set-up, resume, steps, evaluation, checkpoints, outputs.

    from moe_lora_jax.train.config import load_config
    from moe_lora_jax.train.loop import train
    result = train(load_config("experiments/configs/quickstart.yaml"))

Reads a `TrainConfig`; writes under `output_dir`:

    config.yaml          the resolved config (never overwritten: see `save_resolved`)
    allocation.json      the per-layer expert counts the adapter was built from (expert methods)
    metrics.jsonl        one JSON object per logged step (and TensorBoard events when installed)
    checkpoints/<step>/  orbax: adapter, optimizer state, step, RNG, data position, run identity
    adapter/             the final adapter (moe_lora_jax native format; `load_adapter` reads it)
    loss.png             train (and validation) loss against step
    .lock                held while a run is in progress (see `moe_lora_jax.atomic.run_lock`)

A run directory belongs to one run: a second process is refused (lock), another
adapter is refused (the checkpoint's identity), and a directory that holds other
files, or an adapter/ without a checkpoint, is refused before any work. The final
adapter/ and loss.png are replaced, in one step, at the end of every run that reaches
loop.steps (so extending a finished run replaces them); a refused run writes nothing.

Every process runs this function; process 0 alone logs, plots and writes files
other than checkpoints (orbax coordinates those).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.io import init_adapter, save_adapter
from moe_lora_jax.adapters.presets import apply_preset, preset_objective
from moe_lora_jax.allocation.recipes import resolve_allocation
from moe_lora_jax.atomic import atomic_write_text, run_lock
from moe_lora_jax.convert import load_llama, load_llama_config
from moe_lora_jax.data import eval_batches, make_train_data, task_type_table
from moe_lora_jax.embedded import resolve_model_path
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.model import LlamaForCausalLM
from moe_lora_jax.model.scan import scans
from moe_lora_jax.objective import OBJECTIVE_FIELDS, resolve_objective
from moe_lora_jax.parallel.mesh import data_parallel_size, make_mesh
from moe_lora_jax.parallel.multihost import is_main_process
from moe_lora_jax.parallel.rules import param_shardings, put_global, shard_batch
from moe_lora_jax.stacking import stack_layers, unstack_layers
from moe_lora_jax.tokenizer import load_tokenizer
from moe_lora_jax.train.checkpoint import CheckpointStore, base_fingerprint, resume_changes
from moe_lora_jax.train.config import TrainConfig, config_to_dict, save_resolved
from moe_lora_jax.train.metrics import MetricsWriter, Progress, plot_losses
from moe_lora_jax.train.optim import make_optimizer, make_schedule
from moe_lora_jax.train.state import TrainState, stack_state, state_shapes, state_shardings, unstack_state
from moe_lora_jax.train.step import CompiledSteps, describe_nonfinite, make_eval_step, make_train_step



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
    task_types: Any = None  # LoRAMoE: int32 [num_tasks], 1 = world knowledge (data.world_knowledge_tasks)
    objective: Any = None  # the resolved Objective (loss weights); None: the method's defaults


# ----------------------------------------------------------------------------- set-up
def adapter_config_from(raw: Mapping[str, Any], params: Any, model_config: Any, *, progress: bool = False, validate: bool = True) -> Any:
    _refuse_adapter_weights(raw)
    raw = apply_preset(raw, model_config.num_hidden_layers)  # `preset: NAME` -> its values; explicit keys win
    if raw.get("allocation") is not None:
        raw["allocation"] = resolve_allocation(raw["allocation"], params, model_config.num_hidden_layers, progress=progress,
                                               top_k=raw.get("top_k"))
    names = {f.name for f in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise MoeLoraError(f"unknown adapter key(s) {unknown}: valid keys are {', '.join(sorted(names))}")
    ac = AdapterConfig(**{k: tuple(v) if k == "target_modules" and v is not None else v for k, v in raw.items()})
    if validate:
        ac.validate_for(model_config)
    return ac


def _refuse_adapter_weights(raw: Mapping[str, Any]) -> None:
    """Loss weights moved from the adapter section to the objective section: name the new key."""

    for key in raw:
        if key in OBJECTIVE_FIELDS:
            raise MoeLoraError(
                f"adapter.{key} is a loss weight and now lives in the objective section: write objective.{key} "
                f"(YAML `objective: {{{key}: ...}}` or --set objective.{key}=...)"
            )


def run_objective(config: TrainConfig, method: str) -> Any:
    """The run's resolved Objective: the objective section, else the adapter preset's weights, else the
    method's defaults. A weight the method does not use is a one-line error naming objective.KEY."""

    return resolve_objective(config.objective, method, preset_objective(config.adapter))


def loramoe_task_types(config: TrainConfig, task_names: tuple[str, ...], adapter_config: Any = None) -> np.ndarray | None:
    """LoRAMoE's type of every task id (1 = world knowledge) from `data.world_knowledge_tasks`;
    None where no type is needed. Named tasks must exist; LoRAMoE with its constraint on must name them.
    `adapter_config`: the run's AdapterConfig (presets applied); None reads the method from config.adapter."""

    wk = config.data.world_knowledge_tasks
    table = None if wk is None else task_type_table(task_names, wk)
    ac = adapter_config
    if ac is None:  # the method only: resolved the way adapter_config_from resolves it
        _refuse_adapter_weights(config.adapter)
        ac = AdapterConfig(method=apply_preset(config.adapter).get("method", "lora"))
    if "task_types" not in ac.spec.batch_needs:  # only LoRAMoE's constraint reads task types
        return None
    if table is None and run_objective(config, ac.method).loramoe_coef:
        raise MoeLoraError(
            "LoRAMoE's localized balancing constraint needs each example's task type: set data.world_knowledge_tasks "
            f"to the world-knowledge task names (type 1; the rest are type 0), some of {list(task_names)}, "
            "or set objective.loramoe_coef=0"
        )
    return table


def check_config(config: TrainConfig, model_path: Any = None) -> Any:
    """Check everything that needs neither the weights nor the data, and return the AdapterConfig.

    The adapter section (unknown keys, types, values) is checked against the model's
    config.json; an allocation given as counts or a file is resolved and checked too. An
    AlphaLoRA recipe needs the weights' spectra: its counts are checked after the load, so
    the returned config then has no allocation. The other sections were checked when the
    TrainConfig was built. Cheap: call it before tokenizing data, loading weights or writing.
    """

    path = resolve_model_path(config.model.path) if model_path is None else model_path
    model_config = load_llama_config(path)
    raw = dict(config.adapter)
    spec = raw.get("allocation")
    if isinstance(spec, Mapping) and str(spec.get("method")) == "alphalora":
        ac = adapter_config_from({**raw, "allocation": None}, None, model_config, validate=False)
    else:
        ac = adapter_config_from(raw, None, model_config)
    run_objective(config, ac.method)  # a weight the method does not use fails here, before anything loads
    return ac



def build_run(config: TrainConfig, *, progress: bool = True) -> Run:
    mesh = make_mesh(config.mesh)
    path = resolve_model_path(config.model.path)
    early_ac = check_config(config, path)  # the whole config, adapter included, before data and weights
    tokenizer = load_tokenizer(path)  # before the weights: a bad template or data fails fast
    loop = config.loop
    data = make_train_data(
        config.data, tokenizer, loop.global_batch, process_index=jax.process_index(),
        process_count=jax.process_count(), data_parallel=data_parallel_size(mesh), grad_accum=loop.grad_accum,
    )
    task_types = loramoe_task_types(config, data.task_names, early_ac)  # before the weights: a bad list fails fast
    overrides = dict(param_dtype=config.model.param_dtype, dtype=config.model.dtype)
    model_config = load_llama_config(path).replace(remat=config.model.remat, scan_layers=config.model.scan_layers, **overrides)
    base_sh = param_shardings(LlamaForCausalLM(model_config), mesh)["params"]
    # streamed into its shards: each process reads only the slices its devices hold (docs/loading.md)
    model_config, base = load_llama(path, shardings=base_sh, progress=progress and jax.process_index() == 0, **overrides)
    model_config = model_config.replace(remat=config.model.remat, scan_layers=config.model.scan_layers)
    ac = adapter_config_from(config.adapter, base, model_config, progress=progress)
    if scans(model_config, ac):  # the scanned model reads the decoder layers stacked over `layers`, once
        base_sh = stack_layers(base_sh)
        base = jax.jit(stack_layers, out_shardings=base_sh)(base)
    objective = run_objective(config, ac.method)
    if objective.contrastive_coef:  # the contrastive loss reads every expert's output: the model sows them
        ac = ac.replace(sow_expert_outputs=True)
    return Run(
        config=config, model_path=path, model=LlamaForCausalLM(model_config, ac), model_config=model_config,
        adapter_config=ac, base=base, base_shardings=base_sh, tokenizer=tokenizer, data=data, mesh=mesh,
        optimizer=make_optimizer(config.optim, loop.steps), schedule=make_schedule(config.optim, loop.steps),
        task_types=task_types, objective=objective,
    )


def _batch_for_step(batch: Mapping[str, np.ndarray], ac: Any, task_types: np.ndarray | None = None) -> dict[str, np.ndarray]:
    out = dict(batch)
    if ac is not None and "task_types" in ac.spec.batch_needs and task_types is not None:
        # LoRAMoE's constraint wants a type per example: 1 where its task is in data.world_knowledge_tasks.
        out["task_types"] = np.asarray(task_types, np.int32)[out["task_id"]]
    out.pop("task_id", None)
    return out


# ----------------------------------------------------------------------------- run directory
RUN_MARKER = "config.yaml"  # every run directory has one: written before the first step


def _checkpoint_dir(config: TrainConfig) -> Path:
    return Path(config.checkpoint.dir) if config.checkpoint.dir else Path(config.output_dir) / "checkpoints"


def check_output_dir(config: TrainConfig) -> None:
    """Refuse, before any work, an output_dir that holds something other than this kind of run.

    Allowed: absent, empty, or a run directory (config.yaml). Refused: a file, a non-empty
    directory of other files, and a final adapter/ without a checkpoint that shows whose it is.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise MoeLoraError(f"output_dir {out} is a file: choose a directory")
    if not out.is_dir():
        return
    entries = [p.name for p in out.iterdir() if p.name != ".lock" and ".partial-" not in p.name]
    if entries and RUN_MARKER not in entries:
        raise MoeLoraError(
            f"output_dir {out} is not empty and holds no run ({RUN_MARKER} is missing; it has e.g. {sorted(entries)[0]}): "
            "choose a new output_dir; nothing was written"
        )
    ckpt_dir = _checkpoint_dir(config)
    has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if (out / "adapter").exists() and not has_ckpt:
        raise MoeLoraError(
            f"{out / 'adapter'} holds a final adapter but {ckpt_dir} has no checkpoint to show which run wrote it: "
            "choose a new output_dir (or move that adapter away); nothing was written"
        )


def _drop_replayed_metrics(path: Path, start: int) -> int:
    """Keep the metrics rows up to the checkpoint the run resumes from (step `start`); return how many were dropped.

    Rows past it (and a line cut short by a kill) are logged again by the resumed run.
    """
    import json

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if step < start or (step == start and start > 0):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept), overwrite=True)
    return dropped


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
    as an interruption would; `batch_hook(step, batch)` may rewrite a batch (tests use it).

    Holds the run directory's lock throughout; a second run in the same directory is refused."""
    import contextlib

    check_output_dir(config)  # a file or a foreign directory: refused before anything is read or made
    if run is None:
        check_config(config)  # a bad setting fails before anything is written, the lock file included
    with run_lock(config.output_dir, "train run") if is_main_process() else contextlib.nullcontext():
        check_output_dir(config)  # again, now that no other run can change it
        return _train(config, progress=progress, stop_after=stop_after, run=run, batch_hook=batch_hook)


def _train(
    config: TrainConfig,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    run: Run | None = None,
    batch_hook: Callable[[int, dict], dict] | None = None,
) -> RunResult:
    out_dir = Path(config.output_dir)
    main = is_main_process()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    run = run or build_run(config, progress=progress)
    ac, loop = run.adapter_config, config.loop

    meta = {
        "base_model": str(run.model_path),
        "base_fingerprint": base_fingerprint(unstack_layers(run.base)),  # per layer, as before stacking
        "adapter_config": ac.to_dict(),
        "objective": None if run.objective is None else run.objective.to_dict(),
        "train_config": config_to_dict(config),
    }
    ckpt = config.checkpoint
    store = CheckpointStore(Path(ckpt.dir) if ckpt.dir else out_dir / "checkpoints", keep=ckpt.keep, async_save=ckpt.async_save, meta=meta)
    try:
        changes: list[str] = []
        if store.latest_step() is not None:
            # another run's or a damaged checkpoint: refused before the state is built
            changes = resume_changes(store.check(store.latest_step()), meta)
        state = TrainState.create(init_adapter(run.model_config, run.adapter_config, jax.random.key(config.seed)), run.optimizer, seed=config.seed)
        state_sh = state_shardings(state, run.mesh)
        state = put_global(state, state_sh)
        restored = store.restore_latest(state)
    except BaseException:
        store.close()  # a refused or damaged checkpoint: stop orbax's threads before the error surfaces
        raise
    if restored is not None:
        state, data_state, _ = restored
        run.data.train.restore(data_state)
    start = int(state.step)
    # Scanned layers: the state stays stacked over layers between steps (train/state.py); checkpoints,
    # the final adapter and RunResult.state get each layer's exact shapes back.
    like, per_layer_sh = state_shapes(state), state_sh
    unstacked = lambda s: s  # noqa: E731
    if scans(run.model_config, ac):
        state_sh = stack_state(state_sh)
        state = jax.jit(stack_state, out_shardings=state_sh)(state)
        unstacked = jax.jit(lambda s: unstack_state(s, like), out_shardings=per_layer_sh)
    if main:  # the checkpoint (if any) is this run's: only now is anything written
        save_resolved(config, out_dir)
        if ac.allocation is not None and not (out_dir / "allocation.json").exists():
            ac.allocation.to_json(out_dir / "allocation.json")
        if restored is not None:
            print(f"resumed from step {start} ({store.directory / str(start)})", flush=True)
            for line in changes:  # weights and regularisers are not the adapter's identity: a change is allowed
                print(f"resume: {line} (resume continues)", flush=True)
        if start >= loop.steps:
            print(f"the run in {out_dir} already finished at step {start} (loop.steps={loop.steps}): nothing to train"
                  + ("" if start > loop.steps else "; raise loop.steps to train further"), flush=True)
        dropped = _drop_replayed_metrics(out_dir / "metrics.jsonl", start)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} row(s) after step {start}, which this run logs again", flush=True)

    step_fn = make_train_step(run.model, ac, run.optimizer, grad_accum=loop.grad_accum, lr_schedule=run.schedule, mesh=run.mesh,
                              objective=run.objective, state_like=like)
    steps = CompiledSteps(step_fn, run.mesh, state, state_sh, run.base, run.base_shardings)
    eval_step = jax.jit(make_eval_step(run.model, ac, objective=run.objective))

    def validate() -> float | None:
        split = run.data.validation
        if split is None:
            return None
        ce_sum = n = 0.0
        for batch in eval_batches(split, loop.global_batch, run.data.train.pad_id, limit=loop.eval_batches,
                                  process_index=jax.process_index(), process_count=jax.process_count()):
            batch = _batch_for_step({k: v for k, v in batch.items() if k != "example_index"}, ac, run.task_types)
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
            batch = _batch_for_step(next(run.data.train), ac, run.task_types)
            if batch_hook is not None:
                batch = batch_hook(step, batch)
            state, metrics = steps(state, run.base, shard_batch(batch, run.mesh))
            done = step + 1
            tokens_since += float(np.sum(batch["attention_mask"])) * jax.process_count()
            if int(metrics["nonfinite"]):
                what = describe_nonfinite(metrics["nonfinite/flags"], metrics["nonfinite/leaf"], like.adapter, like.opt_state)
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
                store.save(done, unstacked(state), run.data.train.state())
            bar.update(1, loss=f"{float(metrics['loss']):.4f}")
        result.step = int(state.step)
        state = unstacked(state)
    finally:
        bar.close()
        store.close()
        writer.close()
    result.state = state
    if main and result.step == loop.steps:
        # always this run's final state: replaces (in one step) the adapter of a shorter run being extended
        adapter_dir = out_dir / "adapter"
        # the saved adapter serves inference: it does not sow the contrastive loss's expert outputs
        save_adapter(adapter_dir, jax.device_get(state.adapter), ac.replace(sow_expert_outputs=False), run.model_config,
                     base_model_name_or_path=str(run.model_path), replace=True)
        result.adapter_dir = adapter_dir
    if main and (out_dir / "metrics.jsonl").is_file() and (out_dir / "metrics.jsonl").stat().st_size:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")  # also after a kill between adapter and plot
    return result
