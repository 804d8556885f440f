"""Simulated galaxy stamps: the embedded, network-free default galaxy sample of tfhybrid.

Each galaxy is a GalSim bulge + disk + star-forming-knot model:

* bulge: de Vaucouleurs (Sérsic n = 4) profile, own axis ratio and position angle;
* disk: exponential (Sérsic n = 1) profile, plus a fraction of the disk light in
  ``galsim.RandomKnots`` (point-like star-forming regions following the disk's scale);
* both sheared to their axis ratio ``q`` (area preserving, so half-light radii are circularised
  ones, ``sqrt(a b)``) and rotated to their position angle, then convolved with the PSF and drawn
  with pixel response; Gaussian white noise of a recorded per-image sigma is added.

Population (``COSMOS_POPULATION``)
---------------------------------
The distributions are derived from the real COSMOS F814W parametric fits of GalSim's 100-galaxy
example release by ``scripts/derive_cosmos_distributions.py`` (its output is copied below;
nothing reads those files at run time):

* magnitude: ``dN/dm ∝ 10**(0.368 m)`` (maximum-likelihood slope of the example's magnitudes,
  16.9–22.5) on [17.0, 25.2], i.e. extended to the depth of the COSMOS 25.2 sample; flux in
  e-/s with the catalog's zero point 26.022 (``flux = 10**(-0.4 (mag - 26.022))``);
* circularised half-light radius: ``ln(hlr / arcsec) = -0.992 - 0.324 (mag - 22) + 0.424 ε``,
  ``ε ~ N(0, 1)`` (linear fit of the Sérsic ``hlr`` against magnitude, with its scatter);
* bulge-to-total flux ratio ~ Beta(0.363, 0.779) (bulge+disk fits, median 0.197);
* disk axis ratio ~ Beta(2.57, 2.15); bulge axis ratio ~ Beta(0.773, 1.25) clipped to
  [0.2, 1] (rounder than 0.2 is not a physical spheroid: the very flat bulge fits are
  degenerate with the disk);
* ln(bulge hlr / disk hlr) ~ N(-1.294, 1.197) clipped to [ln 0.1, 0]; the two component sizes
  are then solved so that the *total* profile has the drawn half-light radius;
* bulge − disk position angle ~ N(0, 0.843 rad); disk position angle uniform;
* knots (no COSMOS measurement; an explicit modelling choice): a fraction U(0, 0.3) of the disk
  light in U{5..30} knots.

Sizes are further limited to ``hlr <= max_hlr_fraction * stamp_size * pixel_scale`` by
redrawing (magnitude and size together), so the galaxy fits in its stamp.

The default PSF is ACS-like: an Airy pattern of the 2.4 m HST aperture (central obscuration
0.33) at 814 nm, convolved with a Gaussian of FWHM 0.0874″ (charge diffusion and jitter). The
Gaussian width was tuned so that the adaptive-moment size of the PSF (pixel response included)
equals the median of the 100 real COSMOS PSF images of the example release, σ = 0.0529″.
The default noise is white with σ = sqrt(1e-5) e-/s per 0.03″ pixel (the zero-lag value of
GalSim's COSMOS noise correlation function ``acs_I_unrot_sci_20_cf.fits``), scaled with the
pixel side so that the noise per unit area is unchanged at other pixel scales.

Reproducibility: the n stamps are cut into chunks of ``CHUNK_SIZE``; chunk ``i`` draws its
parameters, knots and noise from ``numpy.random.SeedSequence([seed, i])``, so results depend
only on ``seed`` (never on ``num_workers``). Workers are ``multiprocessing`` spawn processes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Mapping

import numpy as np

from tfhybrid.validation import TfhybridInputError, as_arcsec, check_range

#: Stamps per independently seeded chunk (fixed so results do not depend on the worker count).
CHUNK_SIZE = 128

#: HST/ACS F814W zero point of the COSMOS catalog fluxes (e-/s), from the example catalog.
COSMOS_ZERO_POINT = 26.022

#: Per-pixel noise sigma (e-/s) of COSMOS F814W at 0.03″/pixel.
COSMOS_NOISE_SIGMA = float(np.sqrt(1e-5))

#: HST/ACS pixel scale of the COSMOS images, arcsec.
HST_PIXEL_SCALE_ARCSEC = 0.03

#: Parameters of the simulated population (see the module docstring for their provenance).
COSMOS_POPULATION: Mapping[str, float] = {
    "mag_min": 17.0,
    "mag_max": 25.2,
    "mag_slope": 0.368,
    "ln_hlr_intercept": -0.992,
    "ln_hlr_slope": -0.324,
    "ln_hlr_pivot_mag": 22.0,
    "ln_hlr_scatter": 0.424,
    "hlr_min_arcsec": 0.03,
    "btt_beta_a": 0.363,
    "btt_beta_b": 0.779,
    "disk_q_beta_a": 2.57,
    "disk_q_beta_b": 2.15,
    "bulge_q_beta_a": 0.773,
    "bulge_q_beta_b": 1.25,
    "q_min": 0.2,
    "ln_size_ratio_mean": -1.294,
    "ln_size_ratio_sd": 1.197,
    "size_ratio_min": 0.1,
    "bulge_dphi_sd_rad": 0.843,
    "knot_fraction_max": 0.3,
    "knots_min": 5,
    "knots_max": 30,
}

#: ACS-like PSF: Airy (814 nm, 2.4 m, obscuration 0.33) convolved with this Gaussian FWHM.
ACS_PSF_JITTER_FWHM_ARCSEC = 0.0874

#: Parameter columns of ``GalaxyStamps.params`` (all (n,) arrays).
PARAM_NAMES = (
    "flux",
    "mag",
    "hlr_arcsec",
    "bulge_fraction",
    "bulge_hlr_arcsec",
    "disk_hlr_arcsec",
    "bulge_q",
    "disk_q",
    "bulge_beta_rad",
    "disk_beta_rad",
    "knot_fraction",
    "n_knots",
    "knot_seed",
    "noise_sigma",
)


@dataclasses.dataclass(frozen=True)
class GalaxyStamps:
    """A batch of simulated galaxy stamps.

    Attributes
    ----------
    images : np.ndarray
        (n, ny, nx) float32 noisy stamps, axis order (y, x), flux in e-/s per pixel.
    noiseless : np.ndarray or None
        (n, ny, nx) float32 stamps before noise (None if not kept).
    noise_sigma : np.ndarray
        (n,) float32 standard deviation of the Gaussian pixel noise added to each stamp.
    psf : np.ndarray
        (py, px) float32 PSF image (pixel response included, unit sum) at ``pixel_scale_arcsec``.
    pixel_scale_arcsec : float
        Pixel side, arcsec.
    params : dict
        (n,) arrays of the drawn parameters (``PARAM_NAMES``): ``flux`` (e-/s), ``mag``,
        ``hlr_arcsec`` (circularised half-light radius of the total profile, before PSF),
        component fractions, sizes, axis ratios ``q`` and position angles ``beta`` (radians,
        counter-clockwise from +x), knot fraction, number and seed, ``noise_sigma``.
    """

    images: np.ndarray
    noiseless: np.ndarray | None
    noise_sigma: np.ndarray
    psf: np.ndarray
    pixel_scale_arcsec: float
    params: dict

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclasses.dataclass(frozen=True)
class _PSFSpec:
    """Picklable PSF description (GalSim objects are rebuilt in each worker)."""

    fwhm_arcsec: float | None  # None: ACS-like
    moffat_beta: float | None  # None: Gaussian (when fwhm_arcsec is given)


def make_psf(psf_fwhm_arcsec: float | None = None, moffat_beta: float | None = None):
    """GalSim PSF profile.

    Parameters
    ----------
    psf_fwhm_arcsec : float or None
        None: the ACS-like HST PSF of the module docstring. Otherwise an isotropic profile of
        this FWHM (arcsec): Gaussian, or Moffat if ``moffat_beta`` is given.
    moffat_beta : float or None
        Moffat index.
    """
    import galsim

    if psf_fwhm_arcsec is None:
        airy = galsim.Airy(lam=814.0, diam=2.4, obscuration=0.33, scale_unit=galsim.arcsec)
        return galsim.Convolve(airy, galsim.Gaussian(fwhm=ACS_PSF_JITTER_FWHM_ARCSEC))
    if moffat_beta is None:
        return galsim.Gaussian(fwhm=psf_fwhm_arcsec)
    return galsim.Moffat(beta=moffat_beta, fwhm=psf_fwhm_arcsec)


def draw_psf_image(psf, pixel_scale_arcsec: float, size: int | None = None) -> np.ndarray:
    """Draw a PSF profile with pixel response into an odd-sized, unit-sum float32 image."""
    if size is None:
        size = int(np.ceil(8 * psf.calculateFWHM() / pixel_scale_arcsec)) | 1
        size = max(size, 15)
    img = psf.drawImage(nx=size, ny=size, scale=pixel_scale_arcsec).array
    return (img / img.sum()).astype(np.float32)


def _enclosed_fraction(r, btt, r_bulge, r_disk):
    from scipy import special

    # Circular Sérsic enclosed light: P(2n, b_n (r / r_e)^(1/n)); b_4, b_1 from gammaincinv.
    b4 = special.gammaincinv(8.0, 0.5)
    b1 = special.gammaincinv(2.0, 0.5)
    bulge = special.gammainc(8.0, b4 * (r / r_bulge) ** 0.25)
    disk = special.gammainc(2.0, b1 * r / r_disk)
    return btt * bulge + (1.0 - btt) * disk


def component_sizes(hlr, btt, size_ratio):
    """Disk and bulge half-light radii giving a total profile of half-light radius ``hlr``.

    Solves ``btt P_4(hlr; k r_d) + (1 - btt) P_1(hlr; r_d) = 1/2`` for the disk radius ``r_d``
    (bulge radius ``k r_d``, ``k = size_ratio <= 1``) by vectorised bisection on ln r_d, with
    P_n the enclosed-light fraction of a circular Sérsic profile. Knots follow the disk size, so
    the expected total profile has the drawn ``hlr``.

    Returns
    -------
    (bulge_hlr, disk_hlr) arrays of the broadcast shape of the inputs, same units as ``hlr``.
    """
    hlr, btt, size_ratio = np.broadcast_arrays(
        np.asarray(hlr, float), np.asarray(btt, float), np.asarray(size_ratio, float)
    )
    # Since k <= 1 the solution lies between hlr (pure disk) and hlr / k (pure bulge).
    lo = np.log(hlr) - 1e-9
    hi = np.log(hlr / size_ratio) + 1e-9
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        r_d = np.exp(mid)
        frac = _enclosed_fraction(hlr, btt, size_ratio * r_d, r_d)
        # Enclosed fraction at fixed radius decreases as the components grow.
        too_small = frac > 0.5
        lo = np.where(too_small, mid, lo)
        hi = np.where(too_small, hi, mid)
    r_d = np.exp(0.5 * (lo + hi))
    return size_ratio * r_d, r_d


def draw_population(rng: np.random.Generator, n: int, max_hlr_arcsec: float) -> dict:
    """Draw ``n`` galaxies' parameters from ``COSMOS_POPULATION`` (no noise parameters)."""
    p = COSMOS_POPULATION
    mags = np.empty(n)
    hlrs = np.empty(n)
    filled = 0
    k = p["mag_slope"] * np.log(10.0)
    lo_e, hi_e = np.exp(k * (p["mag_min"] - p["mag_max"])), 1.0
    while filled < n:
        m = 2 * (n - filled) + 16
        # Inverse CDF of dN/dm ∝ exp(k m) on [mag_min, mag_max].
        u = rng.uniform(lo_e, hi_e, m)
        mag = p["mag_max"] + np.log(u) / k
        ln_hlr = (
            p["ln_hlr_intercept"]
            + p["ln_hlr_slope"] * (mag - p["ln_hlr_pivot_mag"])
            + p["ln_hlr_scatter"] * rng.standard_normal(m)
        )
        hlr = np.exp(ln_hlr)
        ok = (hlr <= max_hlr_arcsec) & (hlr >= p["hlr_min_arcsec"])
        take = min(int(ok.sum()), n - filled)
        mags[filled : filled + take] = mag[ok][:take]
        hlrs[filled : filled + take] = hlr[ok][:take]
        filled += take
    btt = rng.beta(p["btt_beta_a"], p["btt_beta_b"], n)
    disk_q = np.clip(rng.beta(p["disk_q_beta_a"], p["disk_q_beta_b"], n), p["q_min"], 1.0)
    bulge_q = np.clip(rng.beta(p["bulge_q_beta_a"], p["bulge_q_beta_b"], n), p["q_min"], 1.0)
    ln_ratio = rng.normal(p["ln_size_ratio_mean"], p["ln_size_ratio_sd"], n)
    size_ratio = np.exp(np.clip(ln_ratio, np.log(p["size_ratio_min"]), 0.0))
    bulge_hlr, disk_hlr = component_sizes(hlrs, btt, size_ratio)
    disk_beta = rng.uniform(0.0, np.pi, n)
    bulge_beta = np.mod(disk_beta + rng.normal(0.0, p["bulge_dphi_sd_rad"], n), np.pi)
    knot_fraction = rng.uniform(0.0, p["knot_fraction_max"], n)
    n_knots = rng.integers(p["knots_min"], p["knots_max"] + 1, n)
    knot_seed = rng.integers(1, 2**31 - 1, n)
    flux = 10.0 ** (-0.4 * (mags - COSMOS_ZERO_POINT))
    return {
        "flux": flux,
        "mag": mags,
        "hlr_arcsec": hlrs,
        "bulge_fraction": btt,
        "bulge_hlr_arcsec": bulge_hlr,
        "disk_hlr_arcsec": disk_hlr,
        "bulge_q": bulge_q,
        "disk_q": disk_q,
        "bulge_beta_rad": bulge_beta,
        "disk_beta_rad": disk_beta,
        "knot_fraction": knot_fraction,
        "n_knots": n_knots,
        "knot_seed": knot_seed,
    }


