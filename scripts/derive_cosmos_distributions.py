"""Derive the simulated galaxy population of ``tfhybrid.data.simulate`` from real COSMOS fits.

Reads GalSim's 100-galaxy COSMOS F814W example release (``real_galaxy_catalog_23.5_example*``,
see ``../shared/data/README.md``) and prints the numbers hard-coded in
``tfhybrid/data/simulate.py`` (``COSMOS_POPULATION``). Nothing at run time reads these files.

Usage::

    python scripts/derive_cosmos_distributions.py [DIR]

Conventions (GalSim ``COSMOSCatalog``): ``sersicfit``/``bulgefit`` hold, per component,
[I_e, hlr along the major axis in 0.03" pixels, n, q, boxiness, x0, y0, phi]; ``bulgefit`` is the
disk (n = 1) then the bulge (n = 4); ``hlr[0]`` is the circularised Sérsic half-light radius in
arcsec and ``flux[0]`` the Sérsic flux in e-/s (ACS F814W, zero point 25.94 AB).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import optimize, special


def sersic_total_flux(i_e, hlr, n, q):
    """Total flux of a Sérsic profile with intensity I_e at the half-light radius (major axis)."""
    b = special.gammaincinv(2 * n, 0.5)
    return i_e * 2 * np.pi * n * np.exp(b) * b ** (-2 * n) * special.gamma(2 * n) * hlr**2 * q


def beta_moments(x):
    """Method-of-moments Beta(a, b) parameters of samples in (0, 1)."""
    m, v = np.mean(x), np.var(x)
    common = m * (1 - m) / v - 1
    return m * common, (1 - m) * common


def truncated_exponential_slope(m, m_lo, m_hi):
    """MLE of alpha in dN/dm ∝ 10**(alpha m) on [m_lo, m_hi]."""

    def nll(alpha):
        k = alpha * np.log(10)
        log_norm = np.log((np.exp(k * m_hi) - np.exp(k * m_lo)) / k)
        return -(k * np.sum(m) - m.size * log_norm)

    return optimize.minimize_scalar(nll, bounds=(0.01, 2.0), method="bounded").x


def main(directory: Path) -> None:
    fitcat = fits.getdata(directory / "real_galaxy_catalog_23.5_example_fits.fits")
    cat = fits.getdata(directory / "real_galaxy_catalog_23.5_example.fits")
    ok = fitcat["viable_sersic"] == 1
    fitcat, cat = fitcat[ok], cat[ok]
    mag = cat["MAG"]
    hlr = fitcat["hlr"][:, 0]
    flux = fitcat["flux"][:, 0]
    # Bulge+disk statistics only from fits that converged to physical axis ratios.
    good_bd = np.all(fitcat["fit_status"][:, :4] == 1, axis=1)
    bf = fitcat["bulgefit"]
    good_bd &= (bf[:, 3] > 0) & (bf[:, 11] > 0) & (bf[:, 1] > 0) & (bf[:, 9] > 0)
    bf = bf[good_bd]
    disk_flux = sersic_total_flux(bf[:, 0], bf[:, 1], 1.0, bf[:, 3])
    bulge_flux = sersic_total_flux(bf[:, 8], bf[:, 9], 4.0, bf[:, 11])
    btt = bulge_flux / (bulge_flux + disk_flux)
    disk_hlr = bf[:, 1] * np.sqrt(bf[:, 3])
    bulge_hlr = bf[:, 9] * np.sqrt(bf[:, 11])
    size_ratio = np.log(bulge_hlr / disk_hlr)
    zp = np.median(mag + 2.5 * np.log10(flux))
    slope, intercept = np.polyfit(mag - 22.0, np.log(hlr), 1)
    scatter = np.std(np.log(hlr) - (intercept + slope * (mag - 22.0)))
    dphi = np.angle(np.exp(2j * (bf[:, 15] - bf[:, 7]))) / 2
    np.set_printoptions(precision=4, suppress=True)
    print(f"galaxies with viable Sersic fits: {ok.sum()}")
    print(
        f"magnitude range: {mag.min():.2f} .. {mag.max():.2f}; "
        f"zero point (mag+2.5log10 flux): {zp:.3f}"
    )
    print(f"number-count slope alpha (dN/dm ∝ 10^(alpha m)) on [{mag.min():.2f}, {mag.max():.2f}]: "
          f"{truncated_exponential_slope(mag, mag.min(), mag.max()):.3f}")
    print(f"bulge+disk fits used: {good_bd.sum()}")
    print(f"ln hlr_arcsec = {intercept:.3f} + {slope:.3f} (mag - 22), scatter {scatter:.3f}")
    print(f"Sersic q: Beta{beta_moments(fitcat['sersicfit'][:, 3])}")
    print(f"disk q: Beta{beta_moments(bf[:, 3])}; bulge q: Beta{beta_moments(bf[:, 11])}")
    print(f"B/T: Beta{beta_moments(np.clip(btt, 1e-3, 1 - 1e-3))}; median {np.median(btt):.3f}")
    print(f"ln(bulge hlr / disk hlr): mean {size_ratio.mean():.3f}, sd {size_ratio.std():.3f}")
    print(f"bulge - disk position angle: sd {np.std(dphi):.3f} rad")
    n_pct = np.percentile(fitcat["sersicfit"][:, 2], [10, 50, 90])
    print(f"Sersic n percentiles 10/50/90: {n_pct}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "../shared/data/galsim_cosmos_example"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
