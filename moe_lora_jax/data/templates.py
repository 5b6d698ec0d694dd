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


def _fields(example: Mapping[str, Any]) -> tuple[str, str]:
    for name in REQUIRED_FIELDS:
        if example.get(name) is None:
            raise MissingFieldError(f"lacks the field {name!r}")
    inp = example.get("input")
    return str(example["instruction"]), "" if inp is None else str(inp)


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
    output = str(example["output"])
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
    prompts, responses = [], []
    for i, example in enumerate(examples):
        try:
            prompts.append(prompt_text(example, template, tokenizer))
            responses.append(response_text(example, template, tokenizer))
        except MissingFieldError as e:
            raise MissingFieldError(
                f"row {i} {e} (fields present: {', '.join(map(str, example)) or 'none'}): "
                f"every row needs {' and '.join(REQUIRED_FIELDS)} (input is optional)"
            ) from None
    # Alpaca: the tokenizer adds its BOS to the prompt; chat templates already contain their markers.
    prompt_tokens = encode_many(tokenizer, prompts, add_special_tokens=template == "alpaca")
    response_tokens = encode_many(tokenizer, responses, add_special_tokens=False)
    if template == "alpaca":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise MoeLoraError("the tokenizer has no EOS token: the alpaca template needs one to end responses")
        response_tokens = [ids + [int(eos)] for ids in response_tokens]
    return prompt_tokens, response_tokens