_GSPARAMS_KW = {"folding_threshold": 5e-3, "maxk_threshold": 1e-3, "maximum_fft_size": 16384}

#: Ratio of half-light radius to scale radius of an exponential profile.
_EXP_HLR_OVER_R0 = 1.6783469900166605

#: Ratio of half-light radius to sigma of a 2-d Gaussian (knot positions follow a Gaussian).
_GAUSS_HLR_OVER_SIGMA = float(np.sqrt(2.0 * np.log(2.0)))


def knot_positions(params: Mapping[str, np.ndarray], index: int) -> np.ndarray:
    """(n_knots, 2) knot offsets (x, y) in arcsec of galaxy ``index``, *before* the disk shear.

    Like ``galsim.RandomKnots``, knots are points drawn from a circular Gaussian of the disk's
    half-light radius; they are drawn with NumPy from ``knot_seed`` so the renderer can batch them.
    """
    i = int(index)
    rng = np.random.default_rng(int(params["knot_seed"][i]))
    sigma = float(params["disk_hlr_arcsec"][i]) / _GAUSS_HLR_OVER_SIGMA
    return sigma * rng.standard_normal((int(params["n_knots"][i]), 2))


def galaxy_profile(params: Mapping[str, np.ndarray], index: int):
    """GalSim profile (before PSF) of galaxy ``index`` of a parameter dictionary.

    The same galaxy ``simulate_galaxy_stamps`` renders (knots included, as GalSim delta
    functions at ``knot_positions``), built from GalSim's own profiles: tests draw it with
    ``drawImage`` as an independent reference for the batched Fourier renderer.
    """
    import galsim

    gsp = galsim.GSParams(**_GSPARAMS_KW)
    i = int(index)
    flux = float(params["flux"][i])
    btt = float(params["bulge_fraction"][i])
    fk = float(params["knot_fraction"][i])
    disk_hlr = float(params["disk_hlr_arcsec"][i])
    disk_flux = (1.0 - btt) * flux
    parts = [
        galsim.Exponential(half_light_radius=disk_hlr, flux=disk_flux * (1 - fk), gsparams=gsp)
    ]
    if fk > 0:
        pos = knot_positions(params, i)
        each = disk_flux * fk / len(pos)
        parts += [
            galsim.DeltaFunction(flux=each, gsparams=gsp).shift(float(x), float(y)) for x, y in pos
        ]
    disk = galsim.Add(parts).shear(
        q=float(params["disk_q"][i]), beta=float(params["disk_beta_rad"][i]) * galsim.radians
    )
    bulge = galsim.DeVaucouleurs(
        half_light_radius=float(params["bulge_hlr_arcsec"][i]), flux=btt * flux, gsparams=gsp
    ).shear(q=float(params["bulge_q"][i]), beta=float(params["bulge_beta_rad"][i]) * galsim.radians)
    return galsim.Add([bulge, disk])


