"""`moe-lora routing` on a random adapter of the tiny model in a run directory: defaults from the run,
outputs, the summary, and the refusals."""

from __future__ import annotations

import json

import pytest
from conftest import init_adapter, randomize, tiny_config

from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.io import save_adapter
from moe_lora_jax.cli import main
from moe_lora_jax.convert import load_llama_config
from moe_lora_jax.train.config import save_resolved

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """RUN/config.yaml (the tiny train config: MoLA, 3 experts, 300 bundled examples) and RUN/adapter (random, on q and v)."""
    run = tmp_path_factory.mktemp("routing") / "run"
    run.mkdir()
    save_resolved(tiny_config(tiny_model_dir, run, "data.world_knowledge_tasks=[date]"), run)
    model_config = load_llama_config(tiny_model_dir)
    ac = AdapterConfig(method="mola", num_experts=3, rank=4, target_modules=("q", "v"))
    save_adapter(run / "adapter", randomize(init_adapter(model_config, ac)), ac, model_config)
    return run


def test_routing_reads_the_run_and_writes_every_applicable_analysis(run_dir, tmp_path, capsys):
    out = tmp_path / "routing"
    assert main(["routing", "--adapter", str(run_dir / "adapter"), "--max-examples", "18", "--batch-size", "8",
                 "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["expert_load.json", "expert_load.png",
                                                     "expert_redundancy.json", "expert_redundancy.png"]
    assert all((out / f).read_bytes()[:8] == PNG_MAGIC for f in ("expert_load.png", "expert_redundancy.png"))
    load = json.loads((out / "expert_load.json").read_text())
    assert load["analysis"] == "expert_load" and load["method"] == "mola"
    assert load["data"].startswith("the run's data (bundled") and load["template"] == "chat" and load["max_len"] == 96
    assert sum(load["examples_per_task"].values()) == 18 and len(load["tasks"]) == 6
    # q and v in each of the 2 layers, 3 experts, top-2
    assert [(r["layer"], r["module"]) for r in load["routers"]] == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    for r in load["routers"]:
        assert r["num_experts"] == 3 and r["top_k"] == 2 and len(r["load"]) == 6
        assert all(abs(sum(row) - 1.0) < 1e-6 and max(row) <= 0.5 + 1e-9 for row in r["load"])
    red = json.loads((out / "expert_redundancy.json").read_text())
    assert len(red["linears"]) == 4 and red["layers"][0]["num_experts"] == {"q_proj": 3, "v_proj": 3}
    assert f"expert_load: task separation" in stdout and f"wrote {out / 'expert_redundancy.png'}" in stdout


def test_routing_refuses_an_analysis_that_does_not_apply_and_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["routing", "--adapter", str(run_dir / "adapter"), "--analysis", "loramoe_groups", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "applies to loramoe, not to method mola" in err
    assert not out.exists()


def test_routing_refuses_a_plain_lora_adapter(tmp_path, capsys, tiny_model_dir):
    model_config = load_llama_config(tiny_model_dir)
    ac = AdapterConfig(method="lora", rank=2)
    save_adapter(tmp_path / "lora", init_adapter(model_config, ac), ac, model_config)
    assert main(["routing", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "o")]) == 2
    assert "no routing analysis applies to method lora" in capsys.readouterr().err


def test_the_sweep_hook_writes_the_applicable_analyses_once_and_reports_their_headlines(run_dir, tmp_path):
    import shutil

    from moe_lora_jax.sweep.analyses import run_analyses

    run = tmp_path / "seed0"
    shutil.copytree(run_dir, run)
    ac = AdapterConfig(method="mola", num_experts=3, rank=4, target_modules=("q", "v"))
    first = run_analyses(run, ac)
    assert sorted(first) == ["expert_load", "expert_redundancy"]
    load = json.loads((run / first["expert_load"]["json"]).read_text())
    red = json.loads((run / first["expert_redundancy"]["json"]).read_text())
    assert first["expert_load"]["task_separation"] == load["task_separation"] and 0 <= load["task_separation"] <= 1
    assert first["expert_redundancy"]["mean_cosine_distance"] == red["mean_cosine_distance"]
    assert (run / first["expert_load"]["png"]).read_bytes()[:8] == PNG_MAGIC
    stamp = (run / "routing" / "expert_load.json").stat().st_mtime_ns
    assert run_analyses(run, ac) == first  # a resumed study reads what is there
    assert (run / "routing" / "expert_load.json").stat().st_mtime_ns == stamp
    assert run_analyses(run, AdapterConfig(method="lora")) == {}  # nothing applies to plain LoRA
