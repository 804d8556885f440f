"""Mock lens systems of section 5.1 of Chianese et al. 2020 (file ``003_*``).

A mock is a held-out galaxy image (never seen by the VAE) used as the source of eq. 17, lens and
source parameters drawn from the priors (eqs. 14–16, 18–23, :func:`tfhybrid.lens.model.
parameter_prior`), the lensing simulator (256 × 256, 0.04″, Gaussian PSF σ = 0.05″), and
Gaussian pixel noise at the paper's three levels (σ = 0.333, 0.1, 0.0333: low, medium and high
S/N), with the S/N of eqs. 24–25 for each (Table 1).

Sources. The paper denoised test-set COSMOS images (non-local means) and rescaled them to fill
about the central third of the source plane. Here the sources are simulated galaxies of the
VAE's training population (same simulator, same S/N selection, same 64 × 64 preprocessing and
peak normalisation), from a seed stream disjoint from the training set's
(:data:`HELD_OUT_SEED_OFFSET`), taken noise-free, and zoomed about their centroid so that the
radius holding 90 % of the flux is 1/6 of the image side (the galaxy's 90 % diameter then spans
the central third; the zoom is clipped to [0.5, 2] so no source is distorted far from its
population).

Files: :func:`write_mock_fits` writes one multi-extension FITS per system: the noise-free image
in the primary HDU, whose header records every true parameter (``R_EIN``, ``GAMMA``, ``Q``,
``PHI``, ``TLENS1``, ``TLENS2``, ``GAMMA1``, ``GAMMA2``, ``TSRC1``, ``TSRC2``, ``S``, ``IOTA``)
and the simulator configuration (and ``NIMAGES``, the image count of the source's light
centroid, when it was counted); ``SOURCE`` (64 × 64); ``OBS_LOW``, ``OBS_MEDIUM``,
``OBS_HIGH`` with ``NOISE`` and ``SNR`` cards; ``PSF``, the PSF image, when the mocks were
made with one instead of the configuration's Gaussian.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfhybrid.data.preprocess import (
    LENSING_IMAGE_SIZE,
    LENSING_SNR_RANGE,
    crop_to_square,
    downscale,
    rescale_to_central_third,
    snr_cut_mask,
)
from tfhybrid.data.simulate import simulate_galaxy_stamps
from tfhybrid.io import atomic_path
from tfhybrid.lens.model import LensPriorConfig, parameter_prior
from tfhybrid.physics.lensing import (
    NOISE_SIGMA_PRESETS,
    PARAM_NAMES,
    LensingConfig,
    add_noise,
    count_images,
    shared_simulator,
    signal_to_noise,
    simulate_lensed_image,
    source_light_centroid,
)
from tfhybrid.validation import TfhybridInputError

__all__ = [
    "HELD_OUT_SEED_OFFSET",
    "FITS_KEYS",
    "MockSystems",
    "held_out_sources",
    "rescale_to_central_third",
    "make_mocks",
    "mock_image_counts",
    "write_mock_fits",
    "read_mock_fits",
]

#: Held-out sources use simulation seeds ``seed + HELD_OUT_SEED_OFFSET + 7919 r``; the shipped
#: VAE's training rounds used ``SeedSequence([2020, r])`` seeds (32-bit hashes): the streams
#: differ, so no training galaxy is drawn again.
HELD_OUT_SEED_OFFSET = 1_000_003

#: FITS header keyword of each parameter (8 characters at most).
FITS_KEYS = dict(
    r_ein="R_EIN", gamma="GAMMA", q="Q", phi="PHI", theta_lens1="TLENS1", theta_lens2="TLENS2",
    gamma1="GAMMA1", gamma2="GAMMA2", theta_src1="TSRC1", theta_src2="TSRC2", s="S", iota="IOTA",
)
_FITS_COMMENTS = dict(
    r_ein="Einstein radius [arcsec] (eq. 11)", gamma="power-law slope (eq. 11)",
    q="axis ratio minor/major (eq. 12)", phi="major-axis angle [rad]",
    theta_lens1="lens centre x [arcsec]", theta_lens2="lens centre y [arcsec]",
    gamma1="external shear (eq. 13)", gamma2="external shear (eq. 13)",
    theta_src1="source centre x [arcsec]", theta_src2="source centre y [arcsec]",
    s="source half-size [arcsec] (eq. 17)", iota="source intensity (eq. 17)",
)
_FORMAT = "tfhybrid.lens.mock"
NOISE_LEVELS = tuple(NOISE_SIGMA_PRESETS)  # ("low", "medium", "high")


@dataclass
class MockSystems:
    """``S`` mock systems.

    Attributes
    ----------
    params : dict of (S,) float arrays, the 12 true parameters of :data:`PARAM_NAMES`.
    sources : (S, 64, 64) float32, the true source images (peak 1, rows increase with θ₂).
    noiseless : (S, n_pix, n_pix) float32, the noise-free lensed, PSF-convolved images.
    observed : dict noise level → (S, n_pix, n_pix) float32 noisy images.
    noise_sigma : dict noise level → σ.
    snr : dict noise level → (S,) S/N of eqs. 24–25 (Table 1).
    config : LensingConfig used.
    n_images : (S,) int images of each source's light centroid (:func:`mock_image_counts`),
        when :func:`make_mocks` counted them (``min_images`` > 1) or a mock file recorded
        them; :meth:`image_counts` counts them otherwise.
    psf_image : (p, p) float64 with unit sum, the PSF the images were made with when it was
        an image, not the configuration's Gaussian (None); pass it on to
        ``LensPosterior(psf_image=...)``.
    """

    params: dict
    sources: np.ndarray
    noiseless: np.ndarray
    observed: dict
    noise_sigma: dict
    snr: dict
    config: LensingConfig = field(default_factory=LensingConfig)
    n_images: np.ndarray | None = None
    psf_image: np.ndarray | None = None

    @property
    def num_systems(self) -> int:
        return int(self.sources.shape[0])

    def system(self, i: int) -> MockSystems:
        """The ``i``-th system alone (arrays keep a leading axis of 1)."""
        sl = slice(i, i + 1)
        return MockSystems(
            {k: v[sl] for k, v in self.params.items()}, self.sources[sl], self.noiseless[sl],
            {k: v[sl] for k, v in self.observed.items()}, dict(self.noise_sigma),
            {k: v[sl] for k, v in self.snr.items()}, self.config,
            None if self.n_images is None else self.n_images[sl], self.psf_image,
        )

    def image_counts(self) -> np.ndarray:
        """(S,) images of each source's light centroid: :attr:`n_images`, counted once."""
        if self.n_images is None:
            self.n_images = mock_image_counts(self.params, self.sources, self.config)
        return self.n_images

    def snr_table(self) -> str:
        """Table 1 of the paper for these systems: σ_noise and S/N per level."""
        levels = list(self.observed)
        head = "system  " + "  ".join(f"{lv:>8s}" for lv in levels)
        sig = "sigma   " + "  ".join(f"{self.noise_sigma[lv]:8.4g}" for lv in levels)
        rows = [
            f"{i:<6d}  " + "  ".join(f"{self.snr[lv][i]:8.0f}" for lv in levels)
            for i in range(self.num_systems)
        ]
        return "\n".join([head, sig, *rows])