_DEVAUC_TABLE: tuple[np.ndarray, np.ndarray] | None = None


def _devaucouleurs_ft(kappa: np.ndarray) -> np.ndarray:
    """Fourier transform of a unit-flux, unit-hlr de Vaucouleurs profile at |k| r_e = kappa.

    Tabulated once from GalSim's own (Hankel-transform) k-values on a log grid and interpolated
    linearly in (ln kappa, ln F); relative error < 1e-4 over the range that matters.
    """
    global _DEVAUC_TABLE
    if _DEVAUC_TABLE is None:
        import galsim

        dv = galsim.DeVaucouleurs(half_light_radius=1.0)
        grid = np.geomspace(1e-3, 1e4, 2500)
        vals = np.array([dv.kValue(float(k), 0.0).real for k in grid])
        _DEVAUC_TABLE = (np.log(grid), np.log(np.maximum(vals, 1e-300)))
    lg, lv = _DEVAUC_TABLE
    lk = np.log(np.maximum(kappa, 1e-3))
    out = np.exp(np.interp(lk, lg, lv))
    return np.where(kappa > 1e4, 0.0, out)


def _elliptical_k2(kx, ky, q, beta):
    """|A^T k|^2 for an area-preserving shear of axis ratio q, major axis at angle beta.

    kx (1, 1, nkx), ky (1, nky, 1); q, beta (g,) -> (g, nky, nkx).
    """
    c = np.cos(beta)[:, None, None]
    s = np.sin(beta)[:, None, None]
    qq = q[:, None, None]
    kpar = kx * c + ky * s
    kperp = -kx * s + ky * c
    return kpar**2 / qq + kperp**2 * qq


