"""MCMC diagnostics: effective sample size, split R-hat, summary tables and ArviZ export.

Draws follow TFP's layout ``(num_results, num_chains, *event_shape)`` (chain axis 1). ESS is
``tfp.mcmc.effective_sample_size`` summed over chains (cross-chain ESS when there are ≥ 2
chains, Vehtari et al. 2021 style); R-hat is ``tfp.mcmc.potential_scale_reduction`` with
``split_chains=True`` (Gelman et al. split-R̂). Both are computed in float64.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.io import atomic_path
from tfhybrid.validation import TfhybridInputError

__all__ = [
    "effective_sample_size",
    "split_r_hat",
    "SummaryTable",
    "summarize",
    "to_arviz",
    "save_netcdf",
    "CoverageTest",
    "coverage_test",
]


def _check_draws(x, name="samples") -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim < 2:
        raise TfhybridInputError(
            f"{name} must have shape (num_results, num_chains, ...); got shape {arr.shape}"
        )
    if arr.shape[0] < 4:
        raise TfhybridInputError(f"{name} needs at least 4 draws per chain; got {arr.shape[0]}")
    return arr


class _QuietCast:
    """Hide TF's "casting complex128 to float64" warning from TFP's FFT autocorrelation.

    ``tfp.mcmc.effective_sample_size`` takes the real part of an FFT on purpose; TF logs a
    warning for it on every call, which users would read as a fault of theirs.
    """

    def filter(self, record) -> bool:
        return "casting an input of type complex" not in record.getMessage()


def effective_sample_size(samples) -> np.ndarray:
    """Total ESS over chains per parameter: (num_results, chains, *event) → event shape."""
    x = _check_draws(samples)
    logger = tf.get_logger()
    quiet = _QuietCast()
    logger.addFilter(quiet)
    try:
        return _effective_sample_size(x)
    finally:
        logger.removeFilter(quiet)


def _effective_sample_size(x: np.ndarray) -> np.ndarray:
    if x.shape[1] >= 2:
        ess = tfp.mcmc.effective_sample_size(
            tf.constant(x), cross_chain_dims=1, filter_beyond_positive_pairs=True
        )
    else:
        ess = tf.reduce_sum(
            tfp.mcmc.effective_sample_size(tf.constant(x), filter_beyond_positive_pairs=True),
            axis=0,
        )
    return np.asarray(ess)


@dataclass(frozen=True)
class CoverageTest:
    """How often ``n`` credible intervals of nominal ``probability`` covered the truth.

    ``p_value``: exact two-sided binomial test of ``covered ~ Binomial(n, probability)``
    (``scipy.stats.binomtest``): small (say < 0.05) means the intervals are not calibrated,
    too narrow when ``covered < expected``. ``low, high``: the Clopper–Pearson 95 % interval
    of the true coverage rate.
    """

    covered: int
    n: int
    probability: float
    p_value: float
    low: float
    high: float

    @property
    def fraction(self) -> float:
        return self.covered / self.n

    @property
    def expected(self) -> float:
        """``n · probability``."""
        return self.n * self.probability

    def __str__(self) -> str:
        return (f"{self.covered}/{self.n} (expected {self.expected:.1f} ± "
                f"{np.sqrt(self.n * self.probability * (1 - self.probability)):.1f}, "
                f"p = {self.p_value:.2g})")


def coverage_test(covered, probability: float = 0.68) -> CoverageTest:
    """Is a set of credible intervals calibrated? ``covered``: one bool per interval (per
    system or mock), True where it held the true value; ``probability``: their nominal mass.

    Over mocks whose truths are drawn from the prior, a calibrated posterior's intervals cover
    the truth independently with probability ``probability``, so the count is binomial
    (Cook, Gelman & Rubin 2006; Talts et al. 2018 for the rank version).
    """
    from scipy import stats

    flags = np.asarray(covered)
    if flags.ndim != 1 or flags.size == 0:
        raise TfhybridInputError(
            f"covered must be a non-empty 1-d array of booleans; got shape {flags.shape}")
    if flags.dtype != bool:
        if not np.all(np.isin(flags, (0, 1))):
            raise TfhybridInputError("covered must hold booleans (or 0/1)")
        flags = flags.astype(bool)
    if not (0.0 < float(probability) < 1.0):
        raise TfhybridInputError(f"probability must be in (0, 1); got {probability!r}")
    k, n = int(flags.sum()), int(flags.size)
    test = stats.binomtest(k, n, float(probability))
    ci = test.proportion_ci(0.95, method="exact")
    return CoverageTest(k, n, float(probability), float(test.pvalue), float(ci.low),
                        float(ci.high))


def split_r_hat(samples) -> np.ndarray:
    """Split potential scale reduction R̂ per parameter: (num_results, chains, *event) → event."""
    x = _check_draws(samples)
    return np.asarray(
        tfp.mcmc.potential_scale_reduction(
            tf.constant(x), independent_chain_ndims=1, split_chains=True
        )
    )


def _named_parts(samples, names) -> list[tuple[str, np.ndarray]]:
    if isinstance(samples, Mapping):
        return [(str(k), np.asarray(v)) for k, v in samples.items()]
    if isinstance(samples, (np.ndarray, tf.Tensor)):
        samples = [samples]
    samples = list(samples)
    if names is None:
        names = [f"x{i}" for i in range(len(samples))]
    if len(names) != len(samples):
        raise TfhybridInputError(f"names has {len(names)} entries for {len(samples)} parts")
    return [(str(n), np.asarray(s)) for n, s in zip(names, samples, strict=True)]


@dataclass(frozen=True)
class SummaryTable:
    """Per-scalar-parameter posterior summary; ``str(table)`` prints it."""

    names: list
    mean: np.ndarray
    sd: np.ndarray
    q05: np.ndarray
    q95: np.ndarray
    ess: np.ndarray
    r_hat: np.ndarray

    def as_dict(self) -> dict:
        return {
            "name": list(self.names),
            "mean": self.mean.tolist(),
            "sd": self.sd.tolist(),
            "q05": self.q05.tolist(),
            "q95": self.q95.tolist(),
            "ess": self.ess.tolist(),
            "r_hat": self.r_hat.tolist(),
        }

    def to_string(self) -> str:
        w = max([4] + [len(n) for n in self.names])
        head = (
            f"{'name':<{w}} {'mean':>11} {'sd':>10} {'5%':>11} {'95%':>11} {'ess':>8} "
            f"{'r_hat':>7}"
        )
        lines = [head, "-" * len(head)]
        for i, n in enumerate(self.names):
            lines.append(
                f"{n:<{w}} {self.mean[i]:>11.4g} {self.sd[i]:>10.4g} {self.q05[i]:>11.4g} "
                f"{self.q95[i]:>11.4g} {self.ess[i]:>8.1f} {self.r_hat[i]:>7.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


def summarize(samples, names: Sequence[str] | None = None) -> SummaryTable:
    """Mean, sd, 5–95 % quantiles, ESS and split R̂ for every scalar parameter.

    Parameters
    ----------
    samples : array ``(num_results, num_chains, *event)``, a list of them (one per state part,
        as in ``PosteriorResult.samples``) or a dict name → array.
    names : one name per part; element ``[i, j]`` of part "p" is listed as ``p[i,j]``.
    """
    rows, mean, sd, q05, q95, ess, rhat = [], [], [], [], [], [], []
    for name, s in _named_parts(samples, names):
        x = _check_draws(s, name)
        event = x.shape[2:]
        flat = x.reshape(x.shape[0] * x.shape[1], -1)
        mean.append(flat.mean(0))
        sd.append(flat.std(0, ddof=1))
        q05.append(np.quantile(flat, 0.05, axis=0))
        q95.append(np.quantile(flat, 0.95, axis=0))
        ess.append(effective_sample_size(x).reshape(-1))
        rhat.append(split_r_hat(x).reshape(-1))
        if not event:
            rows.append(name)
        else:
            rows.extend(f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*event))
    cat = np.concatenate
    return SummaryTable(rows, cat(mean), cat(sd), cat(q05), cat(q95), cat(ess), cat(rhat))


def to_arviz(result, names: Sequence[str] | None = None):
    """Convert a ``PosteriorResult`` (or a list / dict of draws) to ``arviz.InferenceData``.

    Posterior variables get ArviZ's ``(chain, draw, ...)`` layout; ``sample_stats`` holds
    ``lp``, ``acceptance_rate``, ``diverging``, ``step_size`` and ``n_steps`` when a
    ``PosteriorResult`` is given. Extra batch dims (e.g. lens systems) stay as variable dims.
    """
    import arviz as az

    trace = None
    if hasattr(result, "samples") and hasattr(result, "trace"):
        trace = result.trace
        names = names or (result.names or None)
        samples = result.samples
    else:
        samples = result
    posterior = {n: np.swapaxes(s, 0, 1) for n, s in _named_parts(samples, names)}
    stats = None
    if trace is not None:
        chains_shape = trace["target_log_prob"].shape
        stats = {
            "lp": np.swapaxes(trace["target_log_prob"], 0, 1),
            "acceptance_rate": np.swapaxes(trace["accept_ratio"], 0, 1),
            "diverging": np.swapaxes(trace["diverging"], 0, 1).astype(bool),
            "n_steps": np.swapaxes(np.broadcast_to(trace["n_steps"], chains_shape), 0, 1),
            "step_size": np.swapaxes(
                np.broadcast_to(
                    trace["step_size"].reshape((-1,) + (1,) * (len(chains_shape) - 1)),
                    chains_shape,
                ),
                0,
                1,
            ),
        }
    return az.from_dict(posterior=posterior, sample_stats=stats)


def save_netcdf(idata, path: str | os.PathLike) -> Path:
    """Write an ``arviz.InferenceData`` to NetCDF atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        idata.to_netcdf(str(tmp))
    return Path(path)
