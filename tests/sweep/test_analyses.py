"""The sweep's headline numbers from the routing analyses' JSON documents."""

from __future__ import annotations

import pytest

from moe_lora_jax.sweep.analyses import HEADLINES, headline


def test_a_scalar_headline_is_read_as_is():
    assert headline({"task_separation": 0.25}, "task_separation") == 0.25
    assert headline({"task_separation": None}, "task_separation") is None


def test_a_per_layer_headline_is_the_mean_over_the_layers_that_define_it():
    # MiLoRA's module selection: one separation per layer, None where a layer saw fewer than two tasks
    assert headline({"task_separation": [0.5, None, 0.1, 0.3]}, "task_separation") == pytest.approx(0.3)
    assert headline({"task_separation": [None, None]}, "task_separation") is None


def test_every_routed_method_has_a_task_separation_headline():
    assert HEADLINES["expert_load"] == HEADLINES["milora_modules"] == "task_separation"