def psf_kimage(psf, fft_size: int, pixel_scale: float) -> np.ndarray:
    """PSF Fourier transform on the ``rfft2`` grid of an ``fft_size``² image, times the pixel."""
    dk = 2 * np.pi / (fft_size * pixel_scale)
    # Two extra rows/columns so that both +N/2 and -N/2 frequencies are on GalSim's grid.
    kim = psf.drawKImage(nx=fft_size + 2, ny=fft_size + 2, scale=dk)
    b = kim.bounds
    ky_idx = np.fft.fftfreq(fft_size, 1.0 / fft_size).round().astype(int) - b.ymin
    kx_idx = np.fft.rfftfreq(fft_size, 1.0 / fft_size).round().astype(int) - b.xmin
    arr = kim.array[np.ix_(ky_idx, kx_idx)]
    k = 2 * np.pi * np.fft.rfftfreq(fft_size, pixel_scale)
    kyv = 2 * np.pi * np.fft.fftfreq(fft_size, pixel_scale)
    pix = (
        np.sinc(kyv * pixel_scale / (2 * np.pi))[:, None]
        * np.sinc(k * pixel_scale / (2 * np.pi))[None, :]
    )
    return arr * pix


def render_galaxies(
    params: Mapping[str, np.ndarray],
    psf_k: np.ndarray,
    stamp_size: int,
    pixel_scale: float,
    fft_size: int,
) -> np.ndarray:
    """Render galaxies convolved with PSF and pixel, batched in Fourier space.

    Each component's analytic (exponential) or tabulated (de Vaucouleurs) Fourier transform
    is evaluated at the sheared wave vector, knots as a batched sum of plane waves (a matmul of
    separable phase factors), multiplied by ``psf_k`` (PSF x pixel on the rfft grid) and
    inverse-transformed. The galaxy centre is pixel (stamp_size // 2, stamp_size // 2).
    The image is the ``fft_size``-periodic version; ``fft_size >= 2 stamp_size`` keeps the
    wrapped-around wings far from the stamp.

    Returns
    -------
    (g, stamp_size, stamp_size) float32, e-/s per pixel.
    """
    kx = (2 * np.pi * np.fft.rfftfreq(fft_size, pixel_scale))[None, None, :]
    ky = (2 * np.pi * np.fft.fftfreq(fft_size, pixel_scale))[None, :, None]
    flux = np.asarray(params["flux"], float)
    btt = np.asarray(params["bulge_fraction"], float)
    fk = np.asarray(params["knot_fraction"], float)
    disk_flux = (1 - btt) * flux
    k2d = _elliptical_k2(kx, ky, params["disk_q"], params["disk_beta_rad"])
    r0 = (np.asarray(params["disk_hlr_arcsec"]) / _EXP_HLR_OVER_R0)[:, None, None]
    ft = (disk_flux * (1 - fk))[:, None, None] * (1.0 + k2d * r0**2) ** -1.5
    del k2d
    k2b = _elliptical_k2(kx, ky, params["bulge_q"], params["bulge_beta_rad"])
    re = np.asarray(params["bulge_hlr_arcsec"])[:, None, None]
    ft = ft + (btt * flux)[:, None, None] * _devaucouleurs_ft(np.sqrt(k2b) * re)
    del k2b
    g = flux.shape[0]
    jmax = int(np.max(params["n_knots"]))
    xk = np.zeros((g, jmax))
    yk = np.zeros((g, jmax))
    wk = np.zeros((g, jmax))
    for i in range(g):
        pos = knot_positions(params, i)
        q, b = float(params["disk_q"][i]), float(params["disk_beta_rad"][i])
        # A = R diag(1/sqrt q, sqrt q) R^T maps the round knot pattern onto the sheared disk.
        c, s = np.cos(b), np.sin(b)
        rot = np.array([[c, -s], [s, c]])
        a_mat = rot @ np.diag([q**-0.5, q**0.5]) @ rot.T
        xy = pos @ a_mat.T
        m = len(pos)
        xk[i, :m], yk[i, :m] = xy[:, 0], xy[:, 1]
        wk[i, :m] = disk_flux[i] * fk[i] / m
    # exp(-i(kx x + ky y)) = (cx - i sx)(cy - i sy); four real batched matmuls are ~10x faster
    # than NumPy's complex batched matmul.
    phase_x = xk[:, :, None] * kx[0]  # (g, j, nkx)
    phase_y = yk[:, None, :] * ky[0]  # (g, nky, j)
    cx, sx = np.cos(phase_x), np.sin(phase_x)
    cy, sy = np.cos(phase_y) * wk[:, None, :], np.sin(phase_y) * wk[:, None, :]
    ft = ft + (np.matmul(cy, cx) - np.matmul(sy, sx)) - 1j * (np.matmul(sy, cx) + np.matmul(cy, sx))
    img = np.fft.irfft2(ft * psf_k[None], s=(fft_size, fft_size), axes=(-2, -1))
    img = np.fft.fftshift(img, axes=(-2, -1))
    lo = fft_size // 2 - stamp_size // 2
    return img[:, lo : lo + stamp_size, lo : lo + stamp_size].astype(np.float32)


