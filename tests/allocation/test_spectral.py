"""ESD + Hill estimators on the embedded SmolLM2, against weightwatcher 0.7.7 and AlphaLoRA's estimator.

The embedded SmolLM2 is 4-bit quantized (Q4_1 GGUF) and dequantized on load: the
alphas here describe the quantized matrices.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from moe_lora_jax.allocation import ALL_MODULES, HillOptions, analyze_matrices, esd, fit_esds, layer_metric, target_matrices
from moe_lora_jax.allocation.spectral import MIN_EIGS, tail_fits
from moe_lora_jax.errors import MoeLoraError

# weightwatcher re-does every SVD in scipy and (for fix-fingers) fits each candidate xmin with
# the powerlaw package, one Python object per candidate: 3 layers x 7 modules (first, middle,
# last) keep both comparisons near 10 s on 2 cores, and cover every matrix shape of the model.
WW_LAYERS = (0, 14, 29)


@pytest.fixture(scope="module")
def matrices(smollm2):
    return target_matrices(smollm2[1])


@pytest.fixture(scope="module")
def eigs64(matrices):
    """float64 ESDs of all 210 matrices, keyed like `matrices`."""
    keys = list(matrices)
    return dict(zip(keys, esd([matrices[k] for k in keys], dtype="float64")))


# ----------------------------------------------------------------------------- AlphaLoRA transcription
def alphalora_fix_finger(eigs: np.ndarray, bins: int = 100) -> float:
    """expert_number.py `fix_finger` (filter_zeros=False), in numpy float64, on ascending eigenvalues.

    torch.histc(min, max) and np.histogram(range=(min, max)) bin alike; the window's lower
    bound is log10(0.95 p) compared with eigenvalues, as in the reference.
    """
    n_all = len(eigs)
    log_eigs = np.log(eigs)
    alphas = np.zeros(n_all - 1)
    ds = np.ones(n_all - 1)
    log10_eigs = np.log10(eigs)
    counts, edges = np.histogram(log10_eigs, bins=bins, range=(log10_eigs.min(), log10_eigs.max()))
    peak = 10 ** edges[np.argmax(counts)]
    xmin_min, xmin_max = np.log10(0.95 * peak), 1.5 * peak
    for i, xmin in enumerate(eigs[:-1]):
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(n_all - i)
        alpha = 1 + n / (np.sum(log_eigs[i:]) - n * log_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = np.max(np.abs(1 - (eigs[i:] / xmin) ** (-alpha + 1) - np.arange(n) / n))
    return float(alphas[np.argmin(ds)])


def tempbalance_median(eigs: np.ndarray) -> float:
    """TempBalance's `xmin_mid`: xmin = the eigenvalue at index N // 2."""
    i = len(eigs) // 2
    n = float(len(eigs) - i)
    return float(1 + n / (np.sum(np.log(eigs[i:])) - n * np.log(eigs[i])))


@pytest.fixture(scope="module")
def fix_finger64(eigs64):
    """(keys, fits) of AlphaLoRA's estimator on all 210 float64 ESDs."""
    keys = list(eigs64)
    return keys, fit_esds([eigs64[k] for k in keys], HillOptions("fix-finger"), dtype="float64")


def test_fix_finger_matches_alphalora_on_all_matrices(eigs64, fix_finger64):
    keys, ours = fix_finger64
    worst = 0.0
    for k, fit in zip(keys, ours):
        ref = alphalora_fix_finger(eigs64[k])
        worst = max(worst, abs(fit["alpha"] - ref) / ref)
    assert len(keys) == 210
    assert worst < 1e-6, worst


def test_fix_finger_end_to_end_against_numpy_svd(matrices):
    """Our whole path (jnp SVD + fit) against the transcription on numpy's float64 SVD, 3 layers."""
    sub = {k: w for k, w in matrices.items() if k[0] in WW_LAYERS}
    fits64 = analyze_matrices(sub, HillOptions("fix-finger"), dtype="float64")
    fits32 = analyze_matrices(sub, HillOptions("fix-finger"))
    worst64 = worst32 = 0.0
    for f64, f32 in zip(fits64, fits32):
        s = np.linalg.svd(sub[(f64.layer, f64.module)].astype(np.float64), compute_uv=False)
        ref = alphalora_fix_finger(np.sort(s * s))
        worst64 = max(worst64, abs(f64.alpha - ref) / ref)
        worst32 = max(worst32, abs(f32.alpha - ref) / ref)
    assert worst64 < 1e-6, worst64
    assert worst32 < 1e-4, worst32  # the float32 default: same xmin, round-off only


