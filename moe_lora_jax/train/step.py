"""The pure train step, and its ahead-of-time compilation with explicit shardings.

    step_fn = make_train_step(model, adapter_config, optimizer, grad_accum=2, lr_schedule=schedule)
    state, metrics = step_fn(state, base_params, batch)          # pure; jit it yourself, or:
    steps = CompiledSteps(step_fn, mesh, state, base_params)      # jit(...).lower(...).compile() per batch shape
    state, metrics = steps(state, base_params, batch)             # state is donated

One step:

1. The batch [B, ...] is cut into `grad_accum` micro-batches (row i goes to micro-batch
   i mod grad_accum, so every micro-batch stays spread over the data-parallel devices).
2. `lax.scan` over the micro-batches: forward with `mutable=["intermediates"]` (and the batch's
   `prompt_mask`, so MiLoRA's router pools the prompt only, as in decoding),
   `losses.total_loss`, gradient with respect to the `adapter` collection only. The
   cross-entropy of micro-batch m is weighted by its share of the batch's response
   tokens n_m / N, so the accumulated gradient equals that of one pass over the whole
   batch; balance terms (functions of router statistics) are averaged over micro-batches.
3. Non-finite guard: if the loss or any gradient is NaN/Inf, the optimizer update is
   skipped (`lax.cond`). Otherwise optax (clipping, AdamW) computes the update, and it is
   kept only if the new adapter and the new optimizer state are finite too (an lr of NaN,
   eps=0 on a zero gradient, an overflowing second moment all make a NaN there from finite
   gradients). A skipped step returns the adapter, optimizer state and rng unchanged; only
   `step` and the non-finite counters move, and `metrics["nonfinite"]` is 1.
   `metrics["nonfinite/flags"]` (int32 [4], order `NONFINITE_GROUPS`: loss, gradients,
   updated adapter, updated optimizer state) says which group was not finite, and
   `metrics["nonfinite/leaf"]` the index of its first non-finite leaf (-1: none) in
   `jax.tree.leaves` order; `describe_nonfinite` turns both into a sentence.

Metrics: loss (task CE + weighted balance terms), ce, every balance term, accuracy,
tokens, grad_norm, lr, nonfinite, and per layer router/layer_<i>/{entropy,
entropy_norm, load_max, load_min, load_cv2, load} averaged over that layer's routers
(plus router/mean/*).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_lora_jax.adapters.registry import STATS_PREFIX, get_method
from moe_lora_jax.losses import RouterStat, _layer_top_k, _stat_k, router_stats, stack_router_stats, total_loss
from moe_lora_jax.model.scan import scans
from moe_lora_jax.parallel.mesh import BATCH_AXES
from moe_lora_jax.parallel.rules import batch_sharding
from moe_lora_jax.stacking import LAYERS, is_stacked
from moe_lora_jax.train.optim import path_str
from moe_lora_jax.train.state import TrainState, stack_state, unstack_state

Batch = Mapping[str, jax.Array]

# The groups the non-finite guard checks, in the order of metrics["nonfinite/flags"].
NONFINITE_GROUPS = ("loss", "gradients", "updated adapter", "updated optimizer state")


def response_tokens(batch: Batch) -> jax.Array:
    """Tokens that carry loss (the count `losses.cross_entropy` divides by)."""
    mask = batch.get("loss_mask", batch.get("attention_mask"))
    if mask is None:
        return jnp.asarray(batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1), jnp.float32)
    return jnp.sum(mask[:, 1:].astype(jnp.float32))


def prompt_mask(batch: Batch) -> jax.Array | None:
    """Tokens MiLoRA's router may pool: the batch's `prompt_mask`, else the non-response tokens
    (attention_mask and not loss_mask), else None (every token: a batch without a prompt/response split)."""
    if batch.get("prompt_mask") is not None:
        return batch["prompt_mask"]
    if batch.get("loss_mask") is None:
        return None
    attn = batch.get("attention_mask")
    not_response = jnp.asarray(batch["loss_mask"]) == 0
    return not_response if attn is None else not_response & (jnp.asarray(attn) != 0)


_ROUTING_STATS = ("entropy", "entropy_norm", "load_max", "load_min", "load_cv2")


def routing_metrics(
    intermediates: Mapping[str, Any] | None, attention_mask: jax.Array | None, top_k: int | Callable[[RouterStat, int], int]
) -> dict[str, jax.Array]:
    """Per-layer routing entropy and expert utilisation, averaged over the layer's routers.

    The load counts each router's own top-k selections: `top_k` is one int for every router (capped by its
    expert count) or a function (stat, num_experts) -> k, as the Switch terms take it (`losses._layer_top_k`:
    a MoLA / AlphaLoRA Allocation's per-layer top-k).

    `train.metrics.routing_stats` of every router, computed for all layers of a module at once on
    its stacked statistics (`losses.stack_router_stats`), so the step's size does not grow with
    the number of routers."""
    if not intermediates:
        return {}
    stats = [s for kind in STATS_PREFIX.values() for s in router_stats(intermediates, kind)]
    if not stats:
        return {}
    layers = sorted({s.layer for s in stats})
    row = {layer: i for i, layer in enumerate(layers)}
    E_max = max(s.logits.shape[-1] for s in stats)
    sums = {stat: jnp.zeros((len(layers),), jnp.float32) for stat in _ROUTING_STATS}
    load_sum = jnp.zeros((len(layers), E_max), jnp.float32)
    n_routers = np.zeros(len(layers))
    counts: dict[int, set[int]] = {}
    for g in stack_router_stats(stats):
        values = _stacked_routing_stats(g, attention_mask, top_k)
        idx = np.array([row[layer] for layer in g.layers])
        for stat in _ROUTING_STATS:
            sums[stat] = sums[stat].at[idx].add(values[stat])
        load = values["load"]
        load_sum = load_sum.at[idx].add(jnp.pad(load, [(0, 0), (0, E_max - load.shape[-1])]))
        n_routers[idx] += 1
        for layer, E in zip(g.layers, g.num_experts):
            counts.setdefault(layer, set()).add(E)
    means = {stat: sums[stat] / n_routers for stat in _ROUTING_STATS}
    load_mean = load_sum / n_routers[:, None]
    out: dict[str, jax.Array] = {}
    for layer, i in row.items():
        for stat in _ROUTING_STATS:
            out[f"router/layer_{layer}/{stat}"] = means[stat][i]
        if len(counts[layer]) == 1:
            out[f"router/layer_{layer}/load"] = load_mean[i, : next(iter(counts[layer]))]
    for stat in _ROUTING_STATS:
        out[f"router/mean/{stat}"] = jnp.mean(means[stat])
    return out


def _stacked_routing_stats(g: Any, attention_mask: jax.Array | None, top_k: Any) -> dict[str, jax.Array]:
    """`train.metrics.routing_stats` of each of the stacked routers in `g` (a StackedRouterStat):
    [N] per statistic and load [N, E]; the padded experts take no part."""
    N, E = g.logits.shape[0], g.logits.shape[-1]
    probs = jax.nn.softmax(g.logits.astype(jnp.float32), axis=-1)
    use_mask = attention_mask is not None and probs.shape[1:-1] == attention_mask.shape
    probs = probs.reshape(N, -1, E)
    mask_T = jnp.asarray(attention_mask, jnp.float32).reshape(-1) if use_mask else jnp.ones((probs.shape[1],), jnp.float32)
    num = np.array(g.num_experts)
    valid = np.arange(E)[None, :] < num[:, None]  # [N, E]
    k = np.array([_stat_k(top_k, RouterStat(layer, g.module, g.logits[0], None), E) for layer, E in zip(g.layers, g.num_experts)])
    _, chosen = jax.lax.top_k(probs, int(k.max()))  # [N, T, k_max]
    keep = (np.arange(int(k.max()))[None, :] < k[:, None]).astype(np.float32)  # ranks past each layer's k
    counts = jnp.sum(jax.nn.one_hot(chosen, E) * keep[:, None, :, None] * mask_T[None, :, None, None], axis=(1, 2))
    load = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    ent_T = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
    ent = jnp.sum(ent_T * mask_T, axis=-1) / jnp.maximum(jnp.sum(mask_T), 1.0)
    mean = jnp.sum(load, axis=-1) / num
    var = jnp.sum(jnp.where(valid, (load - mean[:, None]) ** 2, 0.0), axis=-1) / num
    return {
        "entropy": ent,
        "entropy_norm": jnp.where(num > 1, ent / np.log(np.maximum(num, 2)), 0.0),
        "load_max": jnp.max(jnp.where(valid, load, -jnp.inf), axis=-1),
        "load_min": jnp.min(jnp.where(valid, load, jnp.inf), axis=-1),
        "load_cv2": var / jnp.maximum(mean * mean, 1e-12),
        "load": load,
    }


def _split_micro(batch: Batch, grad_accum: int, mesh: Mesh | None) -> dict[str, jax.Array]:
    """[B, ...] -> [A, B/A, ...] with row i in micro-batch i mod A."""
    out = {}
    for k, v in batch.items():
        v = jnp.asarray(v)
        B = v.shape[0]
        v = jnp.moveaxis(v.reshape((B // grad_accum, grad_accum) + v.shape[1:]), 1, 0)
        if mesh is not None:
            spec = PartitionSpec(None, BATCH_AXES, *([None] * (v.ndim - 2)))
            v = jax.lax.with_sharding_constraint(v, NamedSharding(mesh, spec))
        out[k] = v
    return out


def make_train_step(
    model: Any,
    adapter_config: Any,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    lr_schedule: Callable[[jax.Array], jax.Array] | None = None,
    mesh: Mesh | None = None,
    deterministic: bool = False,
    log_routing: bool = True,
    loss_fn: Callable | None = None,
    objective: Any = None,
    state_like: TrainState | None = None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure `train_step(state, base_params, batch) -> (state, metrics)`.

    `loss_fn(logits, batch, intermediates, adapter_config) -> (loss, metrics)` defaults to
    `losses.total_loss` with the weights of `objective` (an Objective; None: the method's defaults);
    its metrics must include "ce" and "tokens".

    The state may come per layer or, for a scanned model, stacked over layers (`state.stack_state`,
    as the train loop keeps it): a stacked state is returned stacked, with nothing stacked or cropped
    inside the step. `state_like` (the per-layer state or its shapes, `state.state_shapes`) lets
    the non-finite guard name the per-layer leaf of a stacked state (`describe_nonfinite` with the
    per-layer trees); without it the leaf index counts the stacked leaves.
    """
    loss_fn = _objective_loss(objective) if loss_fn is None else loss_fn
    top_k = 1 if adapter_config is None else get_method(adapter_config.method).routing_top_k(adapter_config)
    routed_k = _layer_top_k(adapter_config) if top_k > 1 else top_k  # each router's own k, as the losses count it
    if grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum} must be >= 1")

    def micro_objective(adapter, base, micro, key, n_total):
        logits, mutated = model.apply(
            {"params": base, "adapter": adapter},
            micro["input_ids"],
            micro.get("attention_mask"),
            deterministic=deterministic,
            rngs={"dropout": key},
            mutable=["intermediates"],
            prompt_mask_BxL=prompt_mask(micro),  # MiLoRA routes on the prompt, as generate does
        )
        inter = mutated.get("intermediates", {})
        loss, metrics = loss_fn(logits, micro, inter, adapter_config)
        n = metrics["tokens"]
        objective = metrics["ce"] * n / jnp.maximum(n_total, 1.0) + (loss - metrics["ce"]) / grad_accum
        extra = routing_metrics(inter, micro.get("attention_mask"), routed_k) if log_routing else {}
        return objective, (dict(metrics), extra)

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)
    # With scanned layers the step runs on the adapter and optimizer state stacked over layers (padded
    # where expert counts differ): the model scans them as they are and the optimizer updates a few
    # stacked leaves instead of one per layer, which is most of the step's compile time on deep models.
    # A per-layer state is stacked on entry and cropped back on exit; the train loop passes it stacked.
    stacked = scans(model.config, adapter_config) if hasattr(model, "config") else False

    def _apply_update(operands, like):
        adapter, opt_state, grads = operands
        updates, new_opt_state = optimizer.update(grads, opt_state, adapter)
        new_adapter = optax.apply_updates(adapter, updates)
        # Finite gradients can still give a non-finite update (lr=NaN, eps=0 on a zero gradient,
        # a second moment that overflows): keep the old state then. One reduction per leaf.
        adapter_ok, opt_ok = _leaf_finite(new_adapter, like[0]), _leaf_finite(new_opt_state, like[1])
        good = jnp.all(adapter_ok) & jnp.all(opt_ok)
        kept = jax.lax.cond(good, lambda o: o[:2], lambda o: o[2:], (new_adapter, new_opt_state, adapter, opt_state))
        return kept, jnp.stack([~jnp.all(adapter_ok), ~jnp.all(opt_ok)]), jnp.stack([_first_false(adapter_ok), _first_false(opt_ok)])

    def _skip_update(operands, like):
        none = jnp.full((2,), -1, jnp.int32)
        return operands[:2], jnp.zeros((2,), bool), none

    def train_step(state: TrainState, base_params: Any, batch: Batch):
        batch = dict(batch)
        n_total = response_tokens(batch)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        per_layer = state if stacked and not is_stacked(state.adapter) else None  # stacked on entry, cropped on exit
        if per_layer is not None:
            state = stack_state(state)
        ref = per_layer if per_layer is not None else state_like if is_stacked(state.adapter) else None
        like = (None, None) if ref is None else (ref.adapter, ref.opt_state)  # per-layer shapes and leaf order
        adapter, opt_state = state.adapter, state.opt_state
        if grad_accum == 1:
            objective, (metrics, extra), grads = _one(grad_fn, adapter, base_params, batch, key, n_total)
            per_micro = jax.tree.map(lambda x: x[None], (metrics, extra))
        else:
            micro = _split_micro(batch, grad_accum, mesh)
            zeros = jax.tree.map(jnp.zeros_like, adapter)

            def body(carry, xs):
                grads_acc, obj_acc = carry
                m_batch, m = xs
                obj, aux, g = _one(grad_fn, adapter, base_params, m_batch, jax.random.fold_in(key, m), n_total)
                return (jax.tree.map(jnp.add, grads_acc, g), obj_acc + obj), aux

            (grads, objective), per_micro = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32)), (micro, jnp.arange(grad_accum))
            )
        metrics = _combine(per_micro, n_total)
        metrics["loss"] = objective

        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        loss_ok, grads_ok = jnp.isfinite(objective), _leaf_finite(grads, like[0])
        finite = loss_ok & jnp.all(grads_ok)
        # lax.cond rather than a per-leaf jnp.where: the where form made XLA's CPU compile time
        # superlinear in the number of adapter leaves (8 MoLA layers: 22 s vs 6 s with cond).
        (new_adapter, new_opt_state), update_bad, update_leaf = jax.lax.cond(
            finite, lambda o: _apply_update(o, like), lambda o: _skip_update(o, like), (adapter, opt_state, grads)
        )
        flags = jnp.concatenate([jnp.stack([~loss_ok, ~jnp.all(grads_ok)]), update_bad]).astype(jnp.int32)
        first_leaf = jnp.concatenate([jnp.array([-1], jnp.int32), _first_false(grads_ok)[None], update_leaf])
        finite = ~jnp.any(flags > 0)
        new_state = state.replace(
            step=state.step + 1,
            adapter=new_adapter,
            opt_state=new_opt_state,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1).astype(jnp.int32),
        )
        if per_layer is not None:
            new_state = unstack_state(new_state, like=per_layer)
        metrics.update(grad_norm=grad_norm, tokens=n_total, nonfinite=(~finite).astype(jnp.int32))
        metrics["nonfinite/flags"], metrics["nonfinite/leaf"] = flags, first_leaf
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.applied_updates), jnp.float32)
        return new_state, metrics

    return train_step


