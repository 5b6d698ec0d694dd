"""`moe-lora analyze` and `moe-lora allocate` on the embedded SmolLM2, and their argument errors."""

from __future__ import annotations

import io
import json
import sys

import pytest

from moe_lora_jax.allocation import Allocation, mola_shape, scale_to_total
from moe_lora_jax.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """One `analyze` run (fix-finger, with plot) shared by the tests below: (json dict, stdout, png path)."""
    out = tmp_path_factory.mktemp("analyze")
    capture = pytest.MonkeyPatch()
    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        code = main(["analyze", "--json", str(out / "a.json"), "--plot", str(out / "a.png")])
    finally:
        capture.undo()
    assert code == 0
    return json.loads((out / "a.json").read_text()), buffer.getvalue(), out / "a.png"


def test_analyze_json_layout(analysis):
    doc, _, _ = analysis
    assert doc["estimator"] == "fix-finger"
    assert "4-bit quantized" in doc["quantization_note"]
    assert len(doc["matrices"]) == 210 and len(doc["layers"]) == 30
    first = doc["matrices"][0]
    assert (first["layer"], first["module"]) == (0, "q")
    assert {"alpha", "xmin", "lambda_max", "num_eigs"} <= set(first)
    assert {m["num_eigs"] for m in doc["matrices"] if m["module"] in ("k", "v")} == {192}
    assert {m["num_eigs"] for m in doc["matrices"] if m["module"] not in ("k", "v")} == {576}
    for layer in doc["layers"]:
        alphas = [m["alpha"] for m in doc["matrices"] if m["layer"] == layer["layer"]]
        assert layer["alpha"] == pytest.approx(sum(alphas) / 7, rel=1e-12)
        assert 1.0 < layer["alpha"] < 20.0
    assert all(m["xmin"] <= m["lambda_max"] for m in doc["matrices"])
    assert doc["modules"]["down"][5] == doc["matrices"][5 * 7 + 6]["alpha"]


def test_analyze_prints_a_table_and_writes_a_png(analysis):
    doc, stdout, png = analysis
    lines = stdout.splitlines()
    assert lines[0].startswith("PL_Alpha_Hill (fix-finger) of SmolLM2")
    assert lines[1].startswith("note: the embedded SmolLM2 weights are 4-bit quantized")
    row0 = next(line for line in lines if line.split()[:1] == ["0"])
    assert float(row0.split()[1]) == pytest.approx(doc["layers"][0]["alpha"], abs=6e-4)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000


def test_allocate_alphalora_uses_the_analysis(analysis, tmp_path, capsys):
    doc, _, _ = analysis
    out = tmp_path / "alloc.json"
    assert main(["allocate", "--method", "alphalora", "--total", "160", "--json", str(out), "--plot",
                 str(tmp_path / "alloc.png")]) == 0
    stdout = capsys.readouterr().out
    saved = json.loads(out.read_text())
    metric = [layer["alpha"] for layer in doc["layers"]]
    assert saved["provenance"]["layer_metric"] == pytest.approx(metric, rel=1e-12)
    # the authors' rounding by default, and their top_k: 2 if a layer has more than one expert, else 1
    assert saved["experts_per_layer"] == list(scale_to_total(metric, 160, 2.5, rounding="alphalora"))
    assert saved["top_k_per_layer"] == [2 if n > 1 else 1 for n in saved["experts_per_layer"]]
    assert saved["provenance"]["rounding"] == "alphalora"
    assert sum(saved["experts_per_layer"]) == 160 and min(saved["experts_per_layer"]) >= 1
    assert saved["provenance"]["beta"] == 2.5 and saved["provenance"]["estimator"] == "fix-finger"
    assert "4-bit" in saved["provenance"]["quantization_note"]
    assert Allocation.from_json(out).experts_per_layer == saved["experts_per_layer"]
    assert "experts_per_layer: " + ",".join(map(str, saved["experts_per_layer"])) in stdout
    assert (tmp_path / "alloc.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("method,shape", [("mola-2468", "2468"), ("mola-8228", "8228"), ("mola-8642", "8642"),
                                          ("mola-5555", "5555"), ("uniform", "5555")])
def test_allocate_shapes(method, shape, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["allocate", "--method", method, "--total", "120", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["experts_per_layer"] == list(mola_shape(shape, 30, 120)) and saved["method"] == method
    assert sum(saved["experts_per_layer"]) == 120
    assert f"{method}: 120 experts over 30 layers" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["allocate", "--method", "uniform", "--total", "29"], "cannot give 30 layers at least 1 each"),
        (["allocate", "--method", "alphalora", "--total", "20"], "cannot give 30 layers at least 1 each"),
        (["allocate", "--method", "alphalora", "--total", "90", "--beta", "0"], "--beta=0.0"),
        (["allocate", "--method", "alphalora", "--total", "90", "--beta", "nan"], "--beta=nan"),
        (["allocate", "--method", "uniform", "--total", "90", "--min-experts", "4"], "at least 4 each"),
        (["allocate", "--method", "mola-triangle", "--total", "90"], "old, ambiguous MoLA shape name"),
        (["allocate", "--method", "mola-inverted", "--total", "90"], "'mola-2468' is MoLA's inverted triangle"),
        (["allocate", "--method", "mola-diamond", "--total", "90"], "choose from alphalora, uniform, mola-8642"),
        (["allocate", "--method", "alphalora", "--total", "90", "--top-k", "0"], "--top-k=0"),
        (["analyze", "--plot", "x.jpg"], "give a .png file name"),
        (["analyze", "--model", "/nonexistent/model"], "does not exist"),
    ],
)
def test_bad_arguments_get_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith(f"moe-lora {argv[0]}: error:")
    assert not (tmp_path / "o.json").exists()


def test_outputs_are_never_overwritten(tmp_path, capsys):
    existing = tmp_path / "o.json"
    existing.write_text("keep")
    assert main(["allocate", "--method", "uniform", "--total", "90", "--json", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep"
    png = tmp_path / "p.png"
    png.write_text("keep")
    assert main(["analyze", "--json", str(tmp_path / "new.json"), "--plot", str(png)]) == 2
    assert "already exists" in capsys.readouterr().err and png.read_text() == "keep"
    assert not (tmp_path / "new.json").exists()
