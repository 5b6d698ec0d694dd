"""`moe-lora eval` and `moe-lora generate --adapter` on a tiny random model that carries SmolLM2's tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import init_adapter, randomize

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.adapters import AdapterConfig, save_adapter
from moe_lora_jax.cli import main
from moe_lora_jax.infer.evaluate import load_eval_records, multiple_choice_eval, parse_columns, perplexity_eval

PIQA = [
    {"goal": "How do you boil water?", "sol1": "Heat it in a pot.", "sol2": "Put it in the freezer.", "label": 0, "kind": "home"},
    {"goal": "How do you dry wet hands?", "sol1": "Wash them again.", "sol2": "Use a towel.", "label": 1, "kind": "home"},
    {"goal": "How do you open a jar?", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0, "kind": "kitchen"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer LLaMA with SmolLM2's vocabulary, its tokenizer saved next to it."""
    from conftest import make_hf_llama

    from moe_lora_jax.embedded import default_model_path
    from moe_lora_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    hf_dir, _ = make_hf_llama(tmp_path_factory.mktemp("cli_eval"), seed=5, vocab_size=len(tokenizer),
                              max_position_embeddings=256)
    tokenizer.save_pretrained(hf_dir)
    config, params = load_hf_llama(hf_dir)
    return hf_dir, config, params, tokenizer


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_eval_multiple_choice_table_and_json(tiny_dir, tmp_path, capsys):
    hf_dir, config, params, tokenizer = tiny_dir
    data = _jsonl(tmp_path / "piqa.jsonl", PIQA)
    columns = "question=goal,choices=sol1|sol2,task=kind"
    argv = ["eval", "--model", str(hf_dir), "--data", data, "--kind", "multiple-choice", "--columns", columns,
            "--json", str(tmp_path / "out.json"), "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "n", "acc", "acc_norm"]
    assert [line.split()[:2] for line in table[1:4]] == [["home", "2"], ["kitchen", "1"], ["all", "3"]]
    out = json.loads((tmp_path / "out.json").read_text())
    want = multiple_choice_eval(LlamaForCausalLM(config), {"params": params}, tokenizer,
                                load_eval_records(data, columns=parse_columns(columns)))
    assert out["kind"] == "multiple-choice" and out["n"] == 3
    assert out["accuracy"] == want["accuracy"] and out["per_task"] == want["per_task"]
    np.testing.assert_allclose([e["scores"] for e in out["examples"]], [e["scores"] for e in want["examples"]], rtol=1e-6)
    assert float(table[3].split()[2]) == pytest.approx(want["accuracy"], abs=5e-4)


def test_eval_perplexity_and_exact_match(tiny_dir, tmp_path, capsys):
    hf_dir, config, params, tokenizer = tiny_dir
    texts = [{"body": "The cat sat on the mat.", "t": "a"}, {"body": "Rain falls in spring.", "t": "b"}]
    data = _jsonl(tmp_path / "text.jsonl", texts)
    out_file = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(hf_dir), "--data", data, "--kind", "perplexity", "--columns", "text=body,task=t",
                 "--json", str(out_file), "--no-progress"]) == 0
    want = perplexity_eval(LlamaForCausalLM(config), {"params": params}, tokenizer, [{"text": r["body"]} for r in texts])
    got = json.loads(out_file.read_text())
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6) and got["tokens"] == want["tokens"]
    assert set(got["per_task"]) == {"a", "b"}
    capsys.readouterr()

    assert main(["eval", "--model", str(hf_dir), "--data", "bundled", "--limit", "4", "--max-new-tokens", "3",
                 "--json", str(tmp_path / "em.json"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "n", "exact"] and lines[-2].split()[:2] == ["all", "4"]
    em = json.loads((tmp_path / "em.json").read_text())
    assert em["n"] == 4 and sum(em["per_task_n"].values()) == 4
    assert em["accuracy"] == np.mean([e["match"] for e in em["examples"]])


def _save_lora(path, config, method="lora", seed=3):
    ac = AdapterConfig(method=method, rank=4, num_experts=2)
    adapter = randomize(init_adapter(config, ac), seed=seed, scale=0.3)
    save_adapter(path, adapter, ac, config)
    return str(path)


def test_generate_with_adapter_merged_and_unmerged(tiny_dir, tmp_path, capsys):
    hf_dir, config, _, _ = tiny_dir
    adapter = _save_lora(tmp_path / "lora", config)
    common = ["generate", "--model", str(hf_dir), "--prompt", "Once upon a time", "--max-new-tokens", "8", "--json"]

    def tokens(*extra):
        assert main([*common, *extra]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    plain, unmerged, merged = tokens(), tokens("--adapter", adapter), tokens("--adapter", adapter, "--merge")
    assert unmerged == merged and len(unmerged) == 8
    assert unmerged != plain  # the adapter changes the continuation


def test_adapter_that_does_not_fit_gets_one_line(tiny_dir, tmp_path, capsys):
    hf_dir, config, _, _ = tiny_dir
    wrong = _save_lora(tmp_path / "wrong", config.replace(hidden_size=40, head_dim=10))
    molora = _save_lora(tmp_path / "molora", config, method="molora")
    cases = [
        (["generate", "--model", str(hf_dir), "--prompt", "hi", "--adapter", wrong], "different base model"),
        (["eval", "--model", str(hf_dir), "--data", "bundled", "--limit", "1", "--adapter", wrong], "different base model"),
        (["generate", "--model", str(hf_dir), "--prompt", "hi", "--adapter", str(tmp_path)], "has no adapter_config.json"),
        (["generate", "--model", str(hf_dir), "--prompt", "hi", "--adapter", molora, "--merge"], "only plain LoRA can be merged"),
        (["generate", "--model", str(hf_dir), "--prompt", "hi", "--merge"], "--merge needs --adapter"),
        (["eval", "--model", str(hf_dir), "--data", "bundled", "--columns", "output"], "is not FIELD=COLUMN"),
        (["eval", "--model", str(hf_dir), "--data", "bundled", "--limit", "0"], "--limit=0"),
        (["eval", "--model", str(hf_dir), "--data", str(tmp_path / "missing.jsonl")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
