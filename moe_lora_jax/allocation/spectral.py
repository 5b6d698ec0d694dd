"""Empirical spectral densities of weight matrices and Hill estimates of their power-law tail.

For a weight matrix W the ESD is the set of eigenvalues of W^T W, i.e. the squared
singular values. Heavy-tailed self-regularisation (HT-SR) fits a power law
p(lambda) ~ lambda^-alpha to its tail, lambda >= xmin; the exponent alpha
("PL_Alpha_Hill") is the metric AlphaLoRA allocates experts by.

Given the sorted eigenvalues lambda_0 <= ... <= lambda_{N-1} and a candidate
xmin = lambda_i, the continuous maximum-likelihood (Hill) estimate is

    alpha_i = 1 + n_i / sum_{j >= i} log(lambda_j / lambda_i),   n_i = N - i,

and the Kolmogorov-Smirnov distance of that fit is

    D_i = max_{j >= i} | 1 - (lambda_j / lambda_i)^(1 - alpha_i) - (j - i) / n_i |.

The estimators differ in how they pick xmin:

* ``median`` (TempBalance, YefanZhou/TempBalance `net_esd_estimator`): xmin is
  lambda_k with k = N // 2 (the upper median), no search.
* ``fix-finger`` (AlphaLoRA `expert_number.py`; WeightWatcher `fix_fingers=
  'xmin_peak'`): histogram log10(lambda) in 100 equal bins, take the left edge
  of the fullest bin as the peak p, and keep the candidate with the smallest D
  among the eigenvalues in a window around p.
* ``ks`` (WeightWatcher's default fit, Clauset et al.): keep the candidate with
  the smallest D among all eigenvalues but the largest.

Candidates with alpha <= 1 (not a normalisable power law) are never selected.
Every candidate is evaluated at once on an N x N triangle of log-ratios with jnp
(no Python loop over xmin), batched over matrices of the same size, jitted, on
whatever device JAX uses.
"""

from __future__ import annotations

import dataclasses
import math
import re
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_lora_jax import layout
from moe_lora_jax.allocation.allocation import ALL_MODULES
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.stacking import unstack_layers

ESTIMATORS = ("median", "fix-finger", "ks")
FIX_FINGER_RANGES = ("quirk", "corrected")
DTYPES = ("float32", "float64")
MIN_EIGS = 20  # fewer eigenvalues than this: no fit (WeightWatcher switches to a small-sample rule below 20)
WW_EVALS_THRESH = 1e-5  # WeightWatcher drops eigenvalues <= 1e-5 before fitting (constants.EVALS_THRESH)


