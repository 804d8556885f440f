"""Tests of tfhybrid.inference.diagnostics: ESS and R-hat against known processes."""

import numpy as np
import pytest

from tfhybrid.inference.diagnostics import (
    effective_sample_size,
    save_netcdf,
    split_r_hat,
    summarize,
    to_arviz,
)
from tfhybrid.validation import TfhybridInputError


def test_ess_of_iid_and_ar1():
    rng = np.random.default_rng(0)
    n, chains, rho = 2000, 4, 0.8
    iid = rng.normal(size=(n, chains))
    ar = np.zeros((n, chains))
    for t in range(1, n):
        ar[t] = rho * ar[t - 1] + np.sqrt(1 - rho**2) * rng.normal(size=chains)
    ess_iid = effective_sample_size(iid)
    ess_ar = effective_sample_size(ar)
    expected_ar = n * chains * (1 - rho) / (1 + rho)  # integrated autocorrelation of AR(1)
    assert 0.85 * n * chains < ess_iid < 1.15 * n * chains
    assert 0.7 * expected_ar < ess_ar < 1.3 * expected_ar
    assert abs(split_r_hat(iid) - 1) < 0.01
    shifted = iid + np.array([0.0, 0.0, 0.0, 1.0])
    assert split_r_hat(shifted) > 1.05


def test_summary_and_arviz_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(2.0, 0.5, size=(400, 3))
    b = rng.normal(size=(400, 3, 2))
    table = summarize([a, b], names=["alpha", "beta"])
    assert table.names == ["alpha", "beta[0]", "beta[1]"]
    np.testing.assert_allclose(table.mean[0], 2.0, atol=0.1)
    assert "r_hat" in str(table)
    idata = to_arviz({"alpha": a, "beta": b})
    assert idata.posterior["alpha"].shape == (3, 400)
    path = save_netcdf(idata, tmp_path / "post.nc")
    import arviz as az

    back = az.from_netcdf(path)
    np.testing.assert_array_equal(back.posterior["beta"].values, np.swapaxes(b, 0, 1))
    with pytest.raises(TfhybridInputError, match="num_results, num_chains"):
        summarize(np.zeros(10))


def test_coverage_test_is_the_exact_two_sided_binomial_test():
    """Against the binomial sum written out (scipy's "minlike" rule: every outcome no more
    likely than the observed one), for the study's sizes."""
    from math import comb

    from tfhybrid.inference.diagnostics import coverage_test

    def p_value(k, n, p):
        pmf = [comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(n + 1)]
        return min(1.0, sum(v for v in pmf if v <= pmf[k] * (1 + 1e-7)))

    for k, n in ((9, 20), (13, 20), (10, 20), (20, 20), (0, 10), (4, 10)):
        flags = np.arange(n) < k
        test = coverage_test(flags, 0.68)
        assert (test.covered, test.n) == (k, n)
        np.testing.assert_allclose(test.p_value, p_value(k, n, 0.68), rtol=1e-9)
        assert test.low <= k / n <= test.high
        assert f"{k}/{n}" in str(test)
    # 68 of 100 is exactly the expectation: nothing to reject
    assert coverage_test(np.arange(100) < 68).p_value > 0.9
    assert coverage_test([1, 0, 1], 0.5).covered == 2  # 0/1 accepted


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"), ([[True, False]], "1-d"), ([0.5, 1.0], "booleans"),
])
def test_coverage_test_rejects_bad_input(bad, match):
    from tfhybrid.inference.diagnostics import coverage_test

    with pytest.raises(TfhybridInputError, match=match):
        coverage_test(bad)
    with pytest.raises(TfhybridInputError, match="probability"):
        coverage_test([True], 1.0)
