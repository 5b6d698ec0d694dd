"""Input validation: data read exactly as written, errors that name the file and line, and every
setting or flag refused in one line before data is tokenized or weights are loaded.

Most tests need no weights: a model directory with only config.json (and a tokenizer where the data
must be tokenized) shows that a check comes first, since reaching the weights would fail differently.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moe_lora_jax.cli import main
from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.data.pipeline import load_records, tokenize_split
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.train.config import OptimConfig, load_config

TINY = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, eos_token_id=(2,))


class CharTokenizer:
    """One token per character, BOS=1 on prompts, EOS=2 (enough for the alpaca template)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [([1] if add_special_tokens else []) + [ord(c) % 97 for c in t] for t in texts]}


def config_only_dir(path, **changes):
    """A model directory holding config.json only: no tokenizer, no weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TINY.to_hf(), **changes}))
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- 4: data as written
LOOKALIKES = ["007", "1.50", "1e3", "true", "NaN", "null"]


def test_jsonl_strings_are_read_as_written_and_non_strings_are_refused_with_the_line(tmp_path):
    rows = [{"instruction": f"q{i}", "output": v, "input": v} for i, v in enumerate(LOOKALIKES)]
    path = write_jsonl(tmp_path / "train.jsonl", [*rows, "", {"instruction": "q", "output": 7}])
    records = load_records(path)
    # `datasets` turned this column into 7, 1.5, 1000.0, True, None, None because of the 7 below
    assert [r["output"] for r in records[:6]] == LOOKALIKES and [r["input"] for r in records[:6]] == LOOKALIKES
    assert records[6]["output"] == 7 and records.lines == (1, 2, 3, 4, 5, 6, 8)
    with pytest.raises(MoeLoraError) as info:
        tokenize_split(records, CharTokenizer(), "alpaca", max_len=64, name="train")
    assert str(info.value).startswith(f"train: {path} line 8 has a number in 'output' (7), not a string")
    split = tokenize_split(records[:6], CharTokenizer(), "alpaca", max_len=256)
    assert [e["output"] for e in split.examples] == LOOKALIKES
    # the response tokens are the characters as written, then EOS
    assert [int(t) for t in split.tokens[0][split.prompt_lens[0]:]] == [ord(c) % 97 for c in "007"] + [2]


@pytest.mark.parametrize(
    "field, value, kind",
    [("output", ["a", "b"], "a list"), ("input", {"k": 1}, "a dict"), ("instruction", True, "a boolean"),
     ("output", 1.5, "a number")],
)
def test_lists_dicts_and_scalars_in_text_fields_are_errors(tmp_path, field, value, kind):
    row = {"instruction": "i", "input": "x", "output": "o", field: value}
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}, row])
    with pytest.raises(MoeLoraError, match=rf"d.jsonl line 2 has {kind} in '{field}'"):
        tokenize_split(load_records(path), CharTokenizer(), "alpaca", max_len=64)


def test_perplexity_text_that_is_a_list_is_an_error(tmp_path):
    from moe_lora_jax.infer.evaluate import _perplexity_rows, load_eval_records

    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "fine"}, {"text": ["a", "b"]}])
    with pytest.raises(MoeLoraError, match=r"p.jsonl line 2 has a list in 'text', not a string"):
        _perplexity_rows(CharTokenizer(), load_eval_records(str(path)), "alpaca", 64)


def test_null_output_is_named_as_null_not_missing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": None}])
    with pytest.raises(MoeLoraError, match=r"d.jsonl line 1 has 'output': null \(fields present: instruction, output\)"):
        tokenize_split(load_records(path), CharTokenizer(), "alpaca", max_len=64)


def test_eval_records_keep_strings(tmp_path):
    from moe_lora_jax.infer.evaluate import load_eval_records

    path = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "007"}, {"instruction": "b", "output": 7}])
    assert load_eval_records(str(path))[0]["output"] == "007"  # was 7, so eval's JSON said "reference": 7


# ----------------------------------------------------------------------------- 5: errors name the place
@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output" "b"}\n',
         r"bad.jsonl line 3 is not valid JSON \(Expecting ':' delimiter at column 31\)"),
        ("empty.jsonl", "", "empty.jsonl is empty"),
        ("blank.jsonl", "\n  \n", "blank.jsonl is empty"),
        ("list.jsonl", '{"instruction": "a"}\n[1, 2]\n', "list.jsonl line 2 is a JSON list, not an object"),
        ("bad.json", '[{"instruction": "a"},\n {"output" 1}]', r"bad.json is not valid JSON \(Expecting ':' delimiter at line 2"),
        ("empty.json", "[]", "empty.json is empty"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(MoeLoraError, match=message):
        load_records(tmp_path / name)


def test_json_file_forms_still_load(tmp_path):
    rows = [{"instruction": "a", "output": "1.0"}, {"instruction": "b", "output": "x", "task": "t"}]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_records(tmp_path / "list.json") == rows == load_records(tmp_path / "lines.json")


def test_eval_names_the_flag_file_and_line_before_loading_the_model(tmp_path, capsys):
    nowhere = str(tmp_path / "no_model")  # reaching the model would fail with "does not exist"
    assert main(["eval", "--model", nowhere, "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = one_line_error(capsys)
    assert "missing.jsonl does not exist: check the path in --data" in err and "data.test" not in err
    data = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}])
    assert main(["eval", "--model", nowhere, "--data", str(data)]) == 2
    assert f"{data} line 2 lacks the field 'output'" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 6, 7: values refused
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.clip_norm=-1", "optim.clip_norm=-1.0 must be positive"),
        ("optim.clip_norm=0", "use null for no clipping"),
        ("optim.eps=0", "optim.eps=0.0 must be positive"),
        ("optim.lr=nan", "optim.lr=nan is not a finite number"),
        ("optim.router_lr=inf", "optim.router_lr=inf is not a finite number"),
        ("optim.b2=1", r"optim.b2=1.0 must be in \[0, 1\)"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
        ("optim.router_patterns=[\"(\"]", r"optim.router_patterns\[0\]='\(' is not a valid regular expression"),
    ],
)
def test_bad_optimizer_values_are_refused(override, message):
    with pytest.raises(MoeLoraError, match=message):
        load_config(None, [override])


def test_negative_clip_norm_would_reverse_the_update():
    """Why clip_norm=-1 is refused: optax scales the gradient by clip_norm / norm, flipping its sign."""
    import jax.numpy as jnp
    import optax

    from moe_lora_jax.train.optim import make_optimizer

    grads = {"w": jnp.asarray([3.0, 4.0])}
    flipped, _ = optax.clip_by_global_norm(-1.0).update(grads, optax.clip_by_global_norm(-1.0).init(grads))
    np.testing.assert_allclose(flipped["w"], [-0.6, -0.8], rtol=1e-6)
    import dataclasses
    import types

    duck = types.SimpleNamespace(**{**dataclasses.asdict(OptimConfig()), "clip_norm": -1.0})  # skipped the config's checks
    with pytest.raises(MoeLoraError, match="clip_norm=-1.0 must be positive"):
        make_optimizer(duck, 10)


@pytest.mark.parametrize("eps", [0.0, -1e-6, math.nan])
def test_rms_norm_eps_must_be_positive(tmp_path, eps):
    from moe_lora_jax.convert import load_llama_config

    with pytest.raises(MoeLoraError, match="rms_norm_eps=.* must be a positive finite number"):
        TINY.replace(rms_norm_eps=eps)
    with pytest.raises(MoeLoraError, match="rms_norm_eps"):
        load_llama_config(config_only_dir(tmp_path / "m", rms_norm_eps=eps))


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "holds a JSON list, not an object"),
        ({**TINY.to_hf(), "num_attention_heads": None}, "num_attention_heads is null, not a positive integer"),
        ({**TINY.to_hf(), "hidden_size": "16"}, 'hidden_size is "16", not a positive integer'),
        ({**TINY.to_hf(), "num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive integer"),
    ],
)
def test_malformed_config_json_is_one_line(tmp_path, content, message, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(content))
    assert main(["info", "--model", str(d)]) == 2
    assert message in one_line_error(capsys)


def test_non_float_norm_tensor_is_refused(tmp_path):
    from safetensors.numpy import save_file

    from moe_lora_jax import load_hf_llama
    from moe_lora_jax.convert.names import tensor_specs

    d = config_only_dir(tmp_path / "m")
    rng = np.random.default_rng(0)
    tensors = {s.hf_name: rng.normal(size=s.hf_shape).astype(np.float32) for s in tensor_specs(TINY)}
    save_file(tensors, str(d / "model.safetensors"))
    assert load_hf_llama(d)[0] == TINY.replace(param_dtype="float32")  # the float file loads
    tensors["model.norm.weight"] = np.ones(TINY.hidden_size, np.int32)  # was silently cast to 1.0
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(MoeLoraError, match="tensor model.norm.weight in model.safetensors is stored as I32, not floating point"):
        load_hf_llama(d)


# ----------------------------------------------------------------------------- 7, 8, 10: adapter settings before any work
@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.rank=abc", "rank='abc' is not an integer"),
        ("adapter.alpha=abc", "alpha='abc' is not a number"),
        ("adapter.num_experts=abc", "num_experts='abc' is not an integer"),
        ("adapter.top_k=null", "top_k=null is not allowed"),
        ("adapter.router_jitter=-1", "router_jitter=-1 must be in [0, 1)"),
        ("adapter.alpha=.nan", "alpha=nan is not a finite number"),
        ("adapter.rnak=4", "unknown adapter key(s) ['rnak']"),
        ("adapter.rank=64", "rank=64 is larger than the q_proj linear"),
    ],
)
def test_bad_adapter_settings_fail_in_one_line_before_data_or_weights(tmp_path, capsys, override, message):
    model = config_only_dir(tmp_path / "m")  # no tokenizer, no weights: reaching either fails differently
    (tmp_path / "c.yaml").write_text("loop:\n  steps: 2\n")
    out = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--set", f"model.path={model}", "--set", override,
            "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()  # nothing was written either


def test_numeric_strings_in_float_adapter_fields_are_numbers():
    from moe_lora_jax.adapters import AdapterConfig

    from moe_lora_jax.objective import Objective

    ac = AdapterConfig(method="mola", router_init_range="1e-3", rank=8.0)  # YAML reads 1e-3 as a string
    assert ac.router_init_range == 1e-3 and ac.rank == 8 and isinstance(ac.rank, int)
    assert Objective(switch_coef="1e-3").switch_coef == 1e-3


def test_train_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("loop:\n  steps: 2\n")
    (tmp_path / "taken").write_text("notes")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "taken")]) == 2
    assert "--output-dir" in (err := one_line_error(capsys)) and "is a file, not a directory" in err
    assert (tmp_path / "taken").read_text() == "notes"


def test_empty_config_says_it_trains_with_defaults(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    model = tmp_path / "no_model"  # stops at the model's config, after announcing the run
    assert main(["train", "--config", str(tmp_path / "empty.yaml"), "--set", f"model.path={model}",
                 "--output-dir", str(tmp_path / "run")]) == 2
    out = capsys.readouterr().out
    assert "empty.yaml is empty: training with every default setting" in out
    assert f"train: lora adapter on {model}, data bundled multi-task set, 1000 steps of 16 examples" in out


def test_loramoe_task_types_are_checked_over_the_whole_split_at_start_up(tmp_path):
    """Types come from data.world_knowledge_tasks, checked against every task of the split before the
    weights load (the model directory has none: reaching them would be another error). A rare third
    task used to fail at step 5, after two checkpoints; now it is simply type 0."""
    from moe_lora_jax.embedded import default_model_path
    from moe_lora_jax.tokenizer import load_tokenizer
    from moe_lora_jax.train.loop import build_run

    model = config_only_dir(tmp_path / "m", vocab_size=49152)  # a tokenizer, but no weights to load
    load_tokenizer(default_model_path()).save_pretrained(model)
    rows = [{"instruction": f"q{i}", "output": "a", "task": "facts" if i % 2 else "math"} for i in range(40)]
    rows[37]["task"] = "poetry"  # a rare third task
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    base = [f"model.path={model}", f"data.train={train}", "adapter.method=loramoe", "adapter.num_experts=2",
            "loop.global_batch=4", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(MoeLoraError, match=r"needs each example's task type: set data.world_knowledge_tasks"):
        build_run(load_config(None, base), progress=False)
    with pytest.raises(MoeLoraError, match=r"data.world_knowledge_tasks names \['history'\], which no example has"):
        build_run(load_config(None, [*base, "data.world_knowledge_tasks=[facts,history]"]), progress=False)


# ----------------------------------------------------------------------------- 8, 9: generation flags
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "hi", "--temperature", "nan"], "--temperature=nan is not a finite number"),
        (["--prompt", "hi", "--temperature", "inf"], "--temperature=inf is not a finite number"),
        (["--prompt", "hi", "--beams", "2", "--length-penalty", "nan"], "--length-penalty=nan is not a finite number"),
        (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 (character 4)"),  # b"caf\xe9" from a Latin-1 shell
    ],
)
def test_generation_flags_that_decoded_garbage_are_refused(tmp_path, capsys, argv, message):
    assert main(["generate", "--model", str(tmp_path / "no_model"), *argv]) == 2
    assert message in one_line_error(capsys)
