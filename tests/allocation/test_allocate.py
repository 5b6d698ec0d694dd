"""Expert-count allocation: AlphaLoRA's mapping, MoLA's shapes, the Allocation JSON (no model needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moe_lora_jax.allocation import (
    ALL_MODULES,
    Allocation,
    allocate_alphalora,
    allocate_shape,
    mola_shape,
    scale_to_total,
    uniform_counts,
)
from moe_lora_jax.errors import MoeLoraError

# MoLA's published lists for 32 layers and 160 experts (8 layers per group), by the shapes' digits
# (lowest layers first): 2468 is MoLA's inverted triangle, 8642 its triangle.
MOLA_32 = {
    "2468": [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8,
    "8642": [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8,
    "8228": [8] * 8 + [2] * 8 + [2] * 8 + [8] * 8,
    "5555": [5] * 32,
}


def _synthetic_cases(n_cases: int = 300, seed: int = 0):
    """Random (metric values, total, beta, min_experts) with alpha-like values, including ties."""
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        layers = int(rng.integers(1, 40))
        values = rng.uniform(1.5, 6.0, layers)
        if layers > 3 and rng.random() < 0.3:
            values[: layers // 2] = values[0]  # ties must not break monotonicity
        lo = int(rng.integers(1, 4))
        total = int(rng.integers(layers * lo, layers * 12 + 1))
        beta = float(rng.choice([0.5, 1.0, 2.5, 4.0]))
        yield values, total, beta, lo


# ----------------------------------------------------------------------------- AlphaLoRA mapping
def test_alphalora_mapping_hits_total_keeps_minimum_and_is_monotone():
    checked = 0
    for values, total, beta, lo in _synthetic_cases():
        counts = np.array(scale_to_total(values, total, beta, min_experts=lo))
        assert counts.sum() == total
        assert counts.min() >= lo >= 1
        # a larger metric never gets fewer experts (equal metrics may differ by one: the remainder goes to
        # the lower layers)
        larger = values[:, None] > values[None, :]
        assert not np.any(larger & (counts[:, None] < counts[None, :])), (values, counts)
        checked += 1
    assert checked == 300


def test_alphalora_mapping_matches_proportional_quotas():
    values = np.array([2.0, 3.0, 4.0, 5.0])
    counts = scale_to_total(values, 28, beta=1.0)
    # quotas 28 * v / 14 = 4, 6, 8, 10 are whole numbers: no rounding at all
    assert counts == (4, 6, 8, 10)
    # beta = 2: quotas 28 * v^2 / 54 = 2.07, 4.67, 8.30, 12.96 -> floors 2, 4, 8, 12 (26), +1 to the
    # two largest remainders (0.96 of layer 3, 0.67 of layer 1)
    assert scale_to_total(values, 28, beta=2.0) == (2, 5, 8, 13)


def test_alphalora_mapping_respects_max_experts():
    values = [1.5, 1.6, 1.7, 9.0]
    counts = scale_to_total(values, 20, beta=2.5, max_experts=8)
    assert sum(counts) == 20 and max(counts) == 8 and min(counts) >= 1
    assert list(counts) == sorted(counts)


def expert_number_reference(values, target_sum: int, exponent: float) -> tuple[np.ndarray, int]:
    """A numpy transcription of `exponential_scaling` in peijunallin/alphalora expert_number.py.

    The quotas v**beta / sum(v**beta) * T are rounded half to even; then, while the sum is short
    (over), one expert is added at (taken from) the layer where v**beta - n is smallest (largest):
    the unnormalised powers are compared with the counts. Returns (counts, adjustment steps).
    The script then prints top_k = 2 for a layer with more than one expert, else 1.
    """
    powered = np.power(np.asarray(values, dtype=np.float64), exponent)
    counts = np.round(powered / powered.sum() * target_sum).astype(int)
    steps = 0
    while counts.sum() != target_sum:
        gap = powered - counts
        if counts.sum() < target_sum:
            counts[np.argmin(gap)] += 1
        else:
            counts[np.argmax(gap)] -= 1
        steps += 1
    return counts, steps


def test_alphalora_rounding_reproduces_expert_number_py():
    """AlphaLoRA's own rule: np.round of the quotas, then +-1 at argmin/argmax(v**beta - n)."""
    values = np.array([2.3, 2.9, 3.4, 2.1, 4.2, 3.0, 2.7])
    expected, _ = expert_number_reference(values, 40, 2.5)
    got = scale_to_total(values, 40, 2.5, rounding="alphalora")
    assert list(got) == expected.tolist()
    assert sum(got) == 40


