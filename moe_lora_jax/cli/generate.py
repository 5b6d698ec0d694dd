"""`moe-lora generate`: greedy, sampled or beam-search continuations, one prompt or interactively."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax.cli.common import add_model_arg
from moe_lora_jax.convert import load_llama_config, load_model_and_adapter
from moe_lora_jax.embedded import resolve_model_path
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.infer.evaluate import left_pad
from moe_lora_jax.infer.generate import beam_search, generate
from moe_lora_jax.tokenizer import load_tokenizer

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this, so new prompts reuse compiled code
MAX_BEAMS = 32


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with the KV cache (greedy, sampling or beam search)")
    add_model_arg(p)
    p.add_argument("--adapter", default=None, help="adapter directory (native, PEFT LoRA or mixlora) to decode with")
    p.add_argument("--merge", action="store_true", help="fold a plain LoRA --adapter into the base weights (no adapter overhead)")
    p.add_argument("--prompt", default=None, help="text to continue; without it, read prompts from stdin, one per line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beams", type=int, default=1, help="beam search with this many beams (1: no beam search)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help='print {"completion": ..., "tokens": [...]}')
    p.set_defaults(func=run_generate)


def _check_text(text: str, what: str) -> None:
    """Refuse text that is not valid UTF-8 (the shell hands Python undecodable bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MoeLoraError(f"{what} is not valid UTF-8 (character {e.start + 1}): pass UTF-8 text") from None


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--length-penalty", args.length_penalty)):
        if not math.isfinite(value):  # nan passes every comparison below and decodes garbage
            raise MoeLoraError(f"{flag}={value} is not a finite number: give a real value")
    if args.prompt is not None:
        _check_text(args.prompt, "--prompt")
    if args.max_new_tokens < 1:
        raise MoeLoraError(f"--max-new-tokens={args.max_new_tokens}: ask for at least 1 token")
    if not 1 <= args.beams <= MAX_BEAMS:
        raise MoeLoraError(f"--beams={args.beams} is out of range: use 1 to {MAX_BEAMS}")
    if args.temperature < 0:
        raise MoeLoraError(f"--temperature={args.temperature} is negative: use 0 (greedy) or a positive value")
    if not 0.0 < args.top_p <= 1.0:
        raise MoeLoraError(f"--top-p={args.top_p} is out of range: use a value in (0, 1]")
    if args.beams > 1 and args.temperature > 0:
        raise MoeLoraError("--beams > 1 with --temperature > 0 is not supported: beam search here is deterministic")
    if args.merge and args.adapter is None:
        raise MoeLoraError("--merge needs --adapter DIR: there is no LoRA to fold into the base weights")


class Generator:
    """Holds the model, tokenizer and decoding settings; `__call__(text)` returns (completion, tokens)."""

    def __init__(self, args: argparse.Namespace, path: Any, config: Any, variables: dict, tokenizer: Any, model: Any):
        self.args, self.path, self.config, self.variables, self.tokenizer, self.model = args, path, config, variables, tokenizer, model

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if not text.strip():
            raise MoeLoraError("the prompt is empty: pass some text")
        if self.args.chat:
            if not self.tokenizer.chat_template:
                raise MoeLoraError(f"the tokenizer of {self.path} has no chat template: drop --chat")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = self.config.max_position_embeddings
        if len(ids) + self.args.max_new_tokens > limit:
            raise MoeLoraError(
                f"prompt ({len(ids)} tokens) + --max-new-tokens ({self.args.max_new_tokens}) exceeds the model's "
                f"context of {limit}: shorten the prompt or ask for fewer tokens"
            )
        return left_pad([ids], self.config.pad_token_id or 0, PROMPT_BUCKET, max_width=limit - self.args.max_new_tokens)

    def __call__(self, text: str) -> tuple[str, list[int]]:
        ids, mask = self.encode(text)
        a, cfg = self.args, self.config
        common = dict(max_new_tokens=a.max_new_tokens, eos_token_ids=cfg.eos_token_id, pad_token_id=cfg.pad_token_id or 0)
        if a.beams > 1:
            out, _ = beam_search(self.model, self.variables, jnp.asarray(ids), jnp.asarray(mask), num_beams=a.beams,
                                 length_penalty=a.length_penalty, **common)
        else:
            out = generate(self.model, self.variables, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(a.seed),
                           temperature=a.temperature, top_p=a.top_p, **common)
        tokens = [int(t) for t in np.asarray(out)[0]]
        stop = next((i + 1 for i, t in enumerate(tokens) if t in cfg.eos_token_id), len(tokens))
        tokens = tokens[:stop]
        return self.tokenizer.decode(tokens, skip_special_tokens=True), tokens


def run_generate(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.prompt is not None and not args.prompt.strip():
        raise MoeLoraError("the prompt is empty: pass some text with --prompt")
    path = resolve_model_path(args.model)
    generator = Generator(args, path, load_llama_config(path), {}, load_tokenizer(path), None)
    if args.prompt is not None:
        generator.encode(args.prompt)  # a prompt that cannot fit fails before the slow weight load
    _, config, model, variables = load_model_and_adapter(args.model, args.adapter, merge=args.merge)
    generator.config, generator.variables, generator.model = config, variables, model

    def emit(text: str) -> None:
        completion, tokens = generator(text)
        print(json.dumps({"completion": completion, "tokens": tokens}) if args.json else text + completion, flush=True)

    if args.prompt is not None:
        emit(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    while True:  # interactive mode: one prompt per line until EOF (Ctrl-D)
        if interactive:
            print("prompt> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            _check_text(line, "the prompt")
            emit(line.rstrip("\n"))
        except MoeLoraError as e:  # a bad prompt should not end the session
            print(f"moe-lora generate: error: {e}", file=sys.stderr)
