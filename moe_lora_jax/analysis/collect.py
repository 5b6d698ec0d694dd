"""One pass of the model over batches, summing every router's statistics per task (`RoutingTotals`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax.analysis.results import RoutingTotals
from moe_lora_jax.analysis.stats import milora_task_counts, routing_task_sums
from moe_lora_jax.errors import MoeLoraError

TOKEN_MASKS = {"all": "attention_mask", "prompt": "prompt_mask", "response": "loss_mask"}


def _sown(intermediates: Mapping[str, Any], name: str) -> Any:
    value = intermediates.get(name)
    return value[0] if isinstance(value, tuple) else value


def make_routing_fn(model: Any, adapter_config: Any, num_tasks: int) -> Callable:
    """A jitted `fn(variables, batch) -> (router sums, milora counts or None)` (see `stats`): the model's
    forward with the batch's prompt mask (MiLoRA pools the prompt, as in training and decoding); the token
    routers count the tokens of batch["count_mask"] [B, L] and MiLoRA the rows of batch["row_valid"] [B]."""

    def fn(variables, batch):
        _, state = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                               prompt_mask_BxL=batch["prompt_mask"], mutable=["intermediates"])
        inter = state["intermediates"]
        sums = routing_task_sums(inter, adapter_config, batch["count_mask"], batch["task_id"], num_tasks)
        routing = _sown(inter, "milora_routing")
        milora = None
        if routing is not None:
            milora = milora_task_counts(routing, batch["row_valid"], batch["task_id"], num_tasks)
        return sums, milora

    return jax.jit(fn)


def collect_routing(model: Any, variables: Mapping[str, Any], adapter_config: Any, batches: Iterable[Mapping[str, Any]],
                    task_names: tuple[str, ...], *, tokens: str = "all", progress: bool = False,
                    total: int | None = None, routing_fn: Callable | None = None) -> RoutingTotals:
    """Sum `make_routing_fn`'s outputs over `batches` (dicts of input_ids, attention_mask, loss_mask, prompt_mask
    [B, L], task_id [B] and optionally example_index [B], -1 marking an empty filler row). tokens: the tokens
    the token routers count: all (prompt and response), prompt or response. routing_fn: a `make_routing_fn`
    of the same model to reuse (its compilation included)."""
    from tqdm.auto import tqdm

    if tokens not in TOKEN_MASKS:
        raise MoeLoraError(f"tokens={tokens!r}: use one of {', '.join(TOKEN_MASKS)}")
    T = len(task_names)
    fn = routing_fn or make_routing_fn(model, adapter_config, T)
    routers: dict[str, list[np.ndarray]] = {}
    milora: list[np.ndarray] | None = None
    examples = np.zeros(T, np.int64)
    for batch in tqdm(batches, total=total, desc="routing", unit="batch", disable=not progress):
        rows = batch.get("example_index")
        valid = np.asarray(rows) >= 0 if rows is not None else np.asarray(batch["attention_mask"]).any(axis=1)
        arrays = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "prompt_mask", "task_id")}
        arrays["count_mask"] = jnp.asarray(batch[TOKEN_MASKS[tokens]])
        arrays["row_valid"] = jnp.asarray(valid.astype(np.int32))
        sums, mil = jax.device_get(fn(variables, arrays))
        for key, (s, t) in sums.items():
            acc = routers.setdefault(key, [np.zeros_like(s, np.float64), np.zeros_like(t, np.float64)])
            acc[0] += s
            acc[1] += t
        if mil is not None:
            milora = [np.zeros_like(x, np.float64) for x in mil] if milora is None else milora
            milora[0] += mil[0]
            milora[1] += mil[1]
        examples += np.bincount(np.asarray(batch["task_id"])[valid], minlength=T)[:T]
    return RoutingTotals(task_names=tuple(task_names), examples=examples,
                         routers={k: (v[0], v[1]) for k, v in routers.items()},
                         milora=None if milora is None else (milora[0], milora[1]), tokens=tokens)