def test_allocate_alphalora_defaults_to_the_authors_rounding_and_top_k():
    """32 layers, T = 160, beta = 2.5 (expert_number.py's defaults): 25 random alpha vectors."""
    rng = np.random.default_rng(2024)
    adjusted = differs_from_largest_remainder = 0
    for case in range(25):
        values = rng.uniform(2.0, 5.0, 32)
        if case % 5 == 0:
            values[8:16] = values[8]  # ties: np.argmin/argmax take the first index
        expected, steps = expert_number_reference(values, 160, 2.5)
        assert expected.min() >= 1  # every layer can be built: the library must give exactly these counts
        alloc = allocate_alphalora(values, 160)
        assert alloc.experts_per_layer == expected.tolist(), case
        assert alloc.top_k("q") == tuple(2 if n > 1 else 1 for n in expected)
        assert alloc.provenance["rounding"] == "alphalora"
        adjusted += steps > 0
        lr = allocate_alphalora(values, 160, rounding="largest-remainder")  # still an option
        assert lr.experts_per_layer == list(scale_to_total(values, 160, 2.5)) and lr.total() == 160
        differs_from_largest_remainder += lr.experts_per_layer != alloc.experts_per_layer
    assert adjusted >= 15 and differs_from_largest_remainder >= 10  # the greedy step is exercised


def test_alphalora_rounding_keeps_bounds_where_the_reference_gives_zero():
    values = [1.0] * 4 + [10.0] * 4  # quotas 0.009 and 2.99
    expected, _ = expert_number_reference(values, 12, 2.5)
    assert expected.tolist() == [0] * 4 + [3] * 4  # a layer without experts cannot be built
    assert allocate_alphalora(values, 12).experts_per_layer == [1] * 4 + [2] * 4  # min_experts=1, re-scaled
    assert allocate_alphalora(values, 12, top_k=2).top_k("q") == (1,) * 4 + (2,) * 4


def test_allocate_alphalora_records_provenance():
    alloc = allocate_alphalora([2.0, 3.0, 4.0], 9, beta=1.0, provenance={"estimator": "median"})
    assert alloc.experts_per_layer == [2, 3, 4]
    assert alloc.method == "alphalora"
    assert alloc.provenance["beta"] == 1.0 and alloc.provenance["total"] == 9
    assert list(alloc.provenance["layer_metric"]) == [2.0, 3.0, 4.0]
    assert alloc.provenance["estimator"] == "median"
    assert alloc.modules == ALL_MODULES


# ----------------------------------------------------------------------------- MoLA shapes
@pytest.mark.parametrize("shape", sorted(MOLA_32))
def test_mola_shapes_reproduce_mola_lists(shape):
    assert list(mola_shape(shape, 32, 160)) == MOLA_32[shape]


@pytest.mark.parametrize("num_layers,total", [(30, 150), (30, 97), (7, 40), (4, 4), (1, 3), (33, 200)])
@pytest.mark.parametrize("shape", sorted(MOLA_32))
def test_mola_shapes_other_layer_counts(shape, num_layers, total):
    counts = mola_shape(shape, num_layers, total)
    assert len(counts) == num_layers and sum(counts) == total and min(counts) >= 1
    groups = np.array_split(np.arange(num_layers), 4)
    digits = tuple(int(d) for d in shape)
    means = [np.mean([counts[i] for i in g]) for g in groups if len(g)]
    # a group with a larger digit never gets fewer experts per layer on average
    for a in range(len(means)):
        for b in range(len(means)):
            if digits[a] > digits[b]:
                assert means[a] >= means[b]


def test_mola_shape_for_smollm2_budget():
    # 30 layers (SmolLM2), 150 experts: groups of 8, 8, 7, 7 layers
    # weights 2, 4, 6, 8 sum to 146, so quotas are 150/146 x digit: floors give 146 and the 4 left over go to
    # the largest remainders (digit 8: 8.22), lowest layers first
    assert list(mola_shape("2468", 30, 150)) == [2] * 8 + [4] * 8 + [6] * 7 + [9] * 4 + [8] * 3
    assert uniform_counts(30, 150) == (5,) * 30
    assert uniform_counts(4, 10) == (3, 3, 2, 2)


