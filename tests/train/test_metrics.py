"""Metrics: routing statistics, JSONL writer, progress bar, loss plot."""

from __future__ import annotations

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lora_jax.train.metrics import (
    MetricsWriter,
    Progress,
    expert_importance,
    expert_load,
    layer_routing_stats,
    plot_losses,
    read_metrics,
    routing_entropy,
    routing_stats,
)

PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.15, 0.8, 0.05],
        [0.05, 0.15, 0.8],
        [0.6, 0.3, 0.1],
        [1 / 3, 1 / 3, 1 / 3],  # masked out below
    ],
    np.float32,
)
MASK = np.array([1, 1, 1, 1, 0])


def test_expert_load_and_importance():
    np.testing.assert_allclose(expert_load(PROBS, MASK, top_k=1), [0.5, 0.25, 0.25], rtol=1e-6)
    # top-2 assignments (0,1) (1,0) (2,1) (0,1): experts 0/1/2 get 3/4/1 of the 8
    np.testing.assert_allclose(expert_load(PROBS, MASK, top_k=2), [3 / 8, 4 / 8, 1 / 8], rtol=1e-6)
    np.testing.assert_allclose(expert_importance(PROBS, MASK), [0.375, 0.3625, 0.2625], rtol=1e-6)
    # without a mask the uniform row counts too
    np.testing.assert_allclose(expert_importance(PROBS), PROBS.mean(0), rtol=1e-6)
    # any leading shape is flattened: [B, L, E] with mask [B, L]
    np.testing.assert_allclose(expert_load(PROBS[:4].reshape(2, 2, 3), MASK[:4].reshape(2, 2)), [0.5, 0.25, 0.25])


def test_entropy_values():
    assert float(routing_entropy(np.full((4, 8), 1 / 8))) == pytest.approx(math.log(8), rel=1e-6)
    assert float(routing_entropy(np.eye(4))) == pytest.approx(0.0, abs=1e-7)  # exact zeros are fine
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    expected = np.mean([h(r) for r in PROBS[:4]])
    assert float(routing_entropy(PROBS, MASK)) == pytest.approx(expected, rel=1e-5)


def test_routing_stats_and_per_layer_means_under_jit():
    stats = jax.jit(lambda p, m: routing_stats(p, m, top_k=1, prefix="r"))(PROBS, MASK)
    load = np.array([0.5, 0.25, 0.25])
    assert float(stats["r/load_max"]) == pytest.approx(0.5) and float(stats["r/load_min"]) == pytest.approx(0.25)
    assert float(stats["r/load_cv2"]) == pytest.approx(load.var() / load.mean() ** 2, rel=1e-5)
    assert float(stats["r/entropy_norm"]) == pytest.approx(float(stats["r/entropy"]) / math.log(3), rel=1e-6)
    balanced = np.tile(np.eye(3), (2, 1))
    per_layer = layer_routing_stats({"layer_0": PROBS[:4], "layer_1": balanced}, top_k=1)
    assert float(per_layer["router/layer_1/load_cv2"]) == pytest.approx(0.0, abs=1e-7)
    assert float(per_layer["router/mean/load_max"]) == pytest.approx((0.5 + 1 / 3) / 2, rel=1e-6)
    assert "router/mean/load" not in per_layer and per_layer["router/layer_0/load"].shape == (3,)


def test_jsonl_writer(tmp_path):
    with MetricsWriter(tmp_path / "run", enabled=True) as w:
        w.write(1, {"loss": jnp.asarray(2.5), "lr": 1e-3, "eval/loss": float("nan"), "load": jnp.asarray([0.5, 0.5]), "note": "x"})
        w.write(2, {"loss": np.float32(1.25), "grad_norm": float("inf")})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 2.5, "lr": 1e-3, "eval/loss": "nan", "load": [0.5, 0.5], "note": "x"}
    with MetricsWriter(tmp_path / "run", enabled=True) as w:  # a resumed run appends
        w.write(3, {"loss": 1.0})
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isnan(records[0]["eval/loss"]) and records[1]["grad_norm"] == math.inf
    with MetricsWriter(tmp_path / "quiet", enabled=False) as w:  # not process 0: nothing written
        w.write(1, {"loss": 1.0})
    assert not (tmp_path / "quiet").exists()


def test_progress_bar(tmp_path):
    out = io.StringIO()
    with Progress(total=10, initial=2, enabled=True, file=out, mininterval=0) as bar:
        for _ in range(3):
            bar.update(1, loss=jnp.asarray(0.123456))
        assert bar.n == 5
    text = out.getvalue()
    assert "5/10" in text and "loss=0.1235" in text and "<" in text  # tqdm's elapsed<remaining
    silent = Progress(total=10, enabled=False)
    silent.update(1, loss=1.0)
    assert silent.n == 0


def test_plot_losses(tmp_path):
    records = [{"step": s, "loss": 3.0 / (s + 1)} for s in range(20)] + [{"step": 10, "eval/loss": 0.5}]
    png = plot_losses(records, tmp_path / "plots" / "loss.png", title="quick")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["loss.png"]  # no temporary left behind


def test_tensorboard_mirror_when_available(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeSummaryWriter:
        def __init__(self, logdir):
            calls.append(("open", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    with MetricsWriter(tmp_path, enabled=True) as w:
        w.write(7, {"loss": jnp.asarray(0.5), "load": [0.5, 0.5], "note": "text"})
    # only scalars reach TensorBoard; vectors and strings stay in the JSONL
    assert calls == [("open", str(tmp_path / "tensorboard")), ("loss", 0.5, 7), ("close",)]
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # not installed: silently skipped
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with MetricsWriter(tmp_path / "b", enabled=True) as w:
        w.write(1, {"loss": 1.0})
    assert w._tb is None and (tmp_path / "b" / "metrics.jsonl").exists()
