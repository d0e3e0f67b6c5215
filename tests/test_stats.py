"""Study statistics against values computed by hand (and scipy's own tests where they exist)."""

import math

import pytest
from scipy import stats as sps

from moesaic.analysis.stats import (
    Stat,
    format_interval,
    holm,
    paired,
    sign_flip_p,
    t_test_p,
    with_holm,
)


def test_stat_mean_sd_and_t_interval_by_hand():
    s = Stat.of([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # Σ(x−x̄)² = 5, ddof 1
    assert s.se == pytest.approx(math.sqrt(5 / 3) / 2)
    half = 3.182446305 * math.sqrt(5 / 3) / 2  # t(0.975, 3) from a t table
    assert (s.ci_low, s.ci_high) == pytest.approx((2.5 - half, 2.5 + half))
    assert s.excludes_zero()


def test_stat_drops_missing_seeds_and_needs_two_values_for_an_interval():
    s = Stat.of([1.0, None, float("nan"), 3.0])
    assert (s.mean, s.n, s.missing) == (2.0, 2, 2)
    one = Stat.of([5.0])
    assert one.mean == 5.0 and math.isnan(one.ci_low) and not one.excludes_zero()
    assert one.to_dict()["ci95"] == [None, None]
    assert math.isnan(Stat.of([]).mean)


def test_t_test_matches_scipy_and_a_hand_value():
    d = [1.0, 2.0, 3.0, 4.0]
    # t = 2.5 / (sd/2) = 3.873 with 3 df: two-sided p = 0.0305
    assert t_test_p(d) == pytest.approx(0.03047, abs=2e-5)
    assert t_test_p(d) == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue)
    assert t_test_p([0.5, 0.5]) == 0.0 and t_test_p([0.0, 0.0]) == 1.0
    assert math.isnan(t_test_p([1.0]))


def test_exact_sign_flip_p_by_hand():
    assert sign_flip_p([1.0] * 6) == pytest.approx(2 / 64)  # only all-+ and all-− reach |1|
    assert sign_flip_p([1.0, -1.0] * 3) == 1.0  # observed mean 0: every assignment as extreme
    # |sum| of [3, 1, 1, 1, 1, 1] is 8; assignments reaching |sum| >= 8: the 3 and all ones
    # agreeing (2), or the 3 with four of five ones (2 × 5 = 10 with sum 3+4−1 = 6 < 8): only 2
    assert sign_flip_p([3.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(2 / 64)
    # sum 9: reached by the observed signs and by flipping the −1 (sum 11), and their negatives
    assert sign_flip_p([2.0, 2.0, 2.0, 2.0, 2.0, -1.0]) == pytest.approx(4 / 64)


def test_paired_adds_the_sign_flip_test_from_six_seeds_on():
    a = [1.1, 1.3, 0.9, 1.2, 1.0, 1.4]
    b = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    p6 = paired(a, b)
    assert p6.diff.mean == pytest.approx(0.15)
    # differences 0.1, 0.3, -0.1, 0.2, 0, 0.4: |values| sum to 1.1, the observed sum is 0.9, so
    # an assignment reaches |sum| >= 0.9 when the values it negates sum to at most 0.1: none,
    # or either 0.1 (3 subsets); × 2 overall signs × 2 signs of the 0 = 12 of 64
    assert p6.p_sign_flip == pytest.approx(12 / 64)
    assert p6.p_t == pytest.approx(sps.ttest_1samp([x - 1 for x in a], 0.0).pvalue)
    assert paired(a[:5], b[:5]).p_sign_flip is None
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, float("nan"), 0.01]) == pytest.approx([0.5, math.nan, 0.02], nan_ok=True)
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 × 0.8 capped at 1; monotone


def test_with_holm_adjusts_each_test_family():
    a, b = [1.1, 1.3, 0.9, 1.2, 1.0, 1.4], [1.0] * 6
    tests = {"x": paired(a, b), "y": paired(b, a), "z": paired([1.0] * 6, [1.0] * 6)}
    done = with_holm(tests)
    assert [done[k].p_holm for k in tests] == pytest.approx(holm([t.p_t for t in tests.values()]))
    assert [done[k].p_sign_flip_holm for k in tests] == pytest.approx(
        holm([t.p_sign_flip for t in tests.values()])
    )
    few = with_holm({"x": paired(a[:3], b[:3]), "y": paired(b[:3], a[:3])})
    assert few["x"].p_sign_flip_holm is None and few["x"].p_holm is not None


def test_format_interval():
    assert format_interval(1.234, 0.5, 2.0, 2, "%", signed=True) == "+1.23 [+0.50, +2.00]%"
    assert format_interval(None, None, None) == "—"
    assert format_interval(1.0, float("nan"), float("nan"), 1) == "1.0"