# ============================================================================ options
@dataclasses.dataclass(frozen=True)
class HillOptions:
    """How to fit the tail of one ESD.

    estimator: "median" | "fix-finger" | "ks".
    eig_threshold: eigenvalues <= this are dropped before fitting (non-positive
        ones always are). None means the reference implementation's choice: 0 for
        median (TempBalance) and fix-finger (AlphaLoRA), 1e-5 for ks (WeightWatcher).
    bins: histogram bins for fix-finger (100 in AlphaLoRA and WeightWatcher).
    fix_finger_range: "quirk" (default) reproduces the reference search window,
        "corrected" uses the intended [0.95 p, 1.5 p]; see `_peak_window`.
    drop_top_candidate: drop the largest eigenvalue of the fix-finger window
        from the candidates, as the `powerlaw` package does when WeightWatcher
        passes it an xmin range (it never fits at the last value of a range).
        AlphaLoRA keeps it (it only excludes the overall largest eigenvalue).
    max_alpha: fix-finger and ks only: never select a candidate with alpha >=
        this. None (default) has no upper bound, as AlphaLoRA, WeightWatcher's
        own fit and powerlaw 1.x; powerlaw 2.x treats alpha >= 3 as out of range
        (Power_Law's parameter range (0, 3)), so WeightWatcher with
        pl_package='powerlaw' on powerlaw 2.x matches max_alpha=3.
    """

    estimator: str = "fix-finger"
    eig_threshold: float | None = None
    bins: int = 100
    fix_finger_range: str = "quirk"
    drop_top_candidate: bool = False
    max_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise MoeLoraError(f"unknown estimator {self.estimator!r}: choose from {', '.join(ESTIMATORS)}")
        if self.fix_finger_range not in FIX_FINGER_RANGES:
            raise MoeLoraError(
                f"unknown fix_finger_range {self.fix_finger_range!r}: choose from {', '.join(FIX_FINGER_RANGES)}"
            )
        if not isinstance(self.bins, int) or self.bins < 2:
            raise MoeLoraError(f"bins={self.bins!r}: give an integer >= 2")
        if self.eig_threshold is not None and not (math.isfinite(self.eig_threshold) and self.eig_threshold >= 0):
            raise MoeLoraError(f"eig_threshold={self.eig_threshold!r}: give a finite number >= 0, or None")
        if self.max_alpha is not None and not (self.max_alpha > 1):
            raise MoeLoraError(f"max_alpha={self.max_alpha!r}: give a number > 1, or None for no bound")

    @property
    def threshold(self) -> float:
        if self.eig_threshold is not None:
            return float(self.eig_threshold)
        return WW_EVALS_THRESH if self.estimator == "ks" else 0.0

    @classmethod
    def weightwatcher(cls, fix_fingers: bool = False, powerlaw_max_alpha: float | None = None) -> "HillOptions":
        """WeightWatcher 0.7's settings: its default fit, or fix_fingers='xmin_peak' with pl_package='powerlaw'.

        powerlaw_max_alpha: 3.0 to match the powerlaw 2.x package's range check (see `max_alpha`).
        """
        if fix_fingers:
            return cls("fix-finger", eig_threshold=WW_EVALS_THRESH, drop_top_candidate=True,
                       max_alpha=powerlaw_max_alpha)
        return cls("ks", eig_threshold=WW_EVALS_THRESH)

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "eig_threshold": self.threshold}


# ============================================================================ estimators (pure jnp)
def _usable_start(lam: jax.Array, threshold: float) -> jax.Array:
    """Index of the first eigenvalue kept: `lam` is sorted, so the kept ones are a suffix."""
    return jnp.sum(~(lam > threshold)).astype(jnp.int32)


def tail_fits(log_lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_i, D_i) for every candidate xmin = lambda_i of one sorted ESD, given log(lambda).

    Row i of an N x N triangle holds log(lambda_j / lambda_i) for j >= i; its sum
    gives the Hill estimate and the same triangle gives the KS distance. The last
    row (a tail of one point) comes out as alpha = inf and is never selected.
    """
    n_eigs = log_lam.shape[-1]
    i = jnp.arange(n_eigs)[:, None]
    j = jnp.arange(n_eigs)[None, :]
    upper = j >= i
    log_ratio = jnp.where(upper, log_lam[None, :] - log_lam[:, None], 0.0)
    n_tail = (n_eigs - jnp.arange(n_eigs)).astype(log_lam.dtype)
    alpha = 1.0 + n_tail / jnp.sum(log_ratio, axis=-1)
    cdf_fit = 1.0 - jnp.exp((1.0 - alpha)[:, None] * log_ratio)
    cdf_emp = (j - i).astype(log_lam.dtype) / n_tail[:, None]
    ks = jnp.max(jnp.where(upper, jnp.abs(cdf_fit - cdf_emp), 0.0), axis=-1)
    return alpha, ks


def tail_fit_at(log_lam: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, D) for the single candidate xmin = lambda_k (O(N))."""
    n_eigs = log_lam.shape[-1]
    j = jnp.arange(n_eigs)
    upper = j >= k
    log_ratio = jnp.where(upper, log_lam - log_lam[k], 0.0)
    n_tail = (n_eigs - k).astype(log_lam.dtype)
    alpha = 1.0 + n_tail / jnp.sum(log_ratio)
    cdf_fit = 1.0 - jnp.exp((1.0 - alpha) * log_ratio)
    cdf_emp = (j - k).astype(log_lam.dtype) / n_tail
    ks = jnp.max(jnp.where(upper, jnp.abs(cdf_fit - cdf_emp), 0.0))
    return alpha, ks