def _fft_size(stamp_size: int) -> int:
    """Smallest 2^a 3^b >= 2 stamp_size (fast FFT lengths)."""
    target = 2 * stamp_size
    best = 1 << (target - 1).bit_length()
    p3 = 1
    while p3 < target * 3:
        p2 = p3
        while p2 < target:
            p2 *= 2
        best = min(best, p2)
        p3 *= 3
    return best


def _draw_chunk(task):
    """Worker: draw one seeded chunk. Returns (noisy, noiseless, params)."""
    (seed, chunk_index, n, stamp_size, pixel_scale, psf_spec, noise_spec, max_hlr, keep_clean) = (
        task
    )
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk_index]))
    params = draw_population(rng, n, max_hlr)
    if np.ndim(noise_spec) == 0:
        sigma = np.full(n, float(noise_spec))
    else:
        sigma = rng.uniform(noise_spec[0], noise_spec[1], n)
    params["noise_sigma"] = sigma
    fft_size = _fft_size(stamp_size)
    psf_k = psf_kimage(make_psf(psf_spec.fwhm_arcsec, psf_spec.moffat_beta), fft_size, pixel_scale)
    clean = np.concatenate(
        [
            render_galaxies(
                {k: v[s : s + 32] for k, v in params.items()},
                psf_k,
                stamp_size,
                pixel_scale,
                fft_size,
            )
            for s in range(0, n, 32)
        ]
    )
    noisy = clean + (sigma[:, None, None] * rng.standard_normal(clean.shape)).astype(np.float32)
    return noisy, (clean if keep_clean else None), params


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TfhybridInputError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise TfhybridInputError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _validate_noise(noise_sigma, pixel_scale: float):
    if noise_sigma is None:
        return COSMOS_NOISE_SIGMA * pixel_scale / HST_PIXEL_SCALE_ARCSEC
    arr = np.asarray(noise_sigma, dtype=float)
    if arr.ndim == 0:
        check_range("noise_sigma", arr, low=0.0)
        return float(arr)
    if arr.shape != (2,):
        raise TfhybridInputError(
            f"noise_sigma must be None, a number or a (low, high) pair; got shape {arr.shape}"
        )
    check_range("noise_sigma", arr, low=0.0)
    if arr[0] > arr[1]:
        raise TfhybridInputError(f"noise_sigma range must have low <= high; got {tuple(arr)}")
    return (float(arr[0]), float(arr[1]))


