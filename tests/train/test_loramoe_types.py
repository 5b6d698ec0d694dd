"""LoRAMoE: the localized constraint in the code's and the paper's form, and task types from the data config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from moe_lora_jax import MoeLoraError
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.data import task_type_table
from moe_lora_jax.losses import RouterStat, loramoe_localized, total_loss
from moe_lora_jax.objective import Objective
from moe_lora_jax.train.config import load_config
from moe_lora_jax.train.loop import _batch_for_step, loramoe_task_types, train

B, L, E = 4, 64, 4
TASKS = ("arithmetic", "date", "reverse", "sort")


def _stats(seed=0):
    rng = np.random.default_rng(seed)
    logits = [jnp.asarray(rng.normal(size=(B, L, E)).astype(np.float32)) for _ in range(2)]
    return [RouterStat(0, m, x, jax.nn.softmax(x, -1)) for m, x in zip(("gate_proj", "up_proj"), logits)]


def torch_paper_form(route_weight, task_types, delta):
    """The paper's equation for one linear: var(Z) / mean(Z), Z = I * Q (unbiased variance, as the code's CV^2)."""
    import torch

    t = task_types.view(-1, 1)
    first = torch.arange(E) < E // 2
    importance = torch.where(torch.where(t == 1, first, ~first), 1.0 + delta, 1.0 - delta)
    z = (route_weight.sum(dim=1) * importance).flatten()
    return z.var() / z.mean()


def test_paper_form_is_var_over_mean_a_factor_mean_z_from_the_code_form():
    import torch

    stats, types, delta = _stats(), np.array([1, 0, 0, 1]), 0.1
    batch = {"input_ids": jnp.zeros((B, L), jnp.int32), "task_types": jnp.asarray(types)}
    inter = {"layers_0": {"mlp": {s.module: {"router_logits": (s.logits,), "router_gates": (s.gates,)} for s in stats}}}

    @jax.jit  # one compile instead of one per eager op
    def values(t):
        out = {"code1": loramoe_localized(stats[:1], t, delta)[0], "paper1": loramoe_localized(stats[:1], t, delta, form="paper")[0]}
        for form in ("code", "paper"):
            ac = AdapterConfig(method="loramoe", num_experts=E)
            obj = Objective(loramoe_form=form, loramoe_coef=0.1)
            out[f"{form}_total"] = total_loss(jnp.zeros((B, L, 5)), dict(batch, task_types=t), inter, ac, obj)[1]["loramoe_blc"]
            out[form] = loramoe_localized(stats, t, delta, form=form)[0]
        return out

    v = {k: float(x) for k, x in values(jnp.asarray(types)).items()}
    ref = float(torch_paper_form(torch.tensor(np.asarray(stats[0].gates)), torch.tensor(types), delta))
    assert v["paper1"] == pytest.approx(ref, rel=1e-5)
    g = np.asarray(stats[0].gates, np.float64)
    imp = np.where(np.where(types[:, None] == 1, np.arange(E) < E // 2, np.arange(E) >= E // 2), 1 + delta, 1 - delta)
    mean_z = (g.sum(1) * imp).mean()
    assert v["paper1"] / v["code1"] == pytest.approx(mean_z, rel=1e-5)
    assert 14 < v["paper1"] / v["code1"] < 18  # about L / E = 16 at 64 tokens: the coefficients are not interchangeable
    # total_loss follows the config's form
    assert v["code_total"] == pytest.approx(v["code"], rel=1e-6) and v["paper_total"] == pytest.approx(v["paper"], rel=1e-6)
    assert v["paper"] > 10 * v["code"]


def test_task_types_come_from_the_named_tasks_not_the_alphabetical_index():
    table = task_type_table(TASKS, ["sort", "date"])
    np.testing.assert_array_equal(table, [0, 1, 0, 1])
    batch = {"input_ids": np.zeros((5, 3), np.int32), "task_id": np.array([0, 1, 2, 3, 3], np.int32)}
    out = _batch_for_step(batch, AdapterConfig(method="loramoe"), table)
    np.testing.assert_array_equal(out["task_types"], [0, 1, 0, 1, 1])
    assert "task_id" not in out
    assert "task_types" not in _batch_for_step(batch, AdapterConfig(method="mola"), table)
    with pytest.raises(MoeLoraError, match=r"names \['capitals'\], which no example has"):
        task_type_table(TASKS, ["sort", "capitals"])


def test_data_config_names_the_world_knowledge_tasks():
    cfg = load_config(None, ["adapter.method=loramoe", "data.world_knowledge_tasks=[sort,date]"])
    assert cfg.data.world_knowledge_tasks == ("sort", "date")
    np.testing.assert_array_equal(loramoe_task_types(cfg, TASKS), [0, 1, 0, 1])
    missing = load_config(None, ["adapter.method=loramoe"])
    assert missing.data.world_knowledge_tasks is None
    with pytest.raises(MoeLoraError, match=r"set data.world_knowledge_tasks .*some of \['arithmetic'.*objective.loramoe_coef=0"):
        loramoe_task_types(missing, TASKS)
    # not needed: the constraint is off, or another method
    assert loramoe_task_types(load_config(None, ["adapter.method=loramoe", "objective.loramoe_coef=0"]), TASKS) is None
    assert loramoe_task_types(load_config(None, ["adapter.method=mola"]), TASKS) is None
    with pytest.raises(MoeLoraError, match="capitals"):
        loramoe_task_types(load_config(None, ["adapter.method=mola", "data.world_knowledge_tasks=[capitals]"]), TASKS)


@pytest.mark.parametrize("overrides, message", [
    ([], "set data.world_knowledge_tasks"),
    (["data.world_knowledge_tasks=[capitals]"], r"names \['capitals'\], which no example has"),
])
def test_train_refuses_loramoe_without_valid_task_types(tiny_model_dir, tmp_path, overrides, message):  # noqa: F811
    config = tiny_config(tiny_model_dir, tmp_path / "run", "adapter.method=loramoe", "adapter.num_experts=4", *overrides)
    with pytest.raises(MoeLoraError, match=message):
        train(config, progress=False)
