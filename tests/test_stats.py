"""Bootstrap intervals and paired comparisons (sand.stats) against cases whose answer is known independently."""
import math

import pytest

from sand.stats import bootstrap_ci, paired_comparison


def binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q, from the probability mass function."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= q - 1e-12:
            return k
    return n


@pytest.mark.parametrize("values", [[0.0] * 7, [1.0] * 50, [0.37] * 12, [0.5]])
def test_constant_values_have_a_zero_width_interval(values):
    ci = bootstrap_ci(values)
    assert ci.lo == ci.mean == ci.hi == pytest.approx(values[0]) and ci.n == len(values)


@pytest.mark.parametrize("wins, n", [(12, 40), (3, 12), (25, 50)])
def test_interval_of_successes_matches_the_binomial_distribution(wins, n):
    # Resampling n episodes of which `wins` are 1 makes the resampled mean Binomial(n, wins/n) / n exactly,
    # so the percentile interval is that distribution's 2.5% and 97.5% quantiles (up to one grid step).
    ci = bootstrap_ci([1.0] * wins + [0.0] * (n - wins), n_boot=20000, seed=3)
    p = wins / n
    assert ci.mean == pytest.approx(p) and ci.n == n
    assert ci.lo == pytest.approx(binomial_quantile(n, p, 0.025) / n, abs=1 / n)
    assert ci.hi == pytest.approx(binomial_quantile(n, p, 0.975) / n, abs=1 / n)
    assert ci.lo < p < ci.hi


def test_seeded_rerun_is_identical_and_level_widens():
    values = [0.0, 0.1, 0.25, 0.3, 1.0, 0.0, 0.6, 0.05, 0.9, 0.4]
    assert bootstrap_ci(values) == bootstrap_ci(values)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values)
    narrow, wide = bootstrap_ci(values, level=0.5), bootstrap_ci(values, level=0.99)
    assert wide.lo < narrow.lo < narrow.mean < narrow.hi < wide.hi


def test_empty_and_bad_input():
    ci = bootstrap_ci([])
    assert ci.n == 0 and math.isnan(ci.mean) and math.isnan(ci.lo)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], level=95)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([1.0, float("nan")])


def test_paired_comparison_counts_and_sign():
    a = {"t1": 1.0, "t2": 0.0, "t3": 0.5, "t4": 1.0, "only_a": 1.0}
    b = {"t1": 0.0, "t2": 0.0, "t3": 0.7, "t4": 0.0, "only_b": 0.0}
    ab, ba = paired_comparison(a, b), paired_comparison(b, a)
    assert (ab.n, ab.won, ab.lost, ab.tied) == (4, 2, 1, 1)  # only the tasks both were evaluated on
    assert ab.mean_diff == pytest.approx((1 + 0 - 0.2 + 1) / 4)
    assert ab.lo <= ab.mean_diff <= ab.hi
    # Swapping the agents flips the sign and the counts; the same tasks are resampled.
    assert (ba.won, ba.lost, ba.tied) == (ab.lost, ab.won, ab.tied)
    assert (ba.mean_diff, ba.lo, ba.hi) == pytest.approx((-ab.mean_diff, -ab.hi, -ab.lo))


def test_paired_comparison_of_a_uniformly_better_agent_excludes_zero():
    tasks = [("alfworld", "heldout", f"g{i}") for i in range(30)]
    base = {t: 0.0 for t in tasks}
    better = {t: float(i % 3 != 0) for i, t in enumerate(tasks)}  # wins 20 of 30, never worse
    p = paired_comparison(better, base)
    assert (p.won, p.lost, p.tied, p.n) == (20, 0, 10, 30)
    assert p.mean_diff == pytest.approx(2 / 3) and 0 < p.lo < p.mean_diff < p.hi <= 1
    same = paired_comparison(base, dict(base))
    assert (same.mean_diff, same.lo, same.hi, same.tied) == (0.0, 0.0, 0.0, 30)
    assert paired_comparison({"x": 1.0}, {"y": 0.0}).n == 0