def test_allocate_shape_methods():
    for method, shape in [("uniform", "5555"), ("mola-8642", "8642"), ("mola-2468", "2468"), ("mola-8228", "8228"),
                          ("mola-5555", "5555")]:
        alloc = allocate_shape(method, 32, 160)
        assert alloc.experts_per_layer == MOLA_32[shape]
        assert alloc.method == method and alloc.total() == 160 and alloc.provenance["shape"] == shape
        assert alloc.top_k("q") is None  # MoLA's shapes route the adapter's top_k (capped per layer)


@pytest.mark.parametrize("old, digits", [("mola-triangle", "mola-8642"), ("mola-inverted", "mola-2468"),
                                         ("mola-hourglass", "mola-8228"), ("mola-uniform", "mola-5555")])
def test_old_shape_names_are_refused_naming_the_digits(old, digits):
    msg = _one_line_error(allocate_shape, old, 32, 160, match="old, ambiguous MoLA shape name")
    assert repr(digits) in msg
    if old != "mola-uniform":  # a bare "uniform" is unambiguous and stays
        _one_line_error(mola_shape, old.removeprefix("mola-"), 32, 160, match=repr(digits.removeprefix("mola-")))
    # an allocation file with an old name is read by the digits it recorded, refused without them
    d = allocate_shape(digits, 8, 40).to_dict()
    d["method"] = old
    assert Allocation.from_dict(d).method == digits
    del d["provenance"]["shape"]
    _one_line_error(Allocation.from_dict, d, match=repr(digits))


# ----------------------------------------------------------------------------- Allocation JSON
def test_allocation_json_round_trip(tmp_path):
    alloc = allocate_alphalora([2.1, 3.7, 2.9, 4.4], 17, beta=2.5, provenance={"estimator": "fix-finger", "model": "x"})
    path = alloc.to_json(tmp_path / "sub" / "alloc.json")
    back = Allocation.from_json(path)
    assert back == alloc and hash(back) == hash(alloc)
    assert back.experts_per_layer == alloc.experts_per_layer and sum(back.experts_per_layer) == 17
    assert back.method == "alphalora"
    assert back.provenance == alloc.provenance
    assert back.provenance["layer_metric"][3] == pytest.approx(4.4, rel=0, abs=0)
    on_disk = json.loads(path.read_text())
    assert on_disk["experts_per_layer"] == list(alloc.experts_per_layer)
    assert on_disk["modules"]["down"] == list(alloc.experts_per_layer)


def test_allocation_json_per_module_counts_and_hash(tmp_path):
    alloc = Allocation.from_counts({"q": [1, 2], "v": [3, 1]}, provenance={"note": "manual"})
    back = Allocation.from_json(alloc.to_json(tmp_path / "a.json"))
    assert back.counts("q") == (1, 2) and back.counts("v") == (3, 1)
    assert not back.uniform_across_modules
    assert {alloc: 1}[back] == 1  # usable as a static jit argument / dict key


def test_top_k_per_layer_json_round_trip_and_old_files(tmp_path):
    alloc = allocate_alphalora([2.0, 3.0, 9.0], 9, beta=1.0)
    assert alloc.experts_per_layer == [1, 2, 6]  # quotas 9 * v / 14 = 1.29, 1.93, 5.79, rounded
    on_disk = json.loads(alloc.to_json(tmp_path / "a.json").read_text())
    assert on_disk["top_k_per_layer"] == [min(2, n) for n in alloc.experts_per_layer]
    back = Allocation.from_json(tmp_path / "a.json")
    assert back == alloc and hash(back) == hash(alloc) and back.top_k("v") == alloc.top_k("v")
    # the top-k changes the computation: it is part of equality and hash
    assert alloc.with_top_k(None) != alloc and alloc.with_top_k(None).counts("q") == alloc.counts("q")
    assert allocate_alphalora([2.0, 3.0, 9.0], 9, beta=1.0, top_k=None).top_k("q") is None
    # per module when the modules differ
    per_module = Allocation.from_counts({"q": [1, 3], "v": [2, 2]}, top_k_per_layer={"q": [1, 2], "v": [2, 1]})
    d = json.loads(per_module.to_json(tmp_path / "m.json").read_text())
    assert d["top_k_per_layer"] == {"q": [1, 2], "v": [2, 1]}
    assert Allocation.from_json(tmp_path / "m.json").top_k("v") == (2, 1)
    # a file written before per-layer top-k existed: no key, top-k left to the adapter
    del d["top_k_per_layer"]
    assert Allocation.from_dict(d).top_k("q") is None and Allocation.from_dict(d).counts("q") == (1, 3)