def _leaf_finite(tree: Any, like: Any = None) -> jax.Array:
    """bool [n_leaves]: whether each leaf of `tree` is all finite (integer leaves always are).

    With `like` (the per-layer tree that `tree` holds stacked over layers, stacking.py) the
    answer is per leaf of `like`, in its order, read off the stacked leaves (one reduction per
    stacked leaf, the padding past each layer's own shape ignored)."""
    if like is None:
        oks = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else jnp.bool_(True) for x in jax.tree.leaves(tree)]
        return jnp.stack(oks) if oks else jnp.ones((0,), bool)
    names = lambda path: tuple(path_str((k,)) for k in path)  # noqa: E731
    refs: dict[tuple, dict[int, tuple]] = {}  # stacked leaf -> layer -> that layer's shape
    order: list[tuple[tuple, int | None]] = []
    for path, ref in jax.tree_util.tree_flatten_with_path(like)[0]:
        parts = names(path)
        at = next((j for j, n in enumerate(parts) if n.startswith("layers_") and n[7:].isdigit()), None)
        if at is None:
            order.append((parts, None))
            continue
        key = parts[:at] + (LAYERS,) + parts[at + 1:]
        refs.setdefault(key, {})[int(parts[at][7:])] = np.shape(ref)
        order.append((key, int(parts[at][7:])))
    oks, offset = [], {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = names(path)
        offset[key] = sum(int(np.shape(o)[0]) for o in oks)
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            oks.append(jnp.ones((x.shape[0] if key in refs else 1,), bool))
            continue
        if key not in refs:
            oks.append(jnp.all(jnp.isfinite(x))[None])
            continue
        ok = jnp.isfinite(x)
        for d in range(1, x.ndim):  # padding past layer i's own size along dim d counts as finite
            lim = np.array([refs[key][i][d - 1] for i in range(x.shape[0])], np.int32)
            if np.all(lim == x.shape[d]):
                continue
            pad = jax.lax.broadcasted_iota(jnp.int32, x.shape, d) >= lim.reshape((-1,) + (1,) * (x.ndim - 1))
            ok = ok | pad
        oks.append(jnp.all(ok.reshape(x.shape[0], -1), axis=1))
    if not order:
        return jnp.ones((0,), bool)
    index = np.array([offset[key] + (0 if layer is None else layer) for key, layer in order], np.int32)
    return jnp.concatenate(oks)[index]


def _first_false(ok: jax.Array) -> jax.Array:
    """Index of the first False in `ok`, or -1 if there is none (int32)."""
    if ok.shape[0] == 0:
        return jnp.int32(-1)
    return jnp.where(jnp.all(ok), -1, jnp.argmin(ok)).astype(jnp.int32)


def describe_nonfinite(flags: Any, first_leaf: Any, adapter: Any, opt_state: Any) -> str:
    """'gradients (first at layers_0/self_attn/q_proj/lora_B)', from a step's nonfinite/flags and nonfinite/leaf.

    `adapter` and `opt_state` give the leaf names (their structure, e.g. the state's own trees).
    """

    flags, first_leaf = np.asarray(flags).tolist(), np.asarray(first_leaf).tolist()
    trees = (None, adapter, adapter, opt_state)  # gradients are shaped like the adapter
    parts = []
    for name, bad, leaf, tree in zip(NONFINITE_GROUPS, flags, first_leaf, trees):
        if not bad:
            continue
        if tree is not None and leaf >= 0:
            paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
            if leaf < len(paths):
                name += f" (first at {paths[leaf]})"
        parts.append(name)
    return ", ".join(parts) if parts else "nothing"


def _one(grad_fn, adapter, base, batch, key, n_total):
    (objective, aux), grads = grad_fn(adapter, base, batch, key, n_total)
    return objective, aux, grads


def _combine(per_micro: tuple[dict, dict], n_total: jax.Array) -> dict[str, jax.Array]:
    """Merge per-micro-batch metrics (leading axis A): token-weighted CE/accuracy, mean of the rest."""
    metrics, extra = per_micro
    out: dict[str, jax.Array] = {}
    n = metrics["tokens"]
    for k, v in metrics.items():
        if k in ("ce", "accuracy"):
            out[k] = jnp.sum(v * n) / jnp.maximum(n_total, 1.0)
        elif k == "tokens":
            continue
        else:
            out[k] = jnp.mean(v, axis=0)
    for k, v in extra.items():
        out[k] = jnp.mean(v, axis=0)
    return out


def _objective_loss(objective: Any) -> Callable:
    """`total_loss` with the objective's weights bound: the train step adds the terms it names."""

    def loss_fn(logits, batch, intermediates, adapter_config):
        return total_loss(logits, batch, intermediates, adapter_config, objective)

    return loss_fn


def make_eval_step(model: Any, adapter_config: Any, loss_fn: Callable | None = None, objective: Any = None) -> Callable:
    """`eval_step(adapter, base_params, batch) -> {"ce_sum", "tokens", "loss"}` (deterministic, no gradients)."""
    loss_fn = _objective_loss(objective) if loss_fn is None else loss_fn

    def eval_step(adapter, base_params, batch):
        logits, mutated = model.apply(
            {"params": base_params, "adapter": adapter},
            batch["input_ids"],
            batch.get("attention_mask"),
            deterministic=True,
            mutable=["intermediates"],
            prompt_mask_BxL=prompt_mask(batch),
        )
        loss, metrics = loss_fn(logits, batch, mutated.get("intermediates", {}), adapter_config)
        return {"ce_sum": metrics["ce"] * metrics["tokens"], "tokens": metrics["tokens"], "loss": loss}

    return eval_step


# ----------------------------------------------------------------------------- ahead-of-time compilation
def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=s), tree, shardings)


