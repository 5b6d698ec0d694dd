"""`moe-lora generate` on the embedded model, and its argument errors."""

from __future__ import annotations

import io
import json

import pytest

from moe_lora_jax.cli import main


def test_generate_json_on_embedded_model(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion"].strip().startswith("Paris")
    assert len(out["tokens"]) == 4


def test_interactive_mode_reads_prompts_until_eof(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("The capital of France is\n\nThe capital of Italy is\n"))
    assert main(["generate", "--max-new-tokens", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2  # the blank line is skipped
    assert "Paris" in lines[0]["completion"] and "Rome" in lines[1]["completion"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "  "], "the prompt is empty"),
        (["--prompt", "hi", "--beams", "0"], "--beams=0 is out of range"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature=-1.0 is negative"),
        (["--prompt", "hi", "--top-p", "1.5"], "--top-p=1.5 is out of range"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens=0"),
        (["--prompt", "word " * 9000], "exceeds the model's context of 8192"),
    ],
)
def test_bad_generate_arguments_get_one_line(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