def held_out_sources(n: int, seed: int = 0, stamp_size: int = 128,
                     max_tries: int = 60) -> np.ndarray:
    """``n`` noise-free 64 × 64 held-out source images (see the module docstring).

    Simulated with seeds ``seed + HELD_OUT_SEED_OFFSET + round``; a stamp is kept when its
    noisy version passes the training set's S/N cut (15 ≤ max(I_1/4)/σ ≤ 50), then its
    noise-free version is cropped, downscaled to 64 × 64, peak-normalised and rescaled with
    :func:`rescale_to_central_third`. Deterministic for ``(n, seed)``.
    """
    if not isinstance(n, int | np.integer) or n < 1:
        raise TfhybridInputError(f"n must be a positive int; got {n!r}")
    kept: list[np.ndarray] = []
    for round_index in range(max_tries):
        batch = max(16, 8 * (n - len(kept)))
        stamps = simulate_galaxy_stamps(
            batch, int(seed) + HELD_OUT_SEED_OFFSET + round_index * 7919, stamp_size=stamp_size,
            num_workers=1 if batch <= 64 else None,
        )
        # the training set's cut, on the native stamps as make_lensing_training_set applies it
        sigma = np.broadcast_to(np.asarray(stamps.noise_sigma, dtype=np.float64), (batch,))
        mask = snr_cut_mask(stamps.images, sigma, *LENSING_SNR_RANGE)
        for i in np.flatnonzero(mask):
            clean = downscale(crop_to_square(stamps.noiseless[i]), LENSING_IMAGE_SIZE)
            kept.append(rescale_to_central_third(clean / clean.max()))
            if len(kept) == n:
                return np.stack(kept)
    raise TfhybridInputError(
        f"only {len(kept)} of {n} held-out sources passed the S/N cut after {max_tries} rounds"
    )