def simulate_galaxy_stamps(
    n: int,
    seed: int,
    stamp_size: int = 64,
    pixel_scale_arcsec=HST_PIXEL_SCALE_ARCSEC,
    psf_fwhm_arcsec=None,
    noise_sigma=None,
    num_workers: int | None = None,
    progress: bool = False,
    *,
    moffat_beta: float | None = None,
    max_hlr_fraction: float = 0.25,
    keep_noiseless: bool = True,
) -> GalaxyStamps:
    """Simulate ``n`` COSMOS-like galaxy stamps with GalSim (bulge + disk + knots).

    Parameters
    ----------
    n : int
        Number of stamps (>= 1).
    seed : int
        Random seed (>= 0). Same seed, same stamps, whatever ``num_workers``.
    stamp_size : int
        Stamp side in pixels (8..1024); stamps are (stamp_size, stamp_size), galaxy centred at
        the stamp centre (pixel ``stamp_size // 2`` for even sizes, GalSim's convention).
    pixel_scale_arcsec : float or astropy Quantity
        Pixel side (arcsec if a number), in (0.001, 2]″. Default HST/ACS 0.03″.
    psf_fwhm_arcsec : float, Quantity or None
        None: the ACS-like HST PSF. Otherwise an isotropic Gaussian (or Moffat with
        ``moffat_beta``) of this FWHM.
    noise_sigma : None, float or (low, high)
        Per-pixel Gaussian noise sigma (e-/s). None: COSMOS F814W depth scaled to the pixel
        size; a number: that sigma for every stamp (0 allowed: noiseless); a pair: per-stamp
        sigma uniform in [low, high]. Recorded per stamp in ``noise_sigma``.
    num_workers : int or None
        Processes (None: ``min(os.cpu_count(), number of chunks)``; 1: in-process).
    progress : bool
        Show a tqdm progress bar over chunks.
    moffat_beta : float or None
        Moffat index for a non-default PSF (None: Gaussian).
    max_hlr_fraction : float
        Galaxies are drawn with half-light radius <= this fraction of the stamp side.
    keep_noiseless : bool
        Keep the noiseless stamps in ``noiseless`` (memory: doubles the output).

    Returns
    -------
    GalaxyStamps
    """
    n = _check_positive_int("n", n)
    seed = _check_positive_int("seed", seed, minimum=0)
    stamp_size = _check_positive_int("stamp_size", stamp_size, minimum=8)
    if stamp_size > 1024:
        raise TfhybridInputError(f"stamp_size must be <= 1024 pixels; got {stamp_size}")
    pixel_scale = as_arcsec("pixel_scale_arcsec", pixel_scale_arcsec, low=1e-3, high=2.0)
    if pixel_scale <= 1e-3:
        raise TfhybridInputError(f"pixel_scale_arcsec must be > 0.001 arcsec; got {pixel_scale}")
    fwhm = None
    if psf_fwhm_arcsec is not None:
        fwhm = as_arcsec("psf_fwhm_arcsec", psf_fwhm_arcsec, low=1e-3, high=10.0)
    if moffat_beta is not None:
        check_range("moffat_beta", moffat_beta, low=1.1, high=50.0)
    check_range("max_hlr_fraction", max_hlr_fraction, low=0.01, high=1.0)
    noise_spec = _validate_noise(noise_sigma, pixel_scale)
    max_hlr = float(max_hlr_fraction) * stamp_size * pixel_scale
    if max_hlr <= COSMOS_POPULATION["hlr_min_arcsec"] * 1.5:
        raise TfhybridInputError(
            f"stamp of {stamp_size} pixels at {pixel_scale}″ is too small for galaxies: "
            f"max_hlr_fraction * stamp extent = {max_hlr:.3g}″ must exceed "
            f"{COSMOS_POPULATION['hlr_min_arcsec'] * 1.5:.3g}″"
        )
    psf_spec = _PSFSpec(fwhm, moffat_beta)

    chunks = [(s, min(CHUNK_SIZE, n - s)) for s in range(0, n, CHUNK_SIZE)]
    tasks = [
        (seed, i, m, stamp_size, pixel_scale, psf_spec, noise_spec, max_hlr, keep_noiseless)
        for i, (_, m) in enumerate(chunks)
    ]
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, len(tasks))
    num_workers = _check_positive_int("num_workers", num_workers)
    num_workers = min(num_workers, len(tasks))

    results = _run_tasks(
        _draw_chunk, tasks, num_workers, progress, n_per_task=[m for _, m in chunks]
    )
    images = np.concatenate([r[0] for r in results])
    noiseless = np.concatenate([r[1] for r in results]) if keep_noiseless else None
    params = {k: np.concatenate([r[2][k] for r in results]) for k in PARAM_NAMES}
    psf_image = draw_psf_image(make_psf(fwhm, moffat_beta), pixel_scale)
    return GalaxyStamps(
        images=images,
        noiseless=noiseless,
        noise_sigma=params["noise_sigma"].astype(np.float32),
        psf=psf_image,
        pixel_scale_arcsec=pixel_scale,
        params=params,
    )


def _run_tasks(fn, tasks, num_workers: int, progress: bool, n_per_task=None, desc="stamps"):
    """Run ``fn`` over ``tasks`` in order, in-process or in a spawn pool, with a tqdm bar."""
    from tqdm.auto import tqdm

    total = sum(n_per_task) if n_per_task is not None else len(tasks)
    bar = tqdm(total=total, desc=desc, unit="stamp", disable=not progress, leave=False)
    out = []
    try:
        if num_workers <= 1:
            for k, t in enumerate(tasks):
                out.append(fn(t))
                bar.update(n_per_task[k] if n_per_task is not None else 1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(num_workers, initializer=_worker_init) as pool:
                for k, r in enumerate(pool.imap(fn, tasks)):
                    out.append(r)
                    bar.update(n_per_task[k] if n_per_task is not None else 1)
    finally:
        bar.close()
    return out


def _worker_init() -> None:
    # Each worker is single-threaded: GalSim's FFTW must not oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
