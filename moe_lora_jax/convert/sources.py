"""Turn what the user names as a model (directory, .gguf file, hub id) into a local HF directory.

GGUF files go through transformers' GGUF reader (which dequantizes to float32
and needs torch) once; the result is cached as an ordinary Hugging Face
directory (config.json, model.safetensors, tokenizer files) under
`$MOE_LORA_CACHE` (default `~/.cache/moe_lora_jax`), so later loads take a
second instead of half a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from moe_lora_jax.config import LlamaConfig
from moe_lora_jax.convert.save import write_hf_dir
from moe_lora_jax.errors import MoeLoraError


def cache_root() -> Path:
    return Path(os.environ.get("MOE_LORA_CACHE", Path.home() / ".cache" / "moe_lora_jax"))


def resolve_hf_dir(model: str | os.PathLike) -> Path:
    """A local directory holding config.json and safetensors for `model`."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_to_hf_dir(path)
        raise MoeLoraError(
            f"{path} is a file but not a .gguf: pass a Hugging Face model directory (config.json + *.safetensors) or a .gguf file"
        )
    if path.is_dir():
        return path
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return _download_from_hub(str(model))
    raise MoeLoraError(f"{model} does not exist: pass a Hugging Face model directory, a .gguf file or a hub id (org/name)")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        )
    except Exception as e:  # network errors, unknown repos, gated models: all end the same way
        raise MoeLoraError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}): "
            "pass a local model directory or .gguf file instead"
        ) from None


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Convert (once) a GGUF file to a cached HF directory and return that directory."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    try:
        import torch
        import transformers
    except ImportError:
        raise MoeLoraError(
            f"reading {gguf_path.name} needs torch and gguf (transformers' GGUF reader): "
            "pip install 'moe-lora-jax[gguf]', or pass a safetensors model directory"
        ) from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as e:
            raise MoeLoraError(f"transformers could not read {gguf_path}: {e}".splitlines()[0]) from None
    hf_config = model.config.to_dict()
    config = LlamaConfig.from_hf(hf_config, source=str(gguf_path))
    tensors = {name: np.asarray(t.detach().numpy()) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    del model
    try:
        write_hf_dir(config, tensors, out, tokenizer=tokenizer, extra={"converted_from": str(gguf_path.resolve())})
    except (MoeLoraError, OSError):
        if not (out / "config.json").exists():  # a concurrent conversion may have won the race
            raise
    return out


def read_config_json(hf_dir: Path) -> dict:
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise MoeLoraError(
            f"{config_path} is missing: point --model at a Hugging Face model directory (config.json + *.safetensors) or a .gguf file"
        )
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise MoeLoraError(f"{config_path} is not valid JSON ({e}): re-download or re-export the model") from None
    if not isinstance(hf, dict):
        raise MoeLoraError(f"{config_path} holds a JSON {type(hf).__name__}, not an object of settings: re-download or re-export the model")
    return hf