def test_top_k_per_layer_bad_input():
    _one_line_error(Allocation.from_counts, {"q": [1, 3]}, top_k_per_layer=[2, 2], match="layer 0 routes top-2 but that layer has 1")
    _one_line_error(Allocation.from_counts, {"q": [2, 3]}, top_k_per_layer=[2], match="1 values for 2 layers")
    _one_line_error(Allocation.from_counts, {"q": [2, 3], "v": [2, 2]}, top_k_per_layer={"q": [1, 1]},
                    match="nothing for v")
    _one_line_error(Allocation.from_counts, {"q": [2, 3]}, top_k_per_layer={"k": [1, 1], "q": [1, 1]}, match="names")
    _one_line_error(Allocation.from_counts, {"q": [2, 3]}, top_k_per_layer=[0, 1], match="at least one")
    d = Allocation.from_counts({"q": [2, 3]}).to_dict()
    d["top_k_per_layer"] = [3, 1]
    _one_line_error(Allocation.from_dict, d, source="x.json", match="^x.json: top_k_per_layer of q in layer 0")


def test_allocation_json_never_overwrites(tmp_path):
    path = tmp_path / "a.json"
    Allocation.uniform(2, 3).to_json(path)
    with pytest.raises(MoeLoraError, match="already exists"):
        Allocation.uniform(2, 4).to_json(path)
    assert Allocation.from_json(path).experts_per_layer == [3, 3]


def test_allocation_nan_metric_saves_as_null(tmp_path):
    alloc = Allocation.from_experts_per_layer([1, 2], provenance={"layer_metric": [float("nan"), 2.0]})
    back = Allocation.from_json(alloc.to_json(tmp_path / "n.json"))
    assert back.provenance["layer_metric"][0] is None and back.provenance["layer_metric"][1] == 2.0


# ----------------------------------------------------------------------------- bad input
def _one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(MoeLoraError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_total_below_layers_times_minimum():
    msg = _one_line_error(scale_to_total, [2.0, 3.0, 4.0], 5, 2.5, min_experts=2, match="at least 2 each")
    assert "--total 6" in msg
    _one_line_error(mola_shape, "8642", 32, 31, match="at least 1 each")
    _one_line_error(allocate_alphalora, [2.0] * 30, 29, match="--total 30")


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta(beta):
    _one_line_error(scale_to_total, [2.0, 3.0], 4, beta, match="beta")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_metric(bad):
    msg = _one_line_error(scale_to_total, [2.0, bad, 3.0], 6, 2.5, match="not finite")
    assert "[1]" in msg


def test_other_bad_inputs():
    _one_line_error(scale_to_total, [2.0, -1.0], 4, 1.0, match="<= 0")
    _one_line_error(scale_to_total, [], 4, 1.0, match="non-empty")
    _one_line_error(scale_to_total, [2.0, 3.0], 4.5, 1.0, match="whole number")
    _one_line_error(scale_to_total, [2.0, 3.0], 4, 1.0, rounding="banker", match="unknown rounding")
    _one_line_error(scale_to_total, [2.0, 3.0], 4, 1.0, min_experts=0, match="at least 1")
    _one_line_error(scale_to_total, [2.0, 3.0], 40, 1.0, max_experts=8, match="exceeds")
    _one_line_error(mola_shape, "diamond", 8, 40, match="unknown MoLA shape")
    _one_line_error(allocate_shape, "mola-diamond", 8, 40, match="unknown method")
    _one_line_error(Allocation.from_experts_per_layer, [2, 0, 1], match="at least one expert")


def test_huge_beta_does_not_overflow():
    counts = scale_to_total([2.0, 3.0, 4.0], 30, beta=2000.0)
    assert counts == (1, 1, 28) and math.fsum(counts) == 30