def mock_image_counts(params, sources, config: LensingConfig | None = None) -> np.ndarray:
    """Images of each source's light centroid in the field (``(S,)`` int).

    :func:`tfhybrid.physics.lensing.count_images` at
    :func:`tfhybrid.physics.lensing.source_light_centroid` of ``sources`` ``(S, ny, nx)``
    placed by ``params`` (the 12 parameters, ``(S,)`` each). 1: the source is not multiply
    imaged; 2-5: a strong lens (double, quad, with a central image for γ < 2).
    """
    config = LensingConfig() if config is None else config
    beta1, beta2 = source_light_centroid(sources, params)
    return count_images(params, beta1, beta2, config)


def make_mocks(
    n: int = 1,
    seed: int = 0,
    noise_levels=NOISE_LEVELS,
    config: LensingConfig | None = None,
    prior: LensPriorConfig | None = None,
    sources: np.ndarray | None = None,
    min_snr_high: float = 0.0,
    min_images: int = 0,
    psf_image: np.ndarray | None = None,
) -> MockSystems:
    """Section 5.1 mocks: held-out sources, prior-drawn parameters, three noise levels.

    Parameters
    ----------
    n : number of systems.
    seed : seeds the sources, the parameter draws and the noise (stateless).
    noise_levels : names of :data:`tfhybrid.physics.lensing.NOISE_SIGMA_PRESETS` or numbers.
    config : LensingConfig (default: the paper's 256 × 256 at 0.04″, PSF σ = 0.05″).
    prior : LensPriorConfig for the parameter draws.
    sources : (n, 64, 64) source images to use instead of :func:`held_out_sources`.
    min_snr_high : redraw a system's parameters (up to 20 times) while its S/N at the LAST
        noise level is below this (0: keep every draw).
    min_images : redraw a system's parameters (in the same loop) while the light centroid of
        its source has fewer images than this in the field (:func:`mock_image_counts`); 2
        keeps only multiply imaged, i.e. strongly lensed, systems, as a lens sample selected
        on its arcs would be (0 or 1: keep every draw). With the paper's priors 4 of the 10
        draws of the v6 study were singly imaged: the lens centre's prior (N(0, 0.5″) per
        axis) often puts the source outside the caustics.
    psf_image : (p, p) PSF image at the grid's pixel scale (odd sides, centred), replacing the
        configuration's Gaussian (e.g. from :func:`tfhybrid.lens.observations.read_psf_image`).
    """
    config = LensingConfig() if config is None else config
    if psf_image is not None:  # validated and normalised as the simulator uses it
        psf_image = shared_simulator(config, psf_image).psf_kernel
    if sources is None:
        sources = held_out_sources(n, seed)
    sources = np.asarray(sources, dtype=np.float32)
    if sources.ndim != 3 or sources.shape[0] != n:
        raise TfhybridInputError(
            f"sources must have shape ({n}, ny, nx) for n={n}; got {sources.shape}"
        )
    levels = list(noise_levels)
    if not levels:
        raise TfhybridInputError("noise_levels is empty; give at least one level")
    sigmas = {str(lv): float(NOISE_SIGMA_PRESETS.get(lv, lv)) for lv in levels}
    for name, sig in sigmas.items():
        if not (np.isfinite(sig) and sig > 0):
            raise TfhybridInputError(f"noise level {name!r} must have sigma > 0; got {sig}")
    if not isinstance(min_images, int | np.integer) or min_images < 0:
        raise TfhybridInputError(f"min_images must be an int >= 0; got {min_images!r}")
    prior_jd = parameter_prior(prior, tf.float32)
    draws = {k: v.numpy().astype(np.float64) for k, v in
             prior_jd.sample(n, seed=(int(seed), 101)).items()}
    noiseless = simulate_lensed_image(sources, draws, config, psf_image).numpy()
    last = list(sigmas)[-1]
    max_redraws = 20 if min_snr_high > 0 or min_images > 1 else 0
    counts = mock_image_counts(draws, sources, config) if min_images > 1 else None
    for attempt in range(max_redraws + 1 if max_redraws else 0):
        snr_last, _ = signal_to_noise(noiseless, sigmas[last], config.pixel_scale_arcsec)
        bad = np.atleast_1d(snr_last) < min_snr_high
        if counts is not None:
            bad |= counts < min_images
        if not bad.any():
            break
        if attempt == max_redraws:
            warnings.warn(
                f"mock system(s) {np.flatnonzero(bad).tolist()} still have S/N < "
                f"{min_snr_high:g} or fewer than {min_images} images after {max_redraws} "
                "redraws; they are kept", stacklevel=2,
            )
            break
        redraw = {k: v.numpy().astype(np.float64) for k, v in
                  prior_jd.sample(n, seed=(int(seed), 1000 + attempt)).items()}
        for k in draws:
            draws[k] = np.where(bad, redraw[k], draws[k])
        noiseless = simulate_lensed_image(sources, draws, config, psf_image).numpy()
        if counts is not None:  # only the redrawn systems' counts changed
            counts[bad] = mock_image_counts({k: v[bad] for k, v in draws.items()}, sources[bad],
                                            config)
    observed, snr = {}, {}
    for j, (name, sig) in enumerate(sigmas.items()):
        obs = add_noise(noiseless, sig, seed=(int(seed), 200 + j)).numpy()
        observed[name] = obs.astype(np.float32)
        # S/N of the noisy observation, as the paper computes it (eqs. 24-25)
        snr[name] = np.atleast_1d(signal_to_noise(obs, sig, config.pixel_scale_arcsec)[0])
    return MockSystems(draws, sources, noiseless.astype(np.float32), observed, sigmas, snr,
                       config, counts, psf_image)


