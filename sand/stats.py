"""Uncertainty of evaluation scores: percentile bootstrap intervals over episodes, and paired comparisons of
two agents on the tasks both were evaluated on.

Seeded: the same values in the same order give the same interval on every run (callers that read rows
from a table sort them first, by task id). An interval is in the units of the values (rewards in [0, 1]).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    def x100(self) -> str:
        """`mean [lo, hi]` with rewards in [0, 1] shown x100; "-" with no values."""
        return f"{100 * self.mean:.1f} [{100 * self.lo:.1f}, {100 * self.hi:.1f}]" if self.n else "-"


@dataclass(frozen=True)
class Paired:
    """a - b on the common tasks: the mean difference with its interval, and tasks a won, lost and tied."""

    mean_diff: float
    lo: float
    hi: float
    won: int
    lost: int
    tied: int
    n: int

    def x100(self) -> str:
        """`+diff [lo, hi]` with rewards in [0, 1] shown x100; "-" with no common task."""
        return f"{100 * self.mean_diff:+.1f} [{100 * self.lo:+.1f}, {100 * self.hi:+.1f}]" if self.n else "-"


def bootstrap_ci(values: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean of `values` and its percentile bootstrap interval at `level`: `n_boot` resamples of the
    values with replacement, the interval between the (1 - level)/2 and (1 + level)/2 quantiles of their
    means (linear interpolation). No values: NaN mean and bounds, n = 0."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if not np.isfinite(x).all():
        raise ValueError("values must be finite numbers")
    picks = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[picks].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    # Clamp float noise: with constant values every resampled mean equals the mean.
    mean = float(x.mean())
    return Interval(mean, min(float(lo), mean), max(float(hi), mean), int(x.size))


def paired_comparison(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, n_boot: int = N_BOOT,
                      level: float = LEVEL, seed: int = 0) -> Paired:
    """Agent a against agent b on the tasks (keys) both were evaluated on: the bootstrap interval of the
    mean per-task difference a - b (tasks resampled in sorted key order), and how many tasks a scored
    higher on (won), lower (lost) or the same (tied)."""
    common = sorted(set(a) & set(b), key=repr)
    diffs = np.array([a[k] - b[k] for k in common], dtype=np.float64)
    ci = bootstrap_ci(diffs, n_boot=n_boot, level=level, seed=seed)
    return Paired(ci.mean, ci.lo, ci.hi, won=int((diffs > 0).sum()), lost=int((diffs < 0).sum()),
                  tied=int((diffs == 0).sum()), n=ci.n)
