"""The study runner: every arm x seed a train run under OUT/<arm>/seed<k>/, then evaluation, then the report.

    results = run_study(load_study("experiments/reproduce/quick.yaml"), "runs/quick")

OUT holds:

    study.json           the resolved study and its content hash (a different study here is refused)
    results.json         per arm: trainable params, mean / std (ddof 1) / values over seeds of each metric
    results.md           the same as a table
    loss_curves.png, metrics_bars.png, exact_match_per_task.png
    <arm>/seed<k>/       a normal train run directory, plus sweep_result.json once evaluated

Resume: a run with adapter/ and a successful sweep_result.json is skipped; any other run is
trained through `train`, which resumes from the run's last checkpoint (or does nothing when
it had finished) and is then evaluated. A run that fails (an exception in set-up, training
or evaluation) is recorded in results.json with its error and retried by the next call;
the other runs go on. Runs are in-process, one after the other: JAX is imported once.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from moe_lora_jax.atomic import run_lock, write_json_atomic
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.sweep.aggregate import aggregate
from moe_lora_jax.sweep.analyses import run_analyses
from moe_lora_jax.sweep.plan import RunSpec, budget_warning, count_params, plan_runs, trainable_params
from moe_lora_jax.sweep.study import Study

STUDY_FILE = "study.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RUN_RESULT = "sweep_result.json"


# ----------------------------------------------------------------------------- the study directory
def default_out_dir(study: Study) -> Path:
    return Path("runs") / ("sweep-" + (study.path.stem if study.path is not None else "study"))


def check_study_dir(out_dir: str | Path, study: Study) -> None:
    """Refuse, before any work, an OUT that is a file, holds something else, or holds another study."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoeLoraError(f"--out {out} is a file: choose a directory")
    if not out.is_dir() or not any(p for p in out.iterdir() if p.name != ".lock" and ".partial-" not in p.name):
        return
    marker = out / STUDY_FILE
    if not marker.is_file():
        raise MoeLoraError(f"--out {out} is not empty and holds no study ({STUDY_FILE} is missing): choose a new --out; nothing was written")
    try:
        stored = json.loads(marker.read_text()).get("hash")
    except (ValueError, AttributeError):
        stored = None
    if stored != study.content_hash():
        raise MoeLoraError(
            f"--out {out} is not empty: it holds the results of a different study (hash {str(stored)[:12]}, this one {study.content_hash()[:12]}): "
            "choose a new --out, or rerun the study (file, --overlay and --set) that made it; nothing was written"
        )


def _write_study_marker(out: Path, study: Study) -> None:
    if (out / STUDY_FILE).exists():
        return
    write_json_atomic(out / STUDY_FILE, {"hash": study.content_hash(), "file": None if study.path is None else str(study.path),
                                          "study": study.to_dict()}, default=str)


# ----------------------------------------------------------------------------- one run
def _metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    from moe_lora_jax.train.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def _final_eval_loss(rows: list[dict[str, Any]], steps: int) -> float | None:
    evals = [r for r in rows if "eval/loss" in r and r["step"] == steps]
    return float(evals[-1]["eval/loss"]) if evals else None


def _tokens_per_s(rows: list[dict[str, Any]]) -> float | None:
    """Median train tokens/s over the logged intervals; the first includes compilation and is left out when others exist."""
    tps = [float(r["tokens_per_second"]) for r in rows if "tokens_per_second" in r]
    if len(tps) > 1:
        tps = tps[1:]
    return float(np.median(tps)) if tps else None


def _eval_records(config: Any, ev: Mapping[str, Any]) -> list[dict[str, Any]]:
    from moe_lora_jax.data import load_records

    data = config.data
    source = data.test if ev["split"] == "test" else data.validation if ev["split"] == "validation" else data.train
    rows = load_records(source, ev["split"], bundled_seed=data.bundled_seed, bundled_size=data.bundled_size)
    return list(rows[: ev["examples"]])


def execute_run(spec: RunSpec, study: Study, *, progress: bool = False) -> dict[str, Any]:
    """Train (or resume, or find finished) one run, evaluate it, run the analyses: the run's result record."""
    from moe_lora_jax.infer.evaluate import exact_match_eval
    from moe_lora_jax.train.loop import build_run, check_output_dir, train

    config = spec.config
    check_output_dir(config)  # a foreign directory is refused before the slow load
    t0 = time.perf_counter()
    run = build_run(config, progress=progress)
    result = train(config, progress=progress, run=run)
    if result.step < config.loop.steps:
        raise MoeLoraError(f"the run stopped at step {result.step} of {config.loop.steps}")
    adapter = result.state.adapter
    rows = _metrics_rows(spec.run_dir)
    metrics: dict[str, Any] = {"eval/loss": _final_eval_loss(rows, config.loop.steps), "train/tokens_per_s": _tokens_per_s(rows)}
    ev = study.eval
    if ev["examples"] > 0:
        records = _eval_records(config, ev)
        em = exact_match_eval(run.model, {"params": run.base, "adapter": adapter}, run.tokenizer, records, config.data.template,
                              batch_size=ev["batch_size"], max_new_tokens=ev["max_new_tokens"], task_field=config.data.task_field,
                              progress=progress)
        metrics.update(exact_match=em["accuracy"], exact_match_per_task=em["per_task"], exact_match_n=em["n"])
    record: dict[str, Any] = {"arm": spec.arm, "seed": spec.seed, "status": "ok", "trainable_params": count_params(adapter),
                              "metrics": metrics}
    dec = study.decode_benchmark
    if dec is not None and spec.arm in dec["arms"] and spec.seed == study.seeds[0]:
        from moe_lora_jax.sweep.decode import decode_tokens_per_s

        record["decode"] = decode_tokens_per_s(run.model, {"params": run.base, "adapter": adapter}, run.tokenizer, dec["prompt"],
                                               beams=dec["beams"], new_tokens=dec["new_tokens"], rounds=dec["rounds"])
    record["analyses"] = run_analyses(spec.run_dir, run.adapter_config)
    metrics["wall_s"] = time.perf_counter() - t0
    return record


