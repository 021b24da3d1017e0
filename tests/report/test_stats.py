"""Statistics of the report: sample std (ddof=1) and Welch's t-test, against hand computation."""
import math

import numpy as np
import pytest
from scipy import stats

from maps.report import Comparison, summarize, welch_test


def test_mean_and_sample_std_of_three_seeds():
    assert summarize([40.0, 41.0, 42.0]) == (41.0, 1.0, 3)  # ddof=1: sqrt((1+0+1)/2)


def test_one_seed_has_no_std_and_none_has_no_mean():
    mean, std, n = summarize([40.7])
    assert (mean, n) == (40.7, 1) and math.isnan(std)
    mean, std, n = summarize([])
    assert n == 0 and math.isnan(mean) and math.isnan(std)


def _welch_by_hand(a, b):
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, dof, 2 * stats.t.sf(abs(t), dof)


def test_welch_matches_the_formula_and_scipy():
    a, b = [40.0, 41.0, 42.0], [39.0, 39.5, 40.5]
    # by hand: means 41 and 39.6667; variances 1 and 0.58333; se^2 = 0.52778
    t, dof, p, (lo, hi) = welch_test(a, b)
    assert t == pytest.approx(1.33333 / math.sqrt(0.527778), rel=1e-4)
    assert dof == pytest.approx(0.527778 ** 2 / ((1 / 3) ** 2 / 2 + (0.583333 / 3) ** 2 / 2), rel=1e-4)
    et, edof, ep = _welch_by_hand(a, b)
    assert (t, dof, p) == pytest.approx((et, edof, ep))
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    half = stats.t.ppf(0.975, edof) * math.sqrt(1 / 3 + 0.583333 / 3)
    assert (lo, hi) == pytest.approx((4 / 3 - half, 4 / 3 + half), rel=1e-4)


@pytest.mark.parametrize("a,b", [([40.0], [39.0, 40.0]), ([40.0, 40.0], [39.0, 39.0])])
def test_no_test_with_one_seed_or_no_variance(a, b):
    assert welch_test(a, b) == (None, None, None, None)


@pytest.mark.parametrize("delta,p,claim,verdict", [
    (1.0, 0.01, 0.8, "supported"),
    (-1.0, 0.01, 0.8, "contradicted"),
    (1.0, 0.30, 0.8, "not significant"),
    (1.0, None, 0.8, "untested"),
    (1.0, 0.01, None, "no claim"),
])
def test_verdict_against_the_papers_claim(delta, p, claim, verdict):
    assert Comparison("b", delta, p_value=p, paper_delta=claim).verdict == verdict


@pytest.mark.parametrize("claim, verdict", [
    (-0.5, "direction"),    # significant, same sign, but the claim is far outside our interval
    (-9.0, "supported"),    # the claim inside our 95% interval: sign and size agree
    (+2.0, "contradicted"),
])
def test_a_claim_is_supported_only_in_sign_and_size(claim, verdict):
    c = Comparison("b", -9.5, p_value=0.001, ci_low=-11.0, ci_high=-8.0, paper_delta=claim)
    assert c.verdict == verdict
