"""`moe-lora sweep`: a real 2-arm x 2-seed study on the tiny model (schema, aggregation maths, resume of an
interrupted run, skipping finished runs, a failing arm that leaves the others intact, the budget warning),
and the study file's one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from conftest import tiny_overrides

from moe_lora_jax.cli import main
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.sweep import budget_warning, load_study, parse_study, run_study, summarize
from moe_lora_jax.sweep.plan import plan_runs
from moe_lora_jax.sweep.runner import execute_run
from moe_lora_jax.train.config import apply_overrides

STEPS = 2


def tiny_base(model_dir) -> dict:
    """The conftest's tiny run as a nested train config: 2 steps of LoRA on q and v (quick to compile), a checkpoint every step."""
    raw = apply_overrides({}, tiny_overrides(model_dir, "unused", f"loop.steps={STEPS}", "checkpoint.every=1", "adapter.method=lora",
                                             "adapter.rank=2", "adapter.target_modules=[q, v]"))
    raw.pop("output_dir")
    return raw


def study_mapping(model_dir, **extra) -> dict:
    return {
        "base": tiny_base(model_dir),
        "seeds": [0, 1],
        "eval": {"examples": 6, "max_new_tokens": 3, "batch_size": 6},
        "decode_benchmark": {"arms": ["lora"], "beams": [1, 2], "new_tokens": 3, "rounds": 1},
        "arms": [
            {"name": "lora", "set": {}},  # the base: rank 2
            {"name": "lora4", "set": {"adapter.rank": 4}},
            {"name": "broken", "set": {"adapter.rank": 0}},  # fails at start-up: recorded, the others go on
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory):
    """The study run once, after one run was interrupted at step 1 (its checkpoint kept)."""
    from moe_lora_jax.train.loop import train

    out = tmp_path_factory.mktemp("sweep") / "study"
    study = parse_study(study_mapping(tiny_model_dir))

    def interrupted(spec, study, **kw):  # the first run is killed after step 1's checkpoint
        train(spec.config, progress=False, stop_after=1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(study, out, log=lambda s: None, execute=interrupted)
    assert sorted(p.name for p in out.iterdir()) == [".compile_cache", "lora", "study.json"]
    logs: list[str] = []
    calls: list[tuple[str, int]] = []

    def counting(spec, study, **kw):
        calls.append((spec.arm, spec.seed))
        return execute_run(spec, study, **kw)

    results = run_study(study, out, log=logs.append, execute=counting)
    return out, study, results, logs, calls


def test_the_study_runs_and_results_have_the_schema_and_numpy_statistics(swept):
    out, study, results, logs, calls = swept
    assert calls == [("lora", 0), ("lora", 1), ("lora4", 0), ("lora4", 1)]  # the broken arm never reaches training
    assert json.loads((out / "results.json").read_text()) == results
    assert [a["name"] for a in results["arms"]] == ["lora", "lora4", "broken"]
    tasks = {"arithmetic", "sort", "reverse", "unit_conversion", "date", "word_count"}
    for arm in results["arms"][:2]:
        assert arm["seeds"] == [0, 1] and arm["failed"] == []
        m = arm["metrics"]
        per_task = {k.split("/", 1)[1] for k in m if k.startswith("exact_match/")}
        assert {"eval/loss", "exact_match", "train/tokens_per_s", "wall_s"} <= set(m) and per_task <= tasks and per_task
        for key, stats in m.items():
            assert set(stats) == {"mean", "std", "values"} and len(stats["values"]) == 2, key
            np.testing.assert_allclose(stats["mean"], np.mean(stats["values"]), rtol=1e-12)
            np.testing.assert_allclose(stats["std"], np.std(stats["values"], ddof=1), rtol=1e-12, atol=1e-15)
        # every seed's value is that run's own result file
        for seed, value in zip(arm["seeds"], m["eval/loss"]["values"]):
            run = json.loads((out / arm["name"] / f"seed{seed}" / "sweep_result.json").read_text())
            assert run["metrics"]["eval/loss"] == value and run["analyses"] == {}
            assert np.isfinite(value) and 5 < value < 15  # cross-entropy of a random 49k-vocabulary model
    # rank r on q (32 -> 32) and v (32 -> 16) of 2 layers: 2 * r * (64 + 48)
    assert [a["trainable_params"] for a in results["arms"]] == [448, 896, None]
    assert [line for line in logs if re.match(r"^\s+lora4\s+896$", line)]
    assert results["budget_warning"].startswith("warning: arms differ in trainable parameters")
    assert any(line.startswith("warning: arms differ") for line in logs)
    for name in ("results.md", "loss_curves.png", "metrics_bars.png", "exact_match_per_task.png", "study.json"):
        assert (out / name).stat().st_size > 200, name
    table = (out / "results.md").read_text()
    decode = results["arms"][0]["decode"]  # the first seed's, unmerged, for the arms the study names
    assert set(decode) == {"beam1", "beam2"} and "decode" not in results["arms"][1]
    assert all(d["tokens_per_s"] == pytest.approx(3 / d["median_s"]) and d["tokens_per_s"] > 0 for d in decode.values())
    assert "| lora | " in table.split("Decode speed")[1]
    assert "| lora | 448 | 2 |" in table and "- broken seed 0: rank=0 must be a positive integer" in table


def test_a_failing_arm_is_reported_and_the_others_are_kept(swept):
    out, _, results, logs, _ = swept
    broken = results["arms"][2]
    assert broken["seeds"] == [] and broken["trainable_params"] is None and broken["metrics"]["eval/loss"]["mean"] is None
    assert [f["seed"] for f in broken["failed"]] == [0, 1]
    assert "rank" in broken["failed"][0]["error"] and "\n" not in broken["failed"][0]["error"]
    assert [line for line in logs if "broken seed 1: FAILED" in line]
    assert not (out / "broken").exists() or not any((out / "broken").rglob("adapter"))
    progress = [line for line in logs if re.match(r"^\[\d/6\] ", line)]
    assert len(progress) == 6 and "ETA" in progress[0]


def test_an_interrupted_run_resumed_from_its_checkpoint(swept):
    out = swept[0]
    rows = [json.loads(line) for line in (out / "lora" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # step 1 once (before the kill), step 2 after the resume
    assert (out / "lora" / "seed0" / "checkpoints" / "1").is_dir()


def test_a_rerun_skips_finished_runs_and_retries_failed_ones(swept):
    out, study, results, _, _ = swept
    adapters = {p: p.stat().st_mtime_ns for p in out.rglob("adapter/*")}
    logs, calls = [], []
    again = run_study(study, out, log=logs.append, execute=lambda spec, study, **kw: calls.append(spec) or {})
    assert calls == []  # the broken arm fails at planning again; nothing is trained
    assert "4 finished earlier, 2 to run" in "\n".join(logs)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("adapter/*")} == adapters
    assert again["arms"][:2] == results["arms"][:2]


def test_another_study_in_the_same_directory_is_refused(swept, capsys):
    out, study, _, _, _ = swept
    other = parse_study({**study_mapping_from(study), "seeds": [0, 1, 2]})
    before = (out / "results.json").read_bytes()
    with pytest.raises(MoeLoraError, match=r"is not empty: it holds the results of a different study .* nothing was written"):
        run_study(other, out, log=lambda s: None)
    assert (out / "results.json").read_bytes() == before


def study_mapping_from(study) -> dict:
    d = study.to_dict()
    return {"base": d["base"], "seeds": d["seeds"], "arms": d["arms"], "eval": d["eval"]}


# ----------------------------------------------------------------------------- no training
def _fake(spec, study, **kw):
    if spec.arm == "b" and spec.seed == 1:
        raise RuntimeError("simulated crash\nwith a traceback line")
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "adapter").mkdir(exist_ok=True)
    return {"arm": spec.arm, "seed": spec.seed, "status": "ok", "trainable_params": 10,
            "metrics": {"eval/loss": 1.0 + spec.seed, "exact_match": 0.25 * spec.seed, "exact_match_per_task": {"sort": 0.5},
                        "train/tokens_per_s": 100.0, "wall_s": 1.0}}


def test_a_run_that_crashes_is_recorded_retried_and_budgets_can_be_declared_different(tiny_model_dir, tmp_path):
    raw = {"base": tiny_base(tiny_model_dir), "seeds": [0, 1], "compares_budgets": True, "eval": {"examples": 0},
           "arms": [{"name": "a", "set": {"adapter.method": "lora", "adapter.rank": 2}}, {"name": "b", "set": {}}]}
    logs: list[str] = []
    results = run_study(parse_study(raw), tmp_path / "s", log=logs.append, execute=_fake)
    b = results["arms"][1]
    assert b["seeds"] == [0] and b["failed"] == [{"seed": 1, "error": "RuntimeError: simulated crash"}]
    assert b["metrics"]["eval/loss"] == {"mean": 1.0, "std": None, "values": [1.0]}  # one seed: std is null
    assert results["arms"][0]["metrics"]["exact_match"] == summarize([0.0, 0.25])
    assert "budget_warning" not in results and not any("warning" in line for line in logs)  # declared: no warning
    calls = []
    run_study(parse_study(raw), tmp_path / "s", log=logs.append, execute=lambda s, st, **kw: calls.append((s.arm, s.seed)) or _fake(s, st))
    assert calls == [("b", 1)]  # only the failed run is retried


def test_summarize_and_budget_warning():
    assert summarize([1.0, 2.0, 4.0]) == {"mean": 7 / 3, "std": float(np.std([1, 2, 4], ddof=1)), "values": [1.0, 2.0, 4.0]}
    assert summarize([0.5]) == {"mean": 0.5, "std": None, "values": [0.5]}
    assert summarize([None, float("nan")]) == {"mean": None, "std": None, "values": []}
    assert budget_warning({"a": 1000, "b": 1050}) is None  # 5.0%: within
    assert "5.1%" in budget_warning({"a": 1000, "b": 1051}) and "b has 1,051, a has 1,000" in budget_warning({"a": 1000, "b": 1051})
    assert budget_warning({"a": 1000}) is None


# ----------------------------------------------------------------------------- the study file
BAD = [
    ("seeds: [0]\narms: [{name: a}]\n", r"missing 'base'"),
    ("base: {}\nseeds: []\narms: [{name: a}]\n", r"seeds must be a non-empty list"),
    ("base: {}\nseeds: [0, 0]\narms: [{name: a}]\n", r"repeat a seed"),
    ("base: {}\nseeds: [0]\narms: [{name: a}, {name: a}]\n", r"arm name 'a' is used twice"),
    ("base: {}\nseeds: [0]\narms: [{name: a/b}]\n", r"arm name 'a/b' must be letters"),
    ("base: {}\nseeds: [0]\narms: [{name: a, sett: {}}]\n", r"arms\[0\] has unknown key\(s\) \['sett'\]"),
    ("base: {}\nseeds: [0]\narms: [{name: a, set: {seed: 3}}]\n", r"sets seed, which the runner sets per run"),
    ("base: {}\nseeds: [0]\narms: [{name: a, set: {optim.lrr: 1}}]\n", r"arm 'a': unknown config key 'optim.lrr'"),
    ("base: {}\nseeds: [0]\narms: [{name: a, set: {loop.steps: many}}]\n", r"arm 'a': loop.steps='many' is not an integer"),
    ("base: missing.yaml\nseeds: [0]\narms: [{name: a}]\n", r"base config .*missing.yaml does not exist"),
    ("base: {}\nseeds: [0]\narms: [{name: a}]\neval: {exampels: 3}\n", r"unknown eval key\(s\) \['exampels'\]"),
    ("base: {}\nseeds: [0]\narms: [{name: a}]\nsteps: 3\n", r"unknown key\(s\) \['steps'\]"),
    ("base: {}\nseeds: [0]\narms: [{name: a}]\ndecode_benchmark: {arms: [b]}\n", r"decode_benchmark.arms names \['b'\]"),
    ("base: {}\nseeds: [0]\narms: [{name: a}]\ncompares_budgets: maybe\n", r"compares_budgets='maybe' must be true or false"),
    ("base: {\nseeds", r"is not valid YAML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m for _, m in BAD])
def test_bad_study_files_are_one_line_errors_and_write_nothing(tmp_path, capsys, text, message):
    study = tmp_path / "s.yaml"
    study.write_text(text)
    assert main(["sweep", "--study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_overlays_and_sets_change_the_study_and_its_hash(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"loop": {"steps": 40, "global_batch": 16}, "output_dir": "x", "seed": 3}))
    (tmp_path / "s.yaml").write_text("base: base.yaml\nseeds: [0, 1]\narms: [{name: a, set: {adapter.rank: 8}}]\n")
    (tmp_path / "paper.yaml").write_text("base: {loop: {steps: 1000}, model: {path: some/model}}\nseeds: [0, 1, 2]\n")
    plain = load_study(tmp_path / "s.yaml")
    assert plain.base == {"loop": {"steps": 40, "global_batch": 16}}  # output_dir and seed are the runner's
    big = load_study(tmp_path / "s.yaml", overlays=[tmp_path / "paper.yaml"], sets=["eval.examples=5", "optim.lr=1e-3"])
    assert big.base == {"loop": {"steps": 1000, "global_batch": 16}, "model": {"path": "some/model"}}
    assert big.seeds == (0, 1, 2) and big.eval["examples"] == 5 and big.train_sets == ("optim.lr=1e-3",)
    assert big.content_hash() != plain.content_hash()
    (tmp_path / "s.yaml").write_text("# a comment changes nothing\n" + (tmp_path / "s.yaml").read_text())
    assert load_study(tmp_path / "s.yaml").content_hash() == plain.content_hash()
    config = plan_runs(big, tmp_path / "out")[1].config
    assert (config.loop.steps, config.optim.lr, config.adapter["rank"], config.seed, config.data.seed) == (1000, 1e-3, 8, 1, 1)
    assert config.output_dir == str(tmp_path / "out" / "a" / "seed1")
