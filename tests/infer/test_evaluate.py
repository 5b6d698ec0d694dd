"""Evaluation on a hand-made fixture: exact match, multiple choice and perplexity against values
computed independently with transformers on the same tiny model; records and column mappings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_lora_jax import LlamaForCausalLM, load_hf_llama
from moe_lora_jax.data.templates import prompt_text
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.infer.evaluate import (
    exact_match_eval,
    load_eval_records,
    multiple_choice_eval,
    parse_columns,
    perplexity_eval,
)


class CharTokenizer:
    """ASCII characters are their own ids (BOS 1 first with special tokens); EOS 2, pad 0."""

    eos_token_id, pad_token_id, unk_token_id, chat_template = 2, 0, 3, None

    def _encode(self, text: str, special: bool) -> list[int]:
        ids = [ord(c) if 3 <= ord(c) < 128 else ord("?") for c in text]
        return [1, *ids] if special else ids

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, list):
            return {"input_ids": [self._encode(t, add_special_tokens) for t in text]}
        return {"input_ids": self._encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids if int(i) >= 3)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_llama

    hf_dir, torch_model = make_hf_llama(tmp_path_factory.mktemp("eval"), seed=11, vocab_size=128, max_position_embeddings=512)
    config, params = load_hf_llama(hf_dir)
    return LlamaForCausalLM(config), {"params": params}, torch_model, CharTokenizer()


def _torch_logp(torch_model, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, from one transformers forward pass."""
    import torch

    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


QUESTIONS = [
    {"question": "Q: What color is the sky?", "choices": ["blue", "green", "a loud noise"], "task": "science"},
    {"question": "Q: 2 + 2 =", "choices": ["4", "five", "22"], "task": "math"},
    {"question": "Q: Opposite of up?", "choices": ["down", "sideways", "up"], "task": "science"},
    {"question": "Q: Largest?", "choices": ["10", "1000", "ten"], "context": "Numbers.", "task": "math"},
]


def _option_scores(torch_model, tok, record) -> np.ndarray:
    prompt = f"{record['context']}\n{record['question']}" if record.get("context") else record["question"]
    ctx = tok(prompt)["input_ids"]
    scores = []
    for choice in record["choices"]:
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
        scores.append(_torch_logp(torch_model, ctx + cont)[len(ctx) - 1 :].sum())
    return np.asarray(scores)


def test_multiple_choice_equals_hand_computed_loglikelihoods(tiny):
    model, variables, torch_model, tok = tiny
    expected = [_option_scores(torch_model, tok, r) for r in QUESTIONS]
    # gold = the best option for questions 0, 1, 3 and the worst for question 2: accuracy 3/4 by construction
    labels = [int(np.argmax(expected[0])), int(np.argmax(expected[1])), int(np.argmin(expected[2])), int(np.argmax(expected[3]))]
    records = [{**r, "label": lab} for r, lab in zip(QUESTIONS, labels)]
    result = multiple_choice_eval(model, variables, tok, records, batch_size=4, pad_multiple=16)
    for ex, want in zip(result["examples"], expected):
        np.testing.assert_allclose(ex["scores"], want, atol=2e-4)
    assert result["accuracy"] == 0.75 and result["n"] == 4
    assert result["per_task"] == {"math": 1.0, "science": 0.5}
    norm_hits = [int(np.argmax(s / [len(" " + c) for c in r["choices"]])) == lab
                 for s, r, lab in zip(expected, QUESTIONS, labels)]
    assert result["accuracy_norm"] == pytest.approx(np.mean(norm_hits))
    assert result["per_task_n"] == {"math": 2, "science": 2}


def test_exact_match_equals_hand_computed_greedy_completions(tiny):
    import torch

    model, variables, torch_model, tok = tiny
    base = [{"instruction": "Say hi.", "input": "", "task": "a"}, {"instruction": "Count.", "input": "1 2 3", "task": "b"},
            {"instruction": "Name a fruit.", "input": "", "task": "a"}, {"instruction": "Echo.", "input": "xyz", "task": "b"}]
    completions = []
    for r in base:  # transformers' greedy continuation of the same alpaca prompt, cut at EOS
        ids = tok(prompt_text({**r, "output": ""}, "alpaca", tok))["input_ids"]
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=2,
                                       pad_token_id=0)[0, len(ids):].tolist()
        completions.append(tok.decode(out[: out.index(2)] if 2 in out else out))
    assert all(completions)  # the fixture means something: no row stops at once
    # references: right for rows 0, 1, 3, wrong for row 2
    records = [{**r, "output": c if i != 2 else c + "#wrong"} for i, (r, c) in enumerate(zip(base, completions))]
    result = exact_match_eval(model, variables, tok, records, "alpaca", batch_size=2, max_new_tokens=5)
    assert [e["completion"] for e in result["examples"]] == completions
    assert result["accuracy"] == 0.75
    assert result["per_task"] == {"a": 0.5, "b": 1.0} and result["per_task_n"] == {"a": 2, "b": 2}