class CompiledSteps:
    """`jax.jit(step, in_shardings, out_shardings, donate_argnums=(0,)).lower(...).compile()`, one per batch shape.

    Base params are sharded by `base_shardings` (the logical rules), the state by
    `state_shardings` (replicated by default), the batch over (data, fsdp), the metrics
    replicated. `compile(batch_shapes)` may be called ahead of time for known shapes;
    calling with an unseen shape compiles it then.
    """

    def __init__(self, step_fn: Callable, mesh: Mesh, state: TrainState, state_shardings: Any, base_params: Any, base_shardings: Any, donate: bool = True) -> None:
        self.mesh = mesh
        self.state_shardings = state_shardings
        self.base_shardings = base_shardings
        self._abstract_state = _abstract(state, state_shardings)
        self._abstract_base = _abstract(base_params, base_shardings)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._step_fn, self._donate = step_fn, donate
        self._compiled: dict[tuple, Any] = {}
        self.compile_seconds: dict[tuple, float] = {}

    @staticmethod
    def _key(batch: Mapping[str, Any]) -> tuple:
        return tuple(sorted((k, tuple(np.shape(v)), str(jnp.result_type(v))) for k, v in batch.items()))

    def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def compile(self, batch: Mapping[str, Any]) -> Any:
        import time

        key = self._key(batch)
        if key not in self._compiled:
            batch_sh = self.batch_shardings(batch)
            jitted = jax.jit(
                self._step_fn,
                in_shardings=(self.state_shardings, self.base_shardings, batch_sh),
                out_shardings=(self.state_shardings, self._replicated),
                donate_argnums=(0,) if self._donate else (),
            )
            t0 = time.perf_counter()
            abstract_batch = {
                k: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v), sharding=batch_sh[k]) for k, v in batch.items()
            }
            self._compiled[key] = jitted.lower(self._abstract_state, self._abstract_base, abstract_batch).compile()
            self.compile_seconds[key] = time.perf_counter() - t0
        return self._compiled[key]

    def __call__(self, state: TrainState, base_params: Any, batch: Mapping[str, jax.Array]):
        compiled = self.compile(batch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            return compiled(state, base_params, batch)
