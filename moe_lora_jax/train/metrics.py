"""Metrics: a JSONL log (and TensorBoard when installed), routing statistics, progress, loss plots.

    with MetricsWriter(run_dir) as w:          # writes only on process 0
        w.write(step, {"loss": loss, "lr/default": lr, **routing_stats(probs, mask, top_k=2, prefix="router/layer_3")})
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")

Routing statistics take router probabilities [tokens, experts] (any leading shape
is flattened) and a token mask, and are pure jnp functions, so they also run
inside a jitted step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax.atomic import atomic_file

METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- writing
def _to_json_value(v: Any) -> Any:
    if isinstance(v, (str, bool)) or v is None:
        return v
    arr = np.asarray(v)
    if arr.ndim == 0:
        x = arr.item()
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)  # "nan", "inf", "-inf": JSON has no literal for them
        return x
    return [_to_json_value(x) for x in arr.tolist()]


def _scalar(v: Any) -> float | None:
    arr = np.asarray(v) if not isinstance(v, (str, bool)) else None
    if arr is None or arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


class MetricsWriter:
    """Appends one JSON object per `write` to out_dir/metrics.jsonl; mirrors scalars to TensorBoard.

    Only process 0 writes (pass `enabled` to override). TensorBoard output goes to
    out_dir/tensorboard when tensorboardX or tensorflow is importable; otherwise it is
    silently skipped. Appending never rewrites earlier lines, so a resumed run continues the file.
    """

    def __init__(self, out_dir: str | os.PathLike, enabled: bool | None = None, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = self.out_dir / METRICS_FILE
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            self._tb = _tensorboard_writer(self.out_dir / "tensorboard")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: jax.device_get(v) for k, v in metrics.items()}
        record = {"step": int(step), **{k: _to_json_value(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                x = _scalar(v)
                if x is not None:
                    self._tb.add_scalar(k, x, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _TFWriter:
    def __init__(self, tf: Any, logdir: Path) -> None:
        self._tf, self._w = tf, tf.summary.create_file_writer(str(logdir))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        with self._w.as_default():
            self._tf.summary.scalar(tag, value, step=step)

    def close(self) -> None:
        self._w.flush()


def _tensorboard_writer(logdir: Path) -> Any | None:
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(logdir))
    except ImportError:
        pass
    try:
        import tensorflow as tf  # noqa: F401

        return _TFWriter(tf, logdir)
    except ImportError:
        return None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl ("nan"/"inf" strings back to floats)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        out.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in rec.items()})
    return out


# ----------------------------------------------------------------------------- routing statistics
def _flatten(probs: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    probs_TxE = jnp.asarray(probs, jnp.float32).reshape(-1, probs.shape[-1])
    if mask is None:
        mask_T = jnp.ones(probs_TxE.shape[0], jnp.float32)
    else:
        mask_T = jnp.asarray(mask, jnp.float32).reshape(-1)
    return probs_TxE, mask_T


def expert_load(probs: jax.Array, mask: jax.Array | None = None, top_k: int = 1) -> jax.Array:
    """Fraction of (masked) token-to-expert assignments each expert gets under top-k routing [E]; sums to 1."""
    probs_TxE, mask_T = _flatten(probs, mask)
    E = probs_TxE.shape[-1]
    _, chosen_TxK = jax.lax.top_k(probs_TxE, min(top_k, E))
    counts_E = jnp.sum(jax.nn.one_hot(chosen_TxK, E) * mask_T[:, None, None], axis=(0, 1))
    return counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)


def expert_importance(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean router probability of each expert over masked tokens [E]."""
    probs_TxE, mask_T = _flatten(probs, mask)
    return jnp.sum(probs_TxE * mask_T[:, None], axis=0) / jnp.maximum(jnp.sum(mask_T), 1.0)


def routing_entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean per-token entropy (nats) of the router distribution over masked tokens."""
    probs_TxE, mask_T = _flatten(probs, mask)
    ent_T = -jnp.sum(jnp.where(probs_TxE > 0, probs_TxE * jnp.log(jnp.where(probs_TxE > 0, probs_TxE, 1.0)), 0.0), axis=-1)
    return jnp.sum(ent_T * mask_T) / jnp.maximum(jnp.sum(mask_T), 1.0)


def routing_stats(probs: jax.Array, mask: jax.Array | None = None, top_k: int = 1, prefix: str = "router") -> dict[str, jax.Array]:
    """Scalars for one router: entropy, normalised entropy, load min/max and CV^2 of the load.

    `entropy_norm` divides by log(E) (1 = uniform routing); `load_cv2` is 0 for a perfectly
    balanced load and grows as experts are starved. `load` is the per-expert vector.
    """
    load_E = expert_load(probs, mask, top_k)
    E = load_E.shape[0]
    ent = routing_entropy(probs, mask)
    mean = jnp.mean(load_E)
    return {
        f"{prefix}/entropy": ent,
        f"{prefix}/entropy_norm": ent / jnp.log(float(E)) if E > 1 else jnp.zeros(()),
        f"{prefix}/load_max": jnp.max(load_E),
        f"{prefix}/load_min": jnp.min(load_E),
        f"{prefix}/load_cv2": jnp.var(load_E) / jnp.maximum(mean * mean, 1e-12),
        f"{prefix}/load": load_E,
    }


def layer_routing_stats(
    probs_per_layer: Mapping[str, jax.Array] | Sequence[jax.Array],
    mask: jax.Array | None = None,
    top_k: int = 1,
    prefix: str = "router",
) -> dict[str, jax.Array]:
    """`routing_stats` for every layer (keys prefix/<layer>/...) plus their means (prefix/mean/...)."""
    items = probs_per_layer.items() if isinstance(probs_per_layer, Mapping) else enumerate(probs_per_layer)
    out: dict[str, jax.Array] = {}
    per_key: dict[str, list[jax.Array]] = {}
    for name, probs in items:
        for k, v in routing_stats(probs, mask, top_k, prefix=f"{prefix}/{name}").items():
            out[k] = v
            stat = k.rsplit("/", 1)[1]
            if stat != "load":
                per_key.setdefault(stat, []).append(v)
    for stat, values in per_key.items():
        out[f"{prefix}/mean/{stat}"] = jnp.mean(jnp.stack(values))
    return out


# ----------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar with ETA (steps/s and remaining time), shown only on process 0.

        with Progress(total=steps, initial=start_step) as bar:
            bar.update(1, loss=0.93)
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool | None = None, **tqdm_kwargs: Any) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, **tqdm_kwargs)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)

    @property
    def n(self) -> int:
        return int(self._bar.n) if self._bar is not None else 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> str:
    x = _scalar(jax.device_get(v)) if not isinstance(v, str) else None
    return v if x is None else f"{x:.4g}"


# ----------------------------------------------------------------------------- plots
def plot_losses(
    metrics: str | os.PathLike | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike,
    keys: Sequence[str] = ("loss", "eval/loss"),
    title: str | None = None,
) -> Path:
    """Plot each key that appears in the records against step; write a PNG (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and _scalar(r[key]) is not None]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, label=key, marker="." if len(pts) < 50 else None)
            plotted += 1
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    if plotted:
        ax.legend()
    ax.grid(alpha=0.3)

    out = Path(out_png)
    with atomic_file(out, overwrite=True, suffix=".png") as tmp:  # a run's own plot: replaced in one step
        fig.savefig(tmp, format="png")
    return out
