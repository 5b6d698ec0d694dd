"""The shipped study files (experiments/reproduce/*.yaml, and each paper-scale overlay on the study it
names) parse with the runner's own checks: a typo in one fails here, not an hour into a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lora_jax.sweep.plan import plan_runs
from moe_lora_jax.sweep.study import load_study

REPRODUCE = Path(__file__).resolve().parents[2] / "experiments" / "reproduce"
STUDIES = sorted(p for p in REPRODUCE.glob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_parses_and_each_arm_is_a_valid_train_config(path, tmp_path):
    study = load_study(path)
    assert study.arms and study.seeds
    assert len({a.name for a in study.arms}) == len(study.arms)
    runs = plan_runs(study, tmp_path)  # builds each run's TrainConfig: a bad override raises here, naming its arm
    assert len(runs) == len(study.arms) * len(study.seeds)
    for run in runs:
        assert run.config.seed == run.seed and run.config.data.seed == run.seed


def test_the_five_studies_and_the_quick_one_are_shipped():
    assert {p.stem for p in STUDIES} == {"a_mola_shapes", "b_alphalora", "c_methods", "d_milora_ablations",
                                         "e_balance_losses", "quick"}


OVERLAYS = {"mola": "a_mola_shapes", "alphalora": "b_alphalora", "milora": "c_methods", "loramoe": "c_methods",
            "mixlora": "c_methods"}


@pytest.mark.parametrize("overlay, study", sorted(OVERLAYS.items()))
def test_every_paper_scale_overlay_applies_to_its_study(overlay, study):
    path = REPRODUCE / "paper_scale" / f"{overlay}.yaml"
    plain, big = load_study(REPRODUCE / f"{study}.yaml"), load_study(REPRODUCE / f"{study}.yaml", overlays=[path])
    assert big.base != plain.base and big.base["model"]["path"]  # the paper's model replaces the embedded one
    assert [a.name for a in big.arms] == [a.name for a in plain.arms]