def log10_histogram_peak(lam: jax.Array, first: jax.Array, bins: int) -> jax.Array:
    """Left edge p (in lambda units) of the fullest of `bins` equal bins of log10(lambda[first:]).

    Binning follows numpy.histogram (edges from linspace(min, max, bins + 1), each
    value checked against its edges, the last bin closed), which is what
    WeightWatcher calls; AlphaLoRA's torch.histc bins the same way up to float
    rounding at the edges. Ties go to the lowest bin (argmax), as in both.
    """
    n_eigs = lam.shape[-1]
    usable = jnp.arange(n_eigs) >= first
    h = jnp.log10(jnp.where(usable, lam, 1.0))
    lo = h[jnp.minimum(first, n_eigs - 1)]
    hi = h[n_eigs - 1]
    width = hi - lo
    safe = jnp.where(width > 0, width, 1.0)
    edges = jnp.arange(bins + 1, dtype=lam.dtype) * (width / bins) + lo
    edges = edges.at[bins].set(hi)
    idx = jnp.floor((h - lo) * (bins / safe)).astype(jnp.int32)
    idx = jnp.clip(idx, 0, bins - 1)
    idx = jnp.where(h < edges[idx], idx - 1, idx)
    idx = jnp.where((h >= edges[jnp.minimum(idx + 1, bins)]) & (idx != bins - 1), idx + 1, idx)
    idx = jnp.clip(idx, 0, bins - 1)
    counts = jnp.zeros(bins, jnp.int32).at[idx].add(usable.astype(jnp.int32))
    return 10.0 ** edges[jnp.argmax(counts)]


def _peak_window(lam: jax.Array, peak: jax.Array, corrected: bool) -> jax.Array:
    """Mask of eigenvalues inside the fix-finger search window around the peak p.

    The quirk: AlphaLoRA (`xmin_min = torch.log10(0.95 * xmin2)`, copied from
    TempBalance's `net_esd_estimator`) and WeightWatcher (`xmin_range =
    (np.log10(0.95 * xmin2), xmin_max)`, handed to powerlaw.Fit as an xmin range)
    both take the log10 of the intended lower bound and then compare it with
    eigenvalues in linear units, while the upper bound 1.5 p stays linear. Since
    log10(y) < y, the lower bound is always far below 0.95 p: for p < ~1.05 it is
    negative and the window becomes every eigenvalue up to 1.5 p; for larger p it
    starts at log10(0.95 p). "corrected" searches [0.95 p, 1.5 p] instead.
    """
    lower = 0.95 * peak if corrected else jnp.log10(0.95 * peak)
    return (lam >= lower) & (lam <= 1.5 * peak)


def hill_estimate(lam: jax.Array, options: HillOptions) -> dict[str, jax.Array]:
    """Fit one sorted (ascending) ESD; pure and jit/vmap-able (`options` is static).

    Returns alpha (nan when no candidate qualifies), xmin, ks (the KS distance),
    lambda_max, alpha_hat = alpha * log10(lambda_max), num_fit (eigenvalues kept
    after the threshold), num_tail (eigenvalues >= xmin), and for fix-finger the
    histogram peak.
    """
    n_eigs = lam.shape[-1]
    idx = jnp.arange(n_eigs)
    first = _usable_start(lam, options.threshold)
    usable = idx >= first
    log_lam = jnp.log(jnp.where(usable, lam, 1.0))
    peak = jnp.asarray(jnp.nan, lam.dtype)
    if options.estimator == "median":
        k = first + (n_eigs - first) // 2  # TempBalance: i = int(len(nz_eigs) / 2)
        k = jnp.minimum(k, n_eigs - 1)
        alpha, ks = tail_fit_at(log_lam, k)
        found = (n_eigs - first >= 2) & (k <= n_eigs - 2) & jnp.isfinite(alpha)
    else:
        alphas, kss = tail_fits(log_lam)
        if options.estimator == "ks":
            candidate = usable & (idx <= n_eigs - 2)
        else:
            peak = log10_histogram_peak(lam, first, options.bins)
            candidate = usable & _peak_window(lam, peak, options.fix_finger_range == "corrected")
            if options.drop_top_candidate:
                top = n_eigs - 1 - jnp.argmax(candidate[::-1])
                candidate = candidate & (idx != top)
            else:
                candidate = candidate & (idx <= n_eigs - 2)
        ok = candidate & (alphas > 1.0) & jnp.isfinite(alphas) & jnp.isfinite(kss)
        if options.max_alpha is not None:
            ok = ok & (alphas < options.max_alpha)
        k = jnp.argmin(jnp.where(ok, kss, jnp.inf))  # first minimum, as np/torch argmin
        found = jnp.any(ok)
        alpha, ks = alphas[k], kss[k]
    lam_max = lam[n_eigs - 1]
    alpha = jnp.where(found, alpha, jnp.nan)
    return {
        "alpha": alpha,
        "xmin": jnp.where(found, lam[k], jnp.nan),
        "ks": jnp.where(found, ks, jnp.nan),
        "lambda_max": lam_max,
        "alpha_hat": alpha * jnp.log10(lam_max),
        "num_fit": (n_eigs - first).astype(jnp.int32),
        "num_tail": jnp.where(found, n_eigs - k, 0).astype(jnp.int32),
        "peak": peak,
    }