def test_alphalora_allocation_of_the_embedded_model_matches_expert_number_py(fix_finger64):
    """AlphaLoRA's allocation of SmolLM2 (per-layer mean alpha, beta 2.5): the library's default
    rounding and top-k against the transcription of expert_number.py, at the quickstart's budget
    and at AlphaLoRA's 160."""
    from test_allocate import expert_number_reference

    from moe_lora_jax.allocation import allocate_alphalora

    keys, fits = fix_finger64
    metric = [float(np.mean([f["alpha"] for k, f in zip(keys, fits) if k[0] == layer])) for layer in range(30)]
    for total in (90, 160):
        expected, _ = expert_number_reference(metric, total, 2.5)
        alloc = allocate_alphalora(metric, total)
        assert alloc.experts_per_layer == expected.tolist()
        assert alloc.top_k("q") == tuple(2 if n > 1 else 1 for n in expected)
    assert 1 in allocate_alphalora(metric, 90).experts_per_layer  # the quickstart budget has top-1 layers


def test_quickstart_adapter_resolves_on_the_embedded_model(smollm2, fix_finger64, monkeypatch):
    """The quickstart's adapter section (AlphaLoRA recipe, no min_experts) builds on SmolLM2: layers the
    authors' rounding gives one expert route top-1. The spectra are the fixture's (not re-analysed)."""
    import moe_lora_jax.allocation.recipes as recipes
    from moe_lora_jax.train.config import load_config
    from moe_lora_jax.train.loop import adapter_config_from

    keys, fits = fix_finger64
    metric = [float(np.mean([f["alpha"] for k, f in zip(keys, fits) if k[0] == layer])) for layer in range(30)]
    monkeypatch.setattr(recipes, "analyze_params", lambda *a, **k: None)
    monkeypatch.setattr(recipes, "layer_metric", lambda fits, num_layers: metric)
    raw = load_config(Path(__file__).resolve().parents[2] / "experiments" / "configs" / "quickstart.yaml").adapter
    assert "min_experts" not in raw["allocation"]
    ac = adapter_config_from(raw, smollm2[1], smollm2[0])  # validates against the model (spectra patched)
    counts = ac.allocation.counts("q")
    assert sum(counts) == 90 and 1 in counts and ac.allocation.method == "alphalora"
    assert [ac.layer_top_k("v", i, n) for i, n in enumerate(counts)] == [1 if n == 1 else 2 for n in counts]


def test_median_matches_tempbalance(eigs64):
    keys = list(eigs64)[:70]
    ours = fit_esds([eigs64[k] for k in keys], HillOptions("median"), dtype="float64")
    rel = [abs(f["alpha"] - tempbalance_median(eigs64[k])) / tempbalance_median(eigs64[k]) for k, f in zip(keys, ours)]
    assert max(rel) < 1e-9


def test_esd_matches_numpy(matrices):
    for key in [(0, "q"), (3, "k"), (29, "down")]:
        w = matrices[key]
        (ours,) = esd([w])
        ref = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
        assert ours.shape == (min(w.shape),)
        np.testing.assert_allclose(ours[-50:], ref[-50:], rtol=1e-4)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * ref[-1])


# ----------------------------------------------------------------------------- weightwatcher
def _ww_details(matrices, keys, **analyze_kwargs):
    """weightwatcher's per-layer details for the given matrices, as torch Linear layers in `keys` order."""
    torch = pytest.importorskip("torch")
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    net = torch.nn.Sequential(*[torch.nn.Linear(*matrices[k].shape, bias=False) for k in keys])
    with torch.no_grad():
        for linear, k in zip(net, keys):
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(matrices[k].T)))  # torch: [out, in]
    details = ww.WeightWatcher(model=net).analyze(**analyze_kwargs)
    assert len(details) == len(keys)
    return details


def _subset(matrices):
    return {k: matrices[k] for k in sorted(matrices, key=lambda k: (k[0], ALL_MODULES.index(k[1]))) if k[0] in WW_LAYERS}


def test_ks_matches_weightwatcher_default_fit(matrices):
    sub = _subset(matrices)
    details = _ww_details(matrices, list(sub))
    fits = analyze_matrices(sub, HillOptions.weightwatcher())  # float32, the default precision
    compared = 0
    for fit, (_, row) in zip(fits, details.iterrows()):
        if row["alpha"] > 0 and fit.ok:  # weightwatcher reports -1 for a failed fit
            assert fit.alpha == pytest.approx(row["alpha"], rel=1e-3)
            assert fit.xmin == pytest.approx(row["xmin"], rel=1e-3)
            assert fit.lambda_max == pytest.approx(row["lambda_max"], rel=1e-4)
            assert fit.num_tail == row["num_pl_spikes"]
            compared += 1
    assert compared == 21


