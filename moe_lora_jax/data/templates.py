"""Instruction templates: an example's fields -> (prompt tokens, response tokens).

Two templates:

- `alpaca`: the Stanford Alpaca prompt (with or without its "### Input:" block);
  the response is the output text followed by the EOS token. The prompt is
  tokenized with the tokenizer's own special tokens (BOS where it adds one).
- `chat`: the tokenizer's chat template with one user turn (instruction, then the
  input after a blank line) and one assistant turn (the output); the response is
  everything the template appends for the assistant turn (its end-of-turn marker
  included, so the model learns to stop).

Prompt and response are tokenized separately and concatenated, so the prompt
tokens at training time are exactly the tokens `prompt_ids` gives for generation.
Only response tokens carry loss.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from moe_lora_jax.data.records import row_label
from moe_lora_jax.errors import MoeLoraError

TEMPLATES = ("alpaca", "chat")
REQUIRED_FIELDS = ("instruction", "output")  # `input` is optional (missing = empty)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class MissingFieldError(MoeLoraError):
    """An example lacks a field the template needs."""


def check_template(template: str, tokenizer: Any) -> None:
    if template not in TEMPLATES:
        raise MoeLoraError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise MoeLoraError("the tokenizer has no chat template: set data.template=alpaca, or use an instruct model's tokenizer")


class FieldTypeError(MissingFieldError):
    """A text field holds something other than a string (a number, boolean, list or object)."""


def _text(example: Mapping[str, Any], name: str, required: bool) -> str:
    value = example.get(name)
    if value is None:
        if required:
            raise MissingFieldError(f"has {name!r}: null" if name in example else f"lacks the field {name!r}")
        return ""
    if not isinstance(value, str):  # no str(): 7 may have been "007", and a list is not a text
        kind = "a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"
        raise FieldTypeError(f"has {kind} in {name!r} ({value!r:.40}), not a string")
    return value


def _fields(example: Mapping[str, Any]) -> tuple[str, str]:
    instruction = _text(example, "instruction", True)
    _text(example, "output", True)
    return instruction, _text(example, "input", False)


def user_message(example: Mapping[str, Any]) -> str:
    instruction, inp = _fields(example)
    return f"{instruction}\n\n{inp}" if inp else instruction


def prompt_text(example: Mapping[str, Any], template: str, tokenizer: Any) -> str:
    """The prompt string the model continues (what generation starts from)."""
    instruction, inp = _fields(example)
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT).format(instruction=instruction, input=inp)
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(example)}], tokenize=False, add_generation_prompt=True
        )
    raise MoeLoraError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")


def response_text(example: Mapping[str, Any], template: str, tokenizer: Any) -> str:
    """The text that follows the prompt and carries loss (EOS excluded for alpaca, added as an id)."""
    _fields(example)
    output = example["output"]
    if template == "alpaca":
        return output
    prompt = prompt_text(example, template, tokenizer)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(example)}, {"role": "assistant", "content": output}], tokenize=False
    )
    if not full.startswith(prompt):
        raise MoeLoraError(
            "the tokenizer's chat template renders the prompt differently with and without the answer: "
            "set data.template=alpaca for this tokenizer"
        )
    return full[len(prompt) :]


def check_text_fields(examples: Sequence[Mapping[str, Any]]) -> None:
    """Every row has instruction and output, and instruction/input/output are strings; errors name the row
    (file and line for rows read from a file, see `moe_lora_jax.data.records.row_label`)."""

    for i, example in enumerate(examples):
        try:
            _fields(example)
        except FieldTypeError as e:
            raise FieldTypeError(
                f"{row_label(examples, i)} {e}: instruction, input and output must be strings; quote the value in the file"
            ) from None
        except MissingFieldError as e:
            raise MissingFieldError(
                f"{row_label(examples, i)} {e} (fields present: {', '.join(map(str, example)) or 'none'}): "
                f"every row needs {' and '.join(REQUIRED_FIELDS)} (input is optional)"
            ) from None


def encode_many(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=add_special_tokens)
    return [list(ids) for ids in out["input_ids"]]


def prompt_ids(example: Mapping[str, Any], template: str, tokenizer: Any) -> list[int]:
    """Token ids of the prompt, identical to the prompt part of training rows."""
    return encode_many(tokenizer, [prompt_text(example, template, tokenizer)], add_special_tokens=template == "alpaca")[0]


def render_many(
    examples: Sequence[Mapping[str, Any]], template: str, tokenizer: Any
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) for every example; raises MissingFieldError naming the row index."""
    check_template(template, tokenizer)
    check_text_fields(examples)
    prompts, responses = [], []
    for example in examples:
        prompts.append(prompt_text(example, template, tokenizer))
        responses.append(response_text(example, template, tokenizer))
    # Alpaca: the tokenizer adds its BOS to the prompt; chat templates already contain their markers.
    prompt_tokens = encode_many(tokenizer, prompts, add_special_tokens=template == "alpaca")
    response_tokens = encode_many(tokenizer, responses, add_special_tokens=False)
    if template == "alpaca":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise MoeLoraError("the tokenizer has no EOS token: the alpaca template needs one to end responses")
        response_tokens = [ids + [int(eos)] for ids in response_tokens]
    return prompt_tokens, response_tokens
