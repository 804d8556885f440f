"""Simulated multi-band scenes with known truth (HSC-like, 000_* §3 and Figs. 1, 3, 4).

:func:`simulate_scene` draws 3–6 GalSim-model galaxies (bulge + disk + knots, the population
of :mod:`tfhybrid.data.simulate`) with distinct SEDs into a grizy scene at 0.168″/pixel with
per-band Gaussian PSFs (FWHM 0.79, 0.75, 0.61, 0.68, 0.68″) and white noise at HSC-Wide depth.
Each galaxy is rendered twice:

* in every band with that band's PSF on a 48-pixel stamp (so the light outside the fitted
  32-pixel box is in the data, as it is on the sky) — the observation;
* with the model-frame PSF (0.6″ Gaussian) on the box (32 pixels), peak-normalised — the true
  morphology S_k that the deblender should recover (:class:`~tfhybrid.deblend.scene.ModelFrame`).

True fluxes are the analytic total fluxes times the SED (``true_fluxes`` (K, B)). Centres are
integer pixels, so the true morphology lies on exactly the box the fit uses.

:func:`gaussian_morphology` gives peak-normalised elliptical Gaussians (symmetric and
monotonic, so inside SCARLET's constraint set) for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfhybrid.deblend.scene import (
    HSC_BANDS,
    HSC_PIXEL_SCALE_ARCSEC,
    HSC_PSF_FWHM_ARCSEC,
    ModelFrame,
    Observation,
)
from tfhybrid.validation import TfhybridInputError

__all__ = [
    "HSC_WAVELENGTH_NM",
    "HSC_DEPTH_MAG",
    "HSC_ZERO_POINT",
    "SimulatedScene",
    "gaussian_morphology",
    "hsc_noise_sigma",
    "simulate_scene",
]

#: Effective wavelengths of HSC grizy (nm).
HSC_WAVELENGTH_NM = (477.0, 621.0, 770.0, 893.0, 1000.0)
#: HSC-Wide 5σ point-source depths grizy (AB mag, Aihara et al. 2018).
HSC_DEPTH_MAG = (26.5, 26.1, 25.9, 25.1, 24.4)
#: Zero point of the simulated counts (HSC coadds: 27).
HSC_ZERO_POINT = 27.0

_OBS_STAMP = 48


def gaussian_morphology(box: int, sigma_px: float, q: float = 1.0, theta_rad: float = 0.0,
                        offset_yx=(0.0, 0.0)) -> np.ndarray:
    """Peak-normalised elliptical Gaussian ``(box, box)`` centred on pixel ``(box//2, box//2)``.

    ``sigma_px`` along the major axis, axis ratio ``q`` (≤ 1), major axis at ``theta_rad``
    counter-clockwise from +x; ``offset_yx`` shifts the centre (pixels, (y, x)).
    """
    yy, xx = np.mgrid[:box, :box].astype(np.float64)
    yy -= box // 2 + offset_yx[0]
    xx -= box // 2 + offset_yx[1]
    c, s = np.cos(theta_rad), np.sin(theta_rad)
    u, v = c * xx + s * yy, -s * xx + c * yy
    img = np.exp(-0.5 * (u**2 + (v / q) ** 2) / sigma_px**2)
    return (img / img.max()).astype(np.float32)


def hsc_noise_sigma(psf_fwhm_arcsec=HSC_PSF_FWHM_ARCSEC, depth_mag=HSC_DEPTH_MAG,
                    pixel_scale_arcsec: float = HSC_PIXEL_SCALE_ARCSEC,
                    zero_point: float = HSC_ZERO_POINT) -> np.ndarray:
    """Per-pixel σ (counts) giving a 5σ point-source depth ``depth_mag`` for Gaussian PSFs.

    A PSF-fitted point source has S/N = F / (σ √N_eff) with N_eff = 4π σ_psf² (pixels).
    """
    sig_psf = np.asarray(psf_fwhm_arcsec) / (2.0 * np.sqrt(2.0 * np.log(2.0))) / pixel_scale_arcsec
    n_eff = 4.0 * np.pi * sig_psf**2
    flux5 = 10.0 ** (-0.4 * (np.asarray(depth_mag) - zero_point))
    return flux5 / (5.0 * np.sqrt(n_eff))


@dataclass(frozen=True)
class SimulatedScene:
    """One simulated scene and its truth.

    Attributes
    ----------
    observation : the noisy :class:`Observation` (B, ny, nx) with its PSFs and weights.
    noiseless : (B, ny, nx) the scene before noise.
    centres_xy : (K, 2) true centres (x, y) pixels (integers).
    true_morphs : (K, box, box) model-frame morphologies, peak 1.
    true_seds : (K, B) SED shapes (sum 1 over bands).
    true_fluxes : (K, B) total flux per band (counts).
    noise_sigma : (B,) per-pixel σ.
    params : GalSim population parameters of the K galaxies.
    """

    observation: Observation
    noiseless: np.ndarray
    centres_xy: np.ndarray
    true_morphs: np.ndarray
    true_seds: np.ndarray
    true_fluxes: np.ndarray
    noise_sigma: np.ndarray
    params: dict


def _place(frame: np.ndarray, stamp: np.ndarray, cy: int, cx: int) -> None:
    """Add ``stamp`` (centre pixel s//2) into ``frame`` (…, ny, nx) at (cy, cx), clipped."""
    ny, nx = frame.shape[-2:]
    sy, sx = stamp.shape[-2:]
    y0, x0 = cy - sy // 2, cx - sx // 2
    fy0, fx0 = max(y0, 0), max(x0, 0)
    fy1, fx1 = min(y0 + sy, ny), min(x0 + sx, nx)
    frame[..., fy0:fy1, fx0:fx1] += stamp[..., fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]


def simulate_scene(
    seed: int,
    n_sources: int | tuple[int, int] = (3, 6),
    shape: tuple[int, int] = (64, 64),
    noise_factor: float = 1.0,
    frame: ModelFrame | None = None,
    psf_fwhm_arcsec=HSC_PSF_FWHM_ARCSEC,
    bands=HSC_BANDS,
    imag_range: tuple[float, float] = (20.0, 23.0),
    spread_px: float = 12.0,
    min_separation_px: float = 6.0,
) -> SimulatedScene:
    """An HSC-like grizy blend with known truth (see the module docstring).

    Parameters
    ----------
    seed : random seed (everything depends on it only).
    n_sources : K, or a (low, high) range drawn uniformly (inclusive).
    shape : (ny, nx) of the scene.
    noise_factor : multiplies the HSC-Wide noise σ (3 for the paper's Fig. 3).
    frame : model frame (pixel scale, model PSF, box size).
    psf_fwhm_arcsec : per-band Gaussian PSF FWHM.
    imag_range : i-band magnitudes of the galaxies (uniform).
    spread_px : centres within ± this of the scene centre (blends).
    min_separation_px : minimum distance between centres.
    """
    from tfhybrid.data.simulate import (
        _fft_size,
        draw_population,
        make_psf,
        psf_kimage,
        render_galaxies,
    )
    from tfhybrid.physics.psf import gaussian_psf

    frame = frame or ModelFrame()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 8]))
    if isinstance(n_sources, tuple):
        k = int(rng.integers(n_sources[0], n_sources[1] + 1))
    else:
        k = int(n_sources)
    if k < 1:
        raise TfhybridInputError(f"n_sources must be >= 1; got {k}")
    n_bands = len(bands)
    if len(psf_fwhm_arcsec) != n_bands:
        raise TfhybridInputError(f"{len(psf_fwhm_arcsec)} PSF FWHM given for {n_bands} bands")
    scale = frame.pixel_scale_arcsec
    box = int(frame.box_size)
    ny, nx = shape

    # Galaxies small enough that the model-frame profile fits the box.
    params = draw_population(rng, k, max_hlr_arcsec=0.12 * box * scale)
    imag = rng.uniform(imag_range[0], imag_range[1], k)
    flux = 10.0 ** (-0.4 * (imag - HSC_ZERO_POINT))
    params["flux"] = np.ones(k)  # render unit-flux profiles; fluxes applied per band below

    # Distinct SEDs: power laws in wavelength with slopes spread over [-2.5, 2.5] (blue to
    # red), shuffled, with 10 % per-band jitter; normalised so that the i-band value is 1.
    lam = np.asarray(HSC_WAVELENGTH_NM[:n_bands]) / 770.0
    slopes = rng.permutation(np.linspace(-2.5, 2.5, k)) + rng.uniform(-0.3, 0.3, k)
    seds = lam[None, :] ** slopes[:, None] * rng.uniform(0.9, 1.1, (k, n_bands))
    iband = min(2, n_bands - 1)
    seds = seds / seds[:, iband : iband + 1]
    true_fluxes = seds * flux[:, None]

    # Centres: the first near the middle, the others within spread_px, min separation.
    cy0, cx0 = (ny - 1) // 2, (nx - 1) // 2
    centres = [(cx0, cy0)]
    tries = 0
    while len(centres) < k:
        tries += 1
        c = (cx0 + int(rng.integers(-spread_px, spread_px + 1)),
             cy0 + int(rng.integers(-spread_px, spread_px + 1)))
        if all(np.hypot(c[0] - o[0], c[1] - o[1]) >= min_separation_px for o in centres):
            centres.append(c)
        if tries > 10000:
            raise TfhybridInputError("could not place the sources; lower min_separation_px")
    centres = np.asarray(centres, dtype=np.float64)

    fft_model = _fft_size(box)
    model_k = psf_kimage(make_psf(frame.psf_fwhm_arcsec), fft_model, scale)
    morphs = render_galaxies(params, model_k, box, scale, fft_model)
    true_morphs = morphs / morphs.max(axis=(-2, -1), keepdims=True)

    fft_obs = _fft_size(_OBS_STAMP)
    noiseless = np.zeros((n_bands, ny, nx))
    for b in range(n_bands):
        kb = psf_kimage(make_psf(float(psf_fwhm_arcsec[b])), fft_obs, scale)
        stamps = render_galaxies(params, kb, _OBS_STAMP, scale, fft_obs)
        for j in range(k):
            _place(noiseless[b], true_fluxes[j, b] * stamps[j], int(centres[j, 1]),
                   int(centres[j, 0]))
    sigma = noise_factor * hsc_noise_sigma(psf_fwhm_arcsec[:n_bands], HSC_DEPTH_MAG[:n_bands],
                                           scale)
    noisy = noiseless + sigma[:, None, None] * rng.standard_normal(noiseless.shape)
    psfs = np.stack([gaussian_psf(f, scale, 25) for f in psf_fwhm_arcsec])
    obs = Observation.create(noisy, psfs, noise_sigma=sigma, bands=bands,
                             pixel_scale_arcsec=scale)
    params["flux"] = flux
    params["imag"] = imag
    return SimulatedScene(
        observation=obs,
        noiseless=noiseless.astype(np.float32),
        centres_xy=centres,
        true_morphs=true_morphs.astype(np.float32),
        true_seds=(seds / seds.sum(axis=1, keepdims=True)).astype(np.float32),
        true_fluxes=true_fluxes.astype(np.float64),
        noise_sigma=sigma,
        params=params,
    )