@partial(jax.jit, static_argnames=("options", "batch_size"))
def _hill_batch(lam_BxN: jax.Array, options: HillOptions, batch_size: int) -> dict[str, jax.Array]:
    return jax.lax.map(lambda lam: hill_estimate(lam, options), lam_BxN, batch_size=batch_size)


def _fit_batch_size(n_eigs: int) -> int:
    """Matrices per step so one N x N float triangle stack stays near 16M elements."""
    return max(1, min(256, (1 << 24) // max(1, n_eigs * n_eigs)))


def fit_esds(eigs: Sequence[np.ndarray], options: HillOptions, *, dtype: str = "float32") -> list[dict[str, Any]]:
    """Hill fits of many sorted ESDs; ESDs of equal length are stacked and fitted in one jitted call."""
    _check_dtype(dtype)
    out: list[dict[str, Any] | None] = [None] * len(eigs)
    by_len: dict[int, list[int]] = {}
    for n, e in enumerate(eigs):
        by_len.setdefault(int(np.shape(e)[-1]), []).append(n)
    with _x64(dtype):
        for n_eigs, members in by_len.items():
            stack = jnp.asarray(np.stack([np.asarray(eigs[m]) for m in members]), dtype=dtype)
            res = jax.device_get(_hill_batch(stack, options, _fit_batch_size(n_eigs)))
            for row, m in enumerate(members):
                out[m] = {key: value[row].item() for key, value in res.items()}
    return out  # type: ignore[return-value]


# ============================================================================ eigenvalues
def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise MoeLoraError(f"unknown dtype {dtype!r}: choose float32 or float64")


def _x64(dtype: str):
    return jax.enable_x64(True) if dtype == "float64" else nullcontext()


@jax.jit
def _squared_singular_values(w_BxMxN: jax.Array) -> jax.Array:
    s = jnp.linalg.svd(w_BxMxN, compute_uv=False)
    return jnp.sort(s * s, axis=-1)


def _blas_single_thread():
    """Limit BLAS/LAPACK to one thread (threadpoolctl, when installed).

    The SVD runs in LAPACK on CPU; with several threads per call on these small
    matrices OpenBLAS spends its time synchronising (4.4 s instead of 6.7 s for
    SmolLM2's 210 matrices on 2 cores). jaxlib loads its LAPACK lazily on the
    first decomposition, so one tiny SVD runs first: otherwise the limit would
    miss that library.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    _squared_singular_values(jnp.ones((1, 2, 2), jnp.float32)).block_until_ready()
    return threadpool_limits(limits=1, user_api="blas")


def esd(
    matrices: Mapping[Hashable, Any] | Sequence[Any],
    *,
    dtype: str = "float32",
    chunk: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Sorted eigenvalues of W^T W (squared singular values) of each matrix, on JAX's device.

    Matrices of the same shape (up to a transpose) are stacked and decomposed in
    chunks of `chunk` by a jitted `jnp.linalg.svd(compute_uv=False)`, one chunk
    after the other: dispatching chunks from several Python threads deadlocks
    XLA's CPU client on a 2-core machine (seen with jaxlib 0.10), so there is no
    thread pool. `progress(n)` is called after each chunk with the number of
    matrices done. Non-finite weights raise MoeLoraError naming the matrix.
    """
    _check_dtype(dtype)
    keys = list(matrices.keys()) if isinstance(matrices, Mapping) else list(range(len(matrices)))
    mats = list(matrices.values()) if isinstance(matrices, Mapping) else list(matrices)
    host = [_checked_tall(key, w) for key, w in zip(keys, mats)]
    groups: dict[tuple[int, int], list[int]] = {}
    for n, a in enumerate(host):
        groups.setdefault(a.shape, []).append(n)
    tasks = [members[s : s + chunk] for members in groups.values() for s in range(0, len(members), chunk)]
    out: list[np.ndarray | None] = [None] * len(host)
    with _blas_single_thread() if jax.default_backend() == "cpu" else nullcontext(), _x64(dtype):
        for task in tasks:
            stack_BxMxN = jnp.asarray(np.stack([host[n] for n in task]), dtype=dtype)
            eigs_BxN = np.asarray(_squared_singular_values(stack_BxMxN))
            for row, n in enumerate(task):
                out[n] = eigs_BxN[row]
            if progress:
                progress(len(task))
    return out  # type: ignore[return-value]


def _checked_tall(key: Hashable, w: Any) -> np.ndarray:
    """The matrix as a host array with rows >= columns (same singular values, cheaper SVD); rejects bad input."""
    a = np.asarray(w)
    if a.ndim != 2:
        raise MoeLoraError(f"matrix {_name(key)} has shape {a.shape}: expected a 2-D weight matrix")
    if not np.all(np.isfinite(a)):
        raise MoeLoraError(
            f"matrix {_name(key)} has non-finite weights (NaN or inf): check the checkpoint, or exclude that module"
        )
    return a.T if a.shape[0] < a.shape[1] else a


# ============================================================================ model layout
def target_matrices(params: Mapping[str, Any], modules: Sequence[str] = ALL_MODULES) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, module): kernel as a host array [in, out]} for the LLaMA params of `load_hf_llama`.

    Kernels sit at params[*layout.param_path(module, i)]["kernel"] (moe_lora_jax.layout).
    """
    if isinstance(params, Mapping) and "params" in params and not any(k.startswith("layers_") for k in params):
        params = params["params"]  # a Flax variables dict
    if not isinstance(params, Mapping):
        raise MoeLoraError(f"params is a {type(params).__name__}: pass the params dict returned by load_hf_llama")
    params = unstack_layers(params)  # layers stacked for the scanned model: per layer again
    unknown = [m for m in modules if m not in layout.ALL]
    if unknown:
        raise MoeLoraError(f"unknown target modules {unknown}: choose from {', '.join(ALL_MODULES)}")
    layer_ids = sorted(int(m.group(1)) for k in params if (m := re.fullmatch(r"layers_(\d+)", str(k))))
    if not layer_ids:
        raise MoeLoraError("params have no layers_<i> entries: pass the params dict returned by load_hf_llama")
    if layer_ids != list(range(len(layer_ids))):
        raise MoeLoraError(f"params have layers {layer_ids}: expected layers_0 ... layers_{len(layer_ids) - 1}")
    out: dict[tuple[int, str], np.ndarray] = {}
    for i in layer_ids:
        for m in modules:
            _, block, proj = layout.param_path(m, i)
            try:
                kernel = params[f"layers_{i}"][block][proj]["kernel"]
            except (KeyError, TypeError):
                raise MoeLoraError(
                    f"params lack layers_{i}/{block}/{proj}/kernel: pass the params dict returned by load_hf_llama"
                ) from None
            out[(i, m)] = np.asarray(jax.device_get(kernel), dtype=np.float32)
    return out


def _name(key: Hashable) -> str:
    if isinstance(key, tuple) and len(key) == 2:
        return f"layer {key[0]} {key[1]}"
    return str(key)


# ============================================================================ analysis
@dataclasses.dataclass(frozen=True)
class MatrixFit:
    """The fit of one weight matrix. status is "ok" or why alpha is missing (nan)."""

    layer: int
    module: str
    alpha: float
    xmin: float
    lambda_max: float
    num_eigs: int
    alpha_hat: float
    ks_distance: float
    num_fit: int
    num_tail: int
    shape: tuple[int, int]
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def analyze_matrices(
    matrices: Mapping[tuple[int, str], Any],
    options: HillOptions | None = None,
    *,
    dtype: str = "float32",
    progress: bool = False,
) -> list[MatrixFit]:
    """ESD + Hill fit of each {(layer, module): matrix}; rows in (layer, module order) order.

    Matrices with fewer than MIN_EIGS eigenvalues, or with no usable candidate,
    come back with alpha = nan and a status that says why.
    """
    options = options or HillOptions()
    keys = sorted(matrices, key=lambda k: (k[0], ALL_MODULES.index(k[1]) if k[1] in ALL_MODULES else 99, str(k[1])))
    shapes = {k: tuple(int(s) for s in np.shape(matrices[k])) for k in keys}
    small = [k for k in keys if len(shapes[k]) == 2 and min(shapes[k]) < MIN_EIGS]
    big = [k for k in keys if k not in small]
    bar = _progress_bar(len(big), "spectra", progress)
    try:
        eigs = esd({k: matrices[k] for k in big}, dtype=dtype, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    fits = dict(zip(big, fit_esds(eigs, options, dtype=dtype)))
    rows: list[MatrixFit] = []
    for k in keys:
        shape = shapes[k]
        if k in small:
            # tiny matrices: report what we can, no fit
            if not np.all(np.isfinite(np.asarray(matrices[k]))):
                raise MoeLoraError(f"matrix {_name(k)} has non-finite weights (NaN or inf): check the checkpoint")
            s = np.linalg.svd(np.asarray(matrices[k], dtype=np.float64), compute_uv=False)
            lam_max = float(s.max() ** 2) if s.size else math.nan
            rows.append(
                MatrixFit(k[0], k[1], math.nan, math.nan, lam_max, min(shape), math.nan, math.nan, 0, 0, shape,
                          f"too small: {min(shape)} eigenvalues < {MIN_EIGS}")
            )
            continue
        f = fits[k]
        status = "ok"
        if not math.isfinite(f["alpha"]):
            status = "no fit: no candidate xmin with alpha > 1" if f["num_fit"] >= 2 else "no fit: all eigenvalues below threshold"
        rows.append(
            MatrixFit(
                layer=int(k[0]), module=str(k[1]), alpha=f["alpha"], xmin=f["xmin"], lambda_max=f["lambda_max"],
                num_eigs=min(shape), alpha_hat=f["alpha_hat"], ks_distance=f["ks"], num_fit=int(f["num_fit"]),
                num_tail=int(f["num_tail"]), shape=shape, status=status,
            )
        )
    return rows


def analyze_params(
    params: Mapping[str, Any],
    options: HillOptions | None = None,
    *,
    modules: Sequence[str] = ALL_MODULES,
    dtype: str = "float32",
    progress: bool = False,
) -> list[MatrixFit]:
    """`analyze_matrices` on the target matrices of LLaMA params."""
    return analyze_matrices(target_matrices(params, modules), options, dtype=dtype, progress=progress)


def layer_metric(fits: Iterable[MatrixFit], num_layers: int | None = None, field: str = "alpha") -> list[float]:
    """Per-layer mean of `field` over that layer's matrices (AlphaLoRA's layer metric); nan if none fitted."""
    fits = list(fits)
    n = num_layers if num_layers is not None else (max(f.layer for f in fits) + 1 if fits else 0)
    sums = [0.0] * n
    counts = [0] * n
    for f in fits:
        value = getattr(f, field)
        if f.ok and math.isfinite(value):
            sums[f.layer] += value
            counts[f.layer] += 1
    return [s / c if c else math.nan for s, c in zip(sums, counts)]


def module_metric(fits: Iterable[MatrixFit], num_layers: int | None = None, field: str = "alpha") -> dict[str, list[float]]:
    """{module: per-layer `field`} (nan where that matrix has no fit)."""
    fits = list(fits)
    n = num_layers if num_layers is not None else (max(f.layer for f in fits) + 1 if fits else 0)
    out: dict[str, list[float]] = {}
    for f in fits:
        row = out.setdefault(f.module, [math.nan] * n)
        value = getattr(f, field)
        row[f.layer] = value if f.ok else math.nan
    return {m: out[m] for m in sorted(out, key=lambda m: ALL_MODULES.index(m) if m in ALL_MODULES else 99)}


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="matrix")
