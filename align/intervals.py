"""95% intervals for the compare table: Wilson for an accuracy, percentile bootstrap for a mean score,
and paired differences between two checkpoints answering the same prompts.

Every function takes the per-prompt raw values (what compare.json keeps), so a table can be
recomputed from them. The bootstrap is seeded: the same scores give the same interval.
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054   # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (2.5%, 97.5%) of the mean of `values`."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


def summarize(values, kind: str, seed: int = 0) -> dict:
    """{mean, lo, hi, n, interval} for one column: kind 'accuracy' (0/1 values, Wilson) or 'score' (bootstrap)."""
    x = np.asarray(values, dtype=float)
    if kind == "accuracy":
        lo, hi = wilson(int(round(x.sum())), int(x.size))
        method = "wilson"
    elif kind == "score":
        lo, hi = bootstrap_mean(x, seed=seed)
        method = "bootstrap"
    else:
        raise ValueError(f"kind must be 'accuracy' or 'score', got {kind!r}")
    mean = float(x.mean()) if x.size else float("nan")
    return {"mean": mean, "lo": lo, "hi": hi, "n": int(x.size), "interval": method}


def paired_difference(before, after, seed: int = 0) -> dict:
    """after - before on the same prompts: {mean, lo, hi, n, interval}, the percentile bootstrap of the
    mean per-prompt difference (resampling prompts, so the pairing is kept)."""
    a, b = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same prompts: {a.size} vs {b.size} values")
    d = b - a
    lo, hi = bootstrap_mean(d, seed=seed)
    return {"mean": float(d.mean()) if d.size else float("nan"), "lo": lo, "hi": hi, "n": int(d.size),
            "interval": "paired-bootstrap"}


def fmt(cell: dict, digits: int = 3) -> str:
    """'0.412 [0.381, 0.443]' for a table cell."""
    return f"{cell['mean']:.{digits}f} [{cell['lo']:.{digits}f}, {cell['hi']:.{digits}f}]"


def fmt_diff(cell: dict, digits: int = 3) -> str:
    return f"{cell['mean']:+.{digits}f} [{cell['lo']:+.{digits}f}, {cell['hi']:+.{digits}f}]"