def parameter_cards(params, i: int) -> list[tuple]:
    """FITS header cards ``(key, value, comment)`` of system ``i``'s 12 parameters
    (:data:`FITS_KEYS`; arcsec and radians)."""
    return [(FITS_KEYS[name], float(params[name][i]), _FITS_COMMENTS[name])
            for name in PARAM_NAMES]


def write_mock_fits(mocks: MockSystems, directory: str | os.PathLike,
                    overwrite: bool = False) -> list[Path]:
    """One FITS file per system, ``mock_000.fits``, … (layout in the module docstring)."""
    from astropy.io import fits

    out_dir = Path(directory)
    paths = [out_dir / f"mock_{i:03d}.fits" for i in range(mocks.num_systems)]
    if not overwrite:
        existing = [str(p) for p in paths if p.exists()]
        if existing:
            raise TfhybridInputError(f"{existing[0]} exists; pass overwrite=True to replace it")
    cfg = mocks.config
    for i, path in enumerate(paths):
        primary = fits.PrimaryHDU(mocks.noiseless[i])
        h = primary.header
        h["FORMAT"] = (_FORMAT, "tfhybrid mock lens system")
        h.extend(parameter_cards(mocks.params, i))
        h["NPIX"] = (cfg.n_pix, "lens-plane pixels per side")
        h["PIXSCALE"] = (cfg.pixel_scale_arcsec, "[arcsec] pixel side")
        h["PSFSIG"] = (cfg.psf_sigma_arcsec or 0.0, "[arcsec] Gaussian PSF sigma (0: none)")
        h["PSFIMAGE"] = (mocks.psf_image is not None, "the PSF is the PSF extension's image")
        h["DEFLECT"] = (cfg.deflection, "SPLE deflection: table or epl")
        h["BUNIT"] = ("surface brightness", "units of iota * d (eq. 17)")
        if mocks.n_images is not None:
            h["NIMAGES"] = (int(mocks.n_images[i]), "images of the source light centroid")
        hdus = [primary, fits.ImageHDU(mocks.sources[i], name="SOURCE")]
        for level, obs in mocks.observed.items():
            hdu = fits.ImageHDU(obs[i], name=f"OBS_{level.upper()}"[:8])
            hdu.header["NOISE"] = (mocks.noise_sigma[level], "pixel noise sigma")
            hdu.header["SNR"] = (float(mocks.snr[level][i]), "S/N of eqs. 24-25")
            hdu.header["LEVEL"] = (level, "noise level name")
            hdus.append(hdu)
        if mocks.psf_image is not None:
            hdus.append(fits.ImageHDU(mocks.psf_image, name="PSF"))
        with atomic_path(path) as tmp:
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return paths


