"""Input validation shared by every public boundary of tfhybrid.

Public functions validate their inputs once, here, with messages that say what was expected
and what came; compiled inner functions assume valid input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TfhybridInputError(ValueError):
    """Bad input at a public boundary: the message says what was expected and what came."""


def check_finite(name: str, value) -> np.ndarray:
    """Return ``value`` as a NumPy array, raising if it holds NaN or infinity."""
    arr = np.asarray(value)
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise TfhybridInputError(
            f"{name} contains {n_bad} non-finite value(s) (NaN or inf); expected finite numbers"
        )
    return arr


def check_rank(name: str, value, ranks: int | Sequence[int], axes: str = "") -> np.ndarray:
    """Raise unless ``value`` has one of the given ranks; ``axes`` documents the expected order."""
    arr = np.asarray(value)
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if arr.ndim not in allowed:
        want = " or ".join(str(r) for r in allowed)
        hint = f" {axes}" if axes else ""
        raise TfhybridInputError(
            f"{name} must have rank {want}{hint}; got shape {arr.shape} (rank {arr.ndim})"
        )
    return arr


def check_range(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    unit: str = "",
) -> np.ndarray:
    """Raise unless every element of ``value`` lies in the stated interval."""
    arr = check_finite(name, value)
    u = f" {unit}" if unit else ""
    if low is not None:
        bad = arr < low if low_inclusive else arr <= low
        if np.any(bad):
            op = ">=" if low_inclusive else ">"
            raise TfhybridInputError(
                f"{name} must be {op} {low}{u}; got {np.min(arr):g}{u}"
            )
    if high is not None:
        bad = arr > high if high_inclusive else arr >= high
        if np.any(bad):
            op = "<=" if high_inclusive else "<"
            raise TfhybridInputError(
                f"{name} must be {op} {high}{u}; got {np.max(arr):g}{u}"
            )
    return arr


def as_arcsec(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """Convert an angle to arcsec (float).

    Accepts an ``astropy.units.Quantity`` with angular units, or a plain number that is taken to
    be in arcsec. Raises on non-angular units or values outside ``[low, high]`` arcsec.
    """
    from astropy import units as u

    if isinstance(value, u.Quantity):
        try:
            value = value.to_value(u.arcsec)
        except u.UnitConversionError as err:
            raise TfhybridInputError(
                f"{name} must be an angle (e.g. 0.03 * u.arcsec); got unit {value.unit}"
            ) from err
    try:
        val = float(value)
    except (TypeError, ValueError) as err:
        raise TfhybridInputError(f"{name} must be a number of arcsec; got {value!r}") from err
    check_range(name, val, low, high, unit="arcsec")
    return val