def test_perplexity_equals_hand_computed(tiny):
    model, variables, torch_model, tok = tiny
    records = [{"text": "the quick brown fox", "task": "x"}, {"text": "jumps over the lazy dog!", "task": "y"},
               {"text": "ok", "task": "x"}]
    nll = {r["text"]: -_torch_logp(torch_model, tok(r["text"])["input_ids"]) for r in records}
    result = perplexity_eval(model, variables, tok, records, batch_size=2, pad_multiple=16)
    all_nll = np.concatenate(list(nll.values()))
    assert result["tokens"] == len(all_nll) == 19 + 24 + 2  # one token per character, none for BOS
    np.testing.assert_allclose(result["perplexity"], np.exp(all_nll.mean()), rtol=1e-5)
    x = np.concatenate([nll["the quick brown fox"], nll["ok"]])
    np.testing.assert_allclose(result["per_task"]["x"], np.exp(x.mean()), rtol=1e-5)

    # instruction rows: only the response tokens (and EOS) count, given the prompt
    row = {"instruction": "Say hi.", "output": "hello"}
    prompt = tok(prompt_text(row, "alpaca", tok))["input_ids"]
    ids = prompt + tok("hello", add_special_tokens=False)["input_ids"] + [2]
    want = -_torch_logp(torch_model, ids)[len(prompt) - 1 :]
    got = perplexity_eval(model, variables, tok, [row], "alpaca", pad_multiple=16)
    assert got["tokens"] == 6
    np.testing.assert_allclose(got["perplexity"], np.exp(want.mean()), rtol=1e-5)


def test_records_from_hf_style_files_with_column_mappings(tmp_path):
    arc = tmp_path / "arc.jsonl"  # ARC / OpenBookQA layout: choices {"text", "label"}, answerKey
    arc.write_text("\n".join(json.dumps(r) for r in [
        {"question": "q1", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C", "subject": "s"},
        {"question": "q2", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "1", "subject": "t"},
    ]))
    rows = load_eval_records(str(arc), columns=parse_columns("label=answerKey,task=subject"))
    assert [r["task"] for r in rows] == ["s", "t"]
    from moe_lora_jax.infer.evaluate import _choices_and_labels, _label_index

    golds = [_label_index(r["label"], *_choices_and_labels(r["choices"], i), i) for i, r in enumerate(rows)]
    assert golds == [2, 0]

    piqa = tmp_path / "piqa.jsonl"  # PIQA: two solution columns and an int label; BoolQ: a bool and fixed options
    piqa.write_text(json.dumps({"goal": "g", "sol1": "x", "sol2": "y", "label": 1, "passage": "p", "answer": True}))
    [row] = load_eval_records(str(piqa), columns=parse_columns("question=goal,choices=sol1|sol2"), limit=1)
    assert row["choices"] == ["x", "y"] and row["label"] == 1
    [boolq] = load_eval_records(str(piqa), columns=parse_columns("context=passage,choices=[no|yes],label=answer"))
    assert boolq["choices"] == ["no", "yes"] and _label_index(boolq["label"], boolq["choices"], None, 0) == 1

    bundled = load_eval_records("bundled", "test", limit=3)
    assert len(bundled) == 3 and {"instruction", "output", "task"} <= set(bundled[0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: parse_columns("question"), "is not FIELD=COLUMN"),
        (lambda: load_eval_records("bundled", "test", {"question": "nope"}, limit=1), "has no column 'nope'"),
        (lambda: load_eval_records("bundled", "test", limit=0), "limit=0"),
    ],
)
def test_bad_mappings_get_clear_errors(call, message):
    with pytest.raises(MoeLoraError, match=message):
        call()


def test_bad_multiple_choice_rows_get_clear_errors(tiny):
    model, variables, _, tok = tiny
    with pytest.raises(MoeLoraError, match="label 5 is out of range for 2 options"):
        multiple_choice_eval(model, variables, tok, [{"question": "q", "choices": ["a", "b"], "label": 5}])
    with pytest.raises(MoeLoraError, match="row 0 lacks 'choices'"):
        multiple_choice_eval(model, variables, tok, [{"question": "q", "label": 0}])
    with pytest.raises(MoeLoraError, match="more than the model's context of 512"):
        multiple_choice_eval(model, variables, tok, [{"question": "q" * 600, "choices": ["a"], "label": 0}])