def read_mock_fits(path: str | os.PathLike) -> MockSystems:
    """Read a :func:`write_mock_fits` file back into a one-system :class:`MockSystems`."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise TfhybridInputError(f"mock file {path} does not exist (make one: tfhybrid lens mock)")
    try:
        with fits.open(path, memmap=False) as hdul:
            h = hdul[0].header
            if h.get("FORMAT") != _FORMAT:
                raise TfhybridInputError(
                    f"{path} is not a tfhybrid mock (FORMAT={h.get('FORMAT')!r}, expected "
                    f"{_FORMAT!r})"
                )
            params = {name: np.array([float(h[FITS_KEYS[name]])]) for name in PARAM_NAMES}
            config = LensingConfig(
                n_pix=int(h["NPIX"]), pixel_scale_arcsec=float(h["PIXSCALE"]),
                psf_sigma_arcsec=float(h["PSFSIG"]) or None, deflection=str(h["DEFLECT"]),
            )
            n_images = np.array([int(h["NIMAGES"])]) if "NIMAGES" in h else None
            noiseless = np.asarray(hdul[0].data, dtype=np.float32)[None]
            source = np.asarray(hdul["SOURCE"].data, dtype=np.float32)[None]
            psf_image = None
            if h.get("PSFIMAGE", False):
                psf_image = np.asarray(hdul["PSF"].data, dtype=np.float64)
            observed, sigmas, snr = {}, {}, {}
            for hdu in hdul[2:]:
                if "LEVEL" not in hdu.header:  # the PSF
                    continue
                level = str(hdu.header["LEVEL"])
                observed[level] = np.asarray(hdu.data, dtype=np.float32)[None]
                sigmas[level] = float(hdu.header["NOISE"])
                snr[level] = np.array([float(hdu.header["SNR"])])
    except TfhybridInputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise TfhybridInputError(f"cannot read mock file {path}: {err}") from err
    return MockSystems(params, source, noiseless, observed, sigmas, snr, config, n_images,
                       psf_image)
