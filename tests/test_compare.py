"""The compare table's interval maths (by hand) and its recomputation from per-prompt raw scores."""
from __future__ import annotations

import math

import numpy as np
import pytest

from align.compare import table_from_raw
from align.intervals import bootstrap_mean, fmt, paired_difference, summarize, wilson


def test_wilson_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + z²/20) / (1 + z²/10), half z·sqrt(0.016 + z²/400) / (1 + z²/10)
    z2 = 1.959963984540054 ** 2
    denom = 1 + z2 / 10
    centre, half = (0.8 + z2 / 20) / denom, math.sqrt(z2) * math.sqrt(0.016 + z2 / 400) / denom
    lo, hi = wilson(8, 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)       # published value for 8/10
    assert wilson(0, 20)[0] == 0.0 and 0.15 < wilson(0, 20)[1] < 0.17  # never a zero-width interval at 0
    assert wilson(20, 20)[1] == pytest.approx(1.0) and wilson(20, 20)[0] < 1.0


def test_bootstrap_mean_matches_normal_approximation_and_is_seeded():
    x = np.random.default_rng(1).normal(2.0, 1.0, size=2000)
    lo, hi = bootstrap_mean(x, seed=3)
    half = 1.959963984540054 * x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert bootstrap_mean(x, seed=3) == (lo, hi)
    assert bootstrap_mean([1.5] * 7) == (1.5, 1.5)


def test_paired_difference_keeps_the_pairing():
    before = np.random.default_rng(0).normal(0, 5, size=300)
    d = paired_difference(before, before + 0.25)
    assert d["mean"] == pytest.approx(0.25) and (d["lo"], d["hi"]) == pytest.approx((0.25, 0.25))
    assert d["n"] == 300 and d["interval"] == "paired-bootstrap"
    unpaired = bootstrap_mean(before + 0.25)                         # the same scores unpaired: wide
    assert unpaired[1] - unpaired[0] > 0.5
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1, 2], [1, 2, 3])


def test_summarize_fields_and_kind():
    acc = summarize([1, 0, 1, 1], "accuracy")
    assert acc == {"mean": 0.75, "lo": wilson(3, 4)[0], "hi": wilson(3, 4)[1], "n": 4, "interval": "wilson"}
    assert summarize([1.0, 2.0], "score")["interval"] == "bootstrap"
    with pytest.raises(ValueError, match="kind"):
        summarize([1.0], "median")
    assert fmt({"mean": 0.5, "lo": 0.25, "hi": 0.75}) == "0.500 [0.250, 0.750]"


def test_table_recomputed_from_raw_scores():
    rng = np.random.default_rng(7)
    acc = {lb: rng.integers(0, 2, size=50).astype(float).tolist() for lb in ("sft", "s1", "s2")}
    rm = {lb: rng.normal(size=20).tolist() for lb in ("sft", "s1", "s2")}
    raw = {"reasoning_accuracy": {"scores": acc}, "helpful_rm_score": {"scores": rm}}
    table, diffs = table_from_raw(raw)
    assert list(table) == ["sft", "s1", "s2"] and list(diffs) == ["s1 - sft", "s2 - s1"]
    for lb in table:
        cell = table[lb]["reasoning_accuracy"]
        assert cell["mean"] == pytest.approx(np.mean(acc[lb])) and cell["n"] == 50
        assert (cell["lo"], cell["hi"]) == wilson(int(sum(acc[lb])), 50)
        cell = table[lb]["helpful_rm_score"]
        assert cell["mean"] == pytest.approx(np.mean(rm[lb])) and (cell["lo"], cell["hi"]) == bootstrap_mean(rm[lb])
    d = diffs["s2 - s1"]["helpful_rm_score"]
    assert d["mean"] == pytest.approx(np.mean(np.subtract(rm["s2"], rm["s1"])))
    assert (d["lo"], d["hi"]) == bootstrap_mean(np.subtract(rm["s2"], rm["s1"]))