@pytest.fixture
def powerlaw_2_shim(monkeypatch):
    """weightwatcher 0.7.7 passes `distribution=` to powerlaw.Fit, which powerlaw 2.x rejects (every
    fix-fingers fit then fails with alpha = -1); powerlaw 1.x ignored it. Drop that one argument."""
    powerlaw = pytest.importorskip("powerlaw")
    fit = powerlaw.Fit
    monkeypatch.setattr(powerlaw, "Fit", lambda *args, distribution=None, **kwargs: fit(*args, **kwargs))
    return int(getattr(powerlaw, "__version__", "2").split(".")[0])


def test_fix_finger_matches_weightwatcher_xmin_peak(matrices, powerlaw_2_shim):
    sub = _subset(matrices)
    details = _ww_details(matrices, list(sub), fix_fingers="xmin_peak", pl_package="powerlaw")
    bound = 3.0 if powerlaw_2_shim >= 2 else None  # powerlaw 2.x only accepts fits with alpha < 3
    bounded = analyze_matrices(sub, HillOptions.weightwatcher(fix_fingers=True, powerlaw_max_alpha=bound))
    unbounded = analyze_matrices(sub, HillOptions.weightwatcher(fix_fingers=True))
    same_fit = 0
    for fit, free, (_, row) in zip(bounded, unbounded, details.iterrows()):
        assert row["alpha"] > 0, row["status"]
        assert fit.alpha == pytest.approx(row["alpha"], rel=1e-3)
        assert fit.xmin == pytest.approx(row["xmin"], rel=1e-3)
        # where the unbounded fit is one powerlaw accepts too, it is the same fit
        if free.alpha < 3.0:
            assert free.alpha == pytest.approx(row["alpha"], rel=1e-3)
            same_fit += 1
    assert same_fit >= 9  # 9 of these 21 matrices have their best unbounded fit below 3


# ----------------------------------------------------------------------------- estimator unit checks
def test_tail_fits_matches_a_loop():
    rng = np.random.default_rng(0)
    lam = np.sort(rng.pareto(2.0, 64) + 1.0)
    alphas, kss = (np.asarray(a) for a in tail_fits(np.log(lam)))
    for i in (0, 10, 40, 62):
        n = len(lam) - i
        alpha = 1 + n / np.sum(np.log(lam[i:] / lam[i]))
        d = np.max(np.abs(1 - (lam[i:] / lam[i]) ** (1 - alpha) - np.arange(n) / n))
        assert alphas[i] == pytest.approx(alpha, rel=1e-5) and kss[i] == pytest.approx(d, rel=1e-4, abs=1e-6)
    assert math.isinf(alphas[-1])


def test_ks_recovers_a_pareto_exponent():
    rng = np.random.default_rng(1)
    # a bulk below 1 and a Pareto tail with alpha = 2.5 above it
    lam = np.sort(np.concatenate([rng.uniform(0.1, 1.0, 300), (1 - rng.random(700)) ** (-1 / 1.5)]))
    (fit,) = fit_esds([lam], HillOptions("ks"), dtype="float64")
    assert fit["alpha"] == pytest.approx(2.5, abs=0.15)
    assert 0.5 < fit["xmin"] < 2.0


def test_layer_metric_is_the_mean_over_modules(matrices):
    sub = {k: w for k, w in matrices.items() if k[0] in (0, 1)}
    fits = analyze_matrices(sub, HillOptions("median"))
    means = layer_metric(fits)
    assert len(means) == 2
    assert means[1] == pytest.approx(np.mean([f.alpha for f in fits if f.layer == 1]), rel=1e-12)


def test_small_and_bad_matrices():
    rng = np.random.default_rng(2)
    rows = analyze_matrices({(0, "q"): rng.normal(size=(64, 8)), (0, "v"): rng.normal(size=(64, 48))},
                            HillOptions("fix-finger"))
    small, ok = rows
    assert math.isnan(small.alpha) and "too small" in small.status and small.num_eigs == 8 < MIN_EIGS
    assert ok.ok and ok.alpha > 1 and ok.num_eigs == 48
    bad = rng.normal(size=(32, 32))
    bad[3, 4] = np.nan
    with pytest.raises(MoeLoraError, match="layer 1 k has non-finite weights") as info:
        analyze_matrices({(1, "k"): bad})
    assert "\n" not in str(info.value)
    with pytest.raises(MoeLoraError, match="unknown estimator"):
        HillOptions("hill")