def finished_record(run_dir: Path) -> dict[str, Any] | None:
    """The stored result of a run that finished and was evaluated; None otherwise."""
    path = run_dir / RUN_RESULT
    if not (run_dir / "adapter").is_dir() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    return record if record.get("status") == "ok" else None


# ----------------------------------------------------------------------------- the study
@contextlib.contextmanager
def compile_cache(path: Path):
    """JAX's persistent compilation cache in `path` for the study, unless the user set one: runs that differ
    only in seed compile the same programs, so every seed after the first loads them instead of compiling."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir:  # the user's own cache is used as it is
        yield
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    cc.reset_cache()  # the cache is set up once per process: make it read the new directory
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, MoeLoraError) else f"{type(e).__name__}: {text}"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_study(study: Study, out_dir: str | Path | None = None, *, progress: bool = False,
              log: Callable[[str], None] = lambda s: print(s, flush=True),
              execute: Callable[..., dict[str, Any]] = execute_run) -> dict[str, Any]:
    """Run (or resume) every arm x seed of `study` under `out_dir`; write and return results.json's object."""
    out = Path(out_dir) if out_dir is not None else default_out_dir(study)
    check_study_dir(out, study)
    runs = plan_runs(study, out)  # a config error names its arm, before anything is written
    with run_lock(out, "sweep"):
        check_study_dir(out, study)
        _write_study_marker(out, study)
        with compile_cache(out / ".compile_cache"):
            return _run(study, out, runs, progress=progress, log=log, execute=execute)


def _run(study: Study, out: Path, runs: list[RunSpec], *, progress: bool, log: Callable[[str], None],
         execute: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    from moe_lora_jax.sweep.report import write_report

    arm_names = [a.name for a in study.arms]
    trainable: dict[str, int | None] = {}
    arm_errors: dict[str, str] = {}
    first = {spec.arm: spec for spec in reversed(runs)}
    for name in arm_names:
        try:
            trainable[name] = trainable_params(first[name].config)
        except Exception as e:  # noqa: BLE001 - one arm's bad setting must not stop the others
            trainable[name], arm_errors[name] = None, _error_text(e)
    width = max(len(n) for n in arm_names)
    log("trainable parameters per arm:")
    for name in arm_names:
        log(f"  {name:<{width}}  " + (f"{trainable[name]:>12,}" if trainable[name] is not None else f"error: {arm_errors[name]}"))
    counts = {k: v for k, v in trainable.items() if v is not None}
    warning = None if study.compares_budgets else budget_warning(counts)
    if warning:
        log(warning)

    records: dict[tuple[str, int], dict[str, Any]] = {}
    todo = []
    for spec in runs:
        done = finished_record(spec.run_dir)
        if done is not None:
            records[(spec.arm, spec.seed)] = done
        else:
            todo.append(spec)
    log(f"sweep: {len(runs)} runs ({len(study.arms)} arms x {len(study.seeds)} seeds) in {out}; "
        f"{len(runs) - len(todo)} finished earlier, {len(todo)} to run")

    def save() -> dict[str, Any]:
        results = aggregate(arm_names, list(records.values()), trainable, study_hash=study.content_hash(), budget_warning=warning,
                            decode={r["arm"]: r["decode"] for r in records.values() if r.get("decode")})
        write_json_atomic(out / "results.json", results, overwrite=True, allow_nan=False, default=str)
        return results

    walls: list[float] = []
    for i, spec in enumerate(todo, 1):
        t0 = time.perf_counter()
        if spec.arm in arm_errors:
            record = {"arm": spec.arm, "seed": spec.seed, "status": "failed", "error": arm_errors[spec.arm]}
        else:
            try:
                record = execute(spec, study, progress=progress)
                write_json_atomic(spec.run_dir / RUN_RESULT, record, overwrite=True, allow_nan=True, default=str)
            except Exception as e:  # noqa: BLE001 - a failed run is recorded and retried next time; the others go on
                record = {"arm": spec.arm, "seed": spec.seed, "status": "failed", "error": _error_text(e)}
            walls.append(time.perf_counter() - t0)
        records[(spec.arm, spec.seed)] = record
        left = len(todo) - i
        eta = f"; ETA {_fmt_s(float(np.mean(walls)) * left)} for {left} more" if left and walls else ""
        if record["status"] == "ok":
            m = record["metrics"]
            em = "" if m.get("exact_match") is None else f", exact match {m['exact_match']:.3f}"
            loss = "n/a" if m.get("eval/loss") is None else f"{m['eval/loss']:.4f}"
            log(f"[{i}/{len(todo)}] {spec.arm} seed {spec.seed}: ok in {_fmt_s(time.perf_counter() - t0)}, eval/loss {loss}{em}{eta}")
        else:
            log(f"[{i}/{len(todo)}] {spec.arm} seed {spec.seed}: FAILED: {record['error']}{eta}")
        save()
    results = save()
    write_report(out, results, study, [records[(s.arm, s.seed)] for s in runs if records[(s.arm, s.seed)].get("status") == "ok"])
    failed = [r for r in records.values() if r.get("status") != "ok"]
    log(f"sweep: wrote {out / RESULTS_JSON}, {out / RESULTS_MD} and plots"
        + (f"; {len(failed)} run(s) failed (rerun the same command to retry them)" if failed else ""))
    return results
