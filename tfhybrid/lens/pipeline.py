"""End-to-end lensing runs: mock → MAP → posterior → figures, tables and files.

The functions here are what ``tfhybrid lens …`` and ``tfhybrid demo`` call; they are usable
from a notebook as well. All outputs are written atomically.

Outputs of :func:`write_fit_outputs` in ``out_dir``: ``map.json`` (MAP parameters and z per
system, log posterior, optimiser message, wall time), ``map_model.fits`` (model images and
MAP sources), ``fig_map.png`` (Fig. 6/7 layout), ``fig_loss.png``, and ``map_hessian.npy`` (the
Hessian at the MAP, when the fit has one; ``map.json`` records its SHA-256, and
:func:`load_map_hessian` gives it to the sampler, which then need not evaluate it again).
For fits of observed images, :func:`write_observed_model_fits` adds ``<image>_map.fits``: the
MAP model in the image's own units and WCS, and the normalised residual.
Outputs of :func:`write_sample_outputs`: ``samples.npz`` (draws of every parameter),
``posterior.nc`` (ArviZ InferenceData), ``fig_posterior.png`` (Fig. 8/9 layout),
``table.txt`` (true / MAP / mean ± std / per cent error) and ``summary.json``; with
sandwich-adjusted draws (:func:`tfhybrid.lens.robust.sandwich_adjusted_samples`), also
``samples_adjusted.npz``, their intervals in the table and the summary, and for one system
their marginals beside the posterior's in the figure.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tfhybrid.io import atomic_path, savefig_atomic, write_json_atomic
from tfhybrid.lens.defaults import (
    DEFAULT_COARSE_STARTS,
    DEFAULT_MAP_STEPS,
    DEFAULT_NEWTON_ITER,
    DEFAULT_NUM_STARTS,
    DEFAULT_RESIDUAL_PIXEL_FACTOR,
    DEFAULT_SOURCE_RESIDUAL_GRID,
)
from tfhybrid.lens.fit import (
    LensMap,
    LensSamples,
    coverage,
    equivalent_truth,
    fit_map,
    format_table,
    parameter_table,
    sample_lens_posterior,
    with_derived,
)
from tfhybrid.lens.mocks import MockSystems, make_mocks, parameter_cards, write_mock_fits
from tfhybrid.lens.model import LensPosterior
from tfhybrid.lens.robust import sandwich_adjusted_samples, sandwich_intervals
from tfhybrid.physics.lensing import PARAM_NAMES, source_surface_brightness
from tfhybrid.physics.source_residual import SourceResidualConfig
from tfhybrid.validation import TfhybridInputError

__all__ = [
    "source_plane_grid",
    "evaluate_source",
    "write_fit_outputs",
    "robust_summary",
    "samples_to_arviz",
    "write_sample_outputs",
    "load_map_json",
    "load_map_hessian",
    "posterior_of_map",
    "run_demo",
]

_DISPLAY = {"r_ein": "r_Ein [″]", "gamma": "γ", "phi": "φ [rad]", "q": "q"}


def source_plane_grid(half_width_arcsec: float = 2.5, n: int = 96):
    """(β₁, β₂) of an ``n × n`` source-plane grid over ±``half_width_arcsec``, axis order (y, x)."""
    c = (np.arange(n) - 0.5 * (n - 1)) * (2.0 * half_width_arcsec / n)
    b2, b1 = np.meshgrid(c, c, indexing="ij")
    return b1, b2


def evaluate_source(images, params: Mapping, grid) -> np.ndarray:
    """Eq. 17 of each system's source on a common source-plane grid: ``(S, n, n)``."""
    images = np.asarray(images, dtype=np.float32)
    s = images.shape[0]
    b1 = np.broadcast_to(grid[0], (s,) + grid[0].shape).astype(np.float32)
    b2 = np.broadcast_to(grid[1], (s,) + grid[1].shape).astype(np.float32)
    args = [np.asarray(params[k], dtype=np.float32).reshape(s)
            for k in ("theta_src1", "theta_src2", "s", "iota")]
    return source_surface_brightness(images, b1, b2, *args).numpy()


def _map_dict(fit: LensMap) -> dict:
    return dict(
        params={k: np.asarray(v).tolist() for k, v in fit.params.items()},
        z=np.asarray(fit.z).tolist(),
        log_prob=np.asarray(fit.log_prob).tolist(),
        best_start=np.asarray(fit.best_start).tolist(),
        scale_jump=None if fit.scale_jump is None else np.asarray(fit.scale_jump).tolist(),
        converged=np.asarray(fit.result.converged).tolist(),
        message=fit.message,
        num_steps=int(fit.result.num_steps),
        wall_time_s=float(fit.wall_time_s),
        stage_seconds={k: float(v) for k, v in fit.stage_seconds.items()},
        source_residual=(None if fit.source_residual is None
                         else dataclasses.asdict(fit.source_residual)),
        residual_sigma=(None if fit.residual_sigma is None
                        else np.asarray(fit.residual_sigma).tolist()),
        residual_gain=(None if fit.residual_gain is None
                       else np.asarray(fit.residual_gain).tolist()),
    )


def posterior_of_map(posterior: LensPosterior, data: dict) -> LensPosterior:
    """``posterior`` with the source residual a loaded ``map.json`` was fitted under (if any)."""
    if data.get("source_residual") is None:
        return posterior
    try:
        config = SourceResidualConfig(**data["source_residual"])
        sigma = np.asarray(data["residual_sigma"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TfhybridInputError(f"map.json has a malformed source_residual: {err}") from err
    return posterior.with_source_residual(config, sigma)


def load_map_json(path) -> dict:
    """Read ``map.json``: dict with ``params`` (name → (S,)), ``z`` (S, d), …"""
    path = Path(path)
    if not path.is_file():
        raise TfhybridInputError(f"MAP file {path} does not exist (run: tfhybrid lens fit)")
    try:
        data = json.loads(path.read_text())
        params = {k: np.asarray(data["params"][k], dtype=np.float64) for k in PARAM_NAMES}
        z = np.asarray(data["z"], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as err:
        raise TfhybridInputError(f"{path} is not a tfhybrid map.json: {err}") from err
    data["params"], data["z"] = params, z
    return data


#: Where :func:`write_fit_outputs` keeps the Hessian at the MAP, next to ``map.json``.
MAP_HESSIAN_FILE = "map_hessian.npy"


def _hessian_digest(hessian: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(hessian, np.float64).tobytes()).hexdigest()


def load_map_hessian(map_json, data: dict) -> np.ndarray | None:
    """The Hessian :func:`write_fit_outputs` saved with ``map_json`` (``data``: that file, as
    :func:`load_map_json` read it), or None when it has none, the file is missing or unreadable,
    or its SHA-256 is not the one ``map.json`` records (a Hessian from another fit)."""
    digest = data.get("hessian_sha256")
    path = Path(map_json).parent / MAP_HESSIAN_FILE
    if not digest or not path.is_file():
        return None
    try:
        hessian = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if hessian.dtype != np.float64 or _hessian_digest(hessian) != digest:
        return None
    return hessian


def write_observed_model_fits(out_dir, posterior: LensPosterior, fit: LensMap, images,
                              scales) -> list[Path]:
    """For fits of observed images: ``OUT/<image stem>_map.fits`` per image (``NNN_<stem>``
    when two images share a name), in the image's own units and WCS, to compare with it pixel
    by pixel (e.g. in DS9).

    Primary HDU: the MAP model image times the image's flux scale (``FLUXSCAL``), with the
    input's celestial WCS (or its ``PIXSCALE``), ``BUNIT`` and the MAP parameters
    (``R_EIN``, ``GAMMA``, … as in the mock files); ``RESIDUAL``: (observed − model) / σ per
    pixel, NaN where the noise map masks the pixel.

    ``images``: the :class:`tfhybrid.lens.observations.LensImage` of each system;
    ``scales``: the divisor each was brought to the model's units with.
    """
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS

    state = fit.state()
    model = posterior.predict(dict(zip(PARAM_NAMES, state[:-1], strict=True)),
                              state[-1]).numpy().astype(np.float64)
    noise = posterior.noise_map
    with np.errstate(invalid="ignore"):
        residual = np.where(np.isfinite(noise),
                            (posterior.observed_images - model) / noise, np.nan)
    stems = [Path(image.path).stem for image in images]
    if len(set(stems)) < len(stems):  # images of one name from several directories
        stems = [f"{i:03d}_{stem}" for i, stem in enumerate(stems)]
    paths = []
    for i, (image, scale) in enumerate(zip(images, scales, strict=True)):
        primary = fits.PrimaryHDU((model[i] * scale).astype(np.float32))
        h = primary.header
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FITSFixedWarning about dates or RADESYS
            wcs = WCS(image.header)
        if wcs.has_celestial:
            h.update(wcs.celestial.to_header())
        h["PIXSCALE"] = (image.pixel_scale_arcsec, "[arcsec] pixel side")
        if "BUNIT" in image.header:
            h["BUNIT"] = image.header["BUNIT"]
        h["FLUXSCAL"] = (float(scale), "model units -> these: the input's divisor")
        h["IMAGE"] = (Path(image.path).name, "the fitted image")
        h.extend(parameter_cards(fit.params, i))
        h["COMMENT"] = "MAP model of the lensed source (tfhybrid lens fit)"
        resid = fits.ImageHDU(residual[i].astype(np.float32), header=wcs.celestial.to_header()
                              if wcs.has_celestial else None, name="RESIDUAL")
        resid.header["COMMENT"] = "(observed - model) / sigma; NaN where masked"
        path = Path(out_dir) / f"{stems[i]}_map.fits"
        with atomic_path(path) as tmp:
            fits.HDUList([primary, resid]).writeto(tmp, overwrite=True)
        paths.append(path)
    return paths


def write_fit_outputs(out_dir, posterior: LensPosterior, fit: LensMap,
                      mocks: MockSystems | None = None, labels: Sequence[str] | None = None,
                      observed=None, robust=None) -> dict:
    """Write the MAP outputs (see the module docstring); return paths and headline numbers.

    ``robust``: :class:`tfhybrid.lens.robust.RobustIntervals` at the MAP, recorded in
    ``map_summary.json`` (``robust``: block size, sandwich sd and inflation per parameter)
    and in the table's ``*_robust`` columns."""
    from astropy.io import fits

    from tfhybrid.plotting.lens import loss_trace_figure, map_reconstruction_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = fit.state()
    model = posterior.predict(dict(zip(PARAM_NAMES, state[:-1], strict=True)), state[-1]).numpy()
    fit_src = posterior.source_images(state[-1]).numpy()
    map_record = _map_dict(fit)
    map_record["hessian_sha256"] = None
    if fit.hessian is not None:  # first, so that map.json never names a Hessian not written
        hessian = np.ascontiguousarray(fit.hessian, np.float64)
        with atomic_path(out / MAP_HESSIAN_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, hessian)
        map_record["hessian_sha256"] = _hessian_digest(hessian)
    write_json_atomic(out / "map.json", map_record)
    hdus = fits.HDUList([fits.PrimaryHDU(model.astype(np.float32)),
                         fits.ImageHDU(fit_src.astype(np.float32), name="SOURCE")])
    hdus[0].header["COMMENT"] = "MAP model images (S, n, n) and MAP decoded sources d(z)"
    with atomic_path(out / "map_model.fits") as tmp:
        hdus.writeto(tmp, overwrite=True)
    obs = posterior.observed_images if observed is None else np.asarray(observed)
    grid = source_plane_grid()
    fit_plane = evaluate_source(fit_src, fit.params, grid)
    true_plane = evaluate_source(mocks.sources, mocks.params, grid) if mocks is not None else None
    rows = []
    noise = posterior.noise_map
    masked = ~np.isfinite(noise)  # drawn blank
    for i in range(len(fit.log_prob)):
        label = labels[i] if labels is not None else f"system {i}"
        sigma_i = (np.where(masked[i], np.nan, noise[i]) if posterior.has_noise_map
                   else float(posterior.noise_sigma[i]))
        rows.append(dict(
            observed=np.where(masked[i], np.nan, obs[i]), model=model[i], noise_sigma=sigma_i,
            true_source=true_plane[i] if true_plane is not None else fit_plane[i],
            fit_source=fit_plane[i], label=label,
        ))
    ext = (grid[0].min(), grid[0].max(), grid[1].min(), grid[1].max())
    fig = map_reconstruction_figure(rows, source_extent_arcsec=ext)
    savefig_atomic(fig, out / "fig_map.png", dpi=90)
    fig = loss_trace_figure(fit.result.loss_trace.reshape(fit.result.loss_trace.shape[0], -1))
    savefig_atomic(fig, out / "fig_loss.png", dpi=90)
    # over the unmasked pixels
    chi2 = (np.sum((model - obs) ** 2 * posterior.inverse_variance, axis=(-2, -1))
            / np.sum(~masked, axis=(-2, -1)))
    summary = dict(chi2_per_pixel=chi2.tolist(), wall_time_s=fit.wall_time_s)
    if robust is not None:
        summary["robust"] = robust_summary(robust)
    # without mocks (observed images), the MAP and its robust intervals, no truth columns
    rows_t = parameter_table(mocks.params if mocks is not None else None, fit, robust=robust)
    summary["table"] = rows_t
    with atomic_path(out / "map_table.txt") as tmp:
        tmp.write_text(format_table(rows_t) + "\n")
    write_json_atomic(out / "map_summary.json", summary)
    return summary


def robust_summary(robust) -> dict:
    """JSON-ready record of :class:`tfhybrid.lens.robust.RobustIntervals`."""
    return dict(block_size=robust.block_size,
                sd={k: np.asarray(v).tolist() for k, v in robust.sd.items()},
                laplace_sd={k: np.asarray(v).tolist() for k, v in robust.laplace_sd.items()},
                inflation={k: np.asarray(v).tolist() for k, v in robust.inflation().items()})


def samples_to_arviz(samples: LensSamples):
    """ArviZ ``InferenceData`` of the physical parameters and ``z`` (dims chain, draw, system).

    The sampler runs in whitened coordinates (:func:`tfhybrid.lens.fit.sample_lens_posterior`);
    this holds the draws mapped back to the paper's parameters, with the sampler's statistics.
    """
    import arviz as az

    def cd(x):
        return np.swapaxes(np.asarray(x), 0, 1)  # (draw, chain, ...) -> (chain, draw, ...)

    posterior = {k: cd(v) for k, v in with_derived(samples.params).items()}  # + theta_e
    posterior["z"] = cd(samples.z)
    trace = samples.result.trace
    stats = {}
    for key, name in (("diverging", "diverging"), ("accept_ratio", "acceptance_rate"),
                      ("target_log_prob", "lp")):
        if key in trace and np.ndim(trace[key]) >= 2:
            stats[name] = cd(trace[key])
    dims = {k: ["system"] for k in posterior if k != "z"} | {"z": ["system", "latent"]}
    dims |= {k: ["system"] for k in stats if np.ndim(stats[k]) == 3}
    return az.from_dict(posterior=posterior, sample_stats=stats, dims=dims)


def write_sample_outputs(out_dir, samples: LensSamples, fit: LensMap | None = None,
                         truth: Mapping | None = None, labels: Sequence[str] | None = None,
                         posterior: LensPosterior | None = None,
                         adjusted: LensSamples | None = None) -> dict:
    """Write the posterior outputs (see the module docstring); return the summary dict.

    ``adjusted``: the draws of :func:`tfhybrid.lens.robust.sandwich_adjusted_samples`
    (model-robust widths), written to ``samples_adjusted.npz``; the summary gains
    ``std_adjusted`` (and ``coverage_68_adjusted`` with ``truth``), the table's rows
    ``std_adjusted``, ``lo68_adjusted``, ``hi68_adjusted`` and ``covered_68_adjusted``.

    With both ``fit`` and ``posterior``, the summary has ``mode_gap`` (:meth:`LensSamples.
    mode_gap`, per system) and ``above_map_systems``: the systems whose draws reached a higher
    log p than their MAP, whose MAP was therefore a local optimum and whose chain may still be
    moving.
    """
    from tfhybrid.inference.diagnostics import save_netcdf
    from tfhybrid.plotting.lens import posterior_corner_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "samples.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, z=samples.z, **samples.params)
    if adjusted is not None:
        with atomic_path(out / "samples_adjusted.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **adjusted.params)
    res = samples.result
    save_netcdf(samples_to_arviz(samples), out / "posterior.nc")
    s = next(iter(samples.params.values())).shape[-1]
    names = ("r_ein", "gamma", "phi")
    chains = [{k: samples.params[k][..., i].ravel() for k in names} for i in range(s)]
    mean = samples.mean()
    truths = ({k: float(equivalent_truth(k, np.asarray(truth[k])[0], mean[k][0])) for k in names}
              if truth is not None and s == 1 else None)  # φ: the branch nearest the draws
    fig_labels = list(labels) if labels else None
    if adjusted is not None and s == 1:  # one system: its sandwich-adjusted draws beside
        chains.append({k: adjusted.params[k][..., 0].ravel() for k in names})
        fig_labels = (fig_labels or ["posterior"]) + ["sandwich-adjusted draws"]
    fig = posterior_corner_figure(chains, names, truths=truths, labels=fig_labels,
                                  display_names=_DISPLAY)
    savefig_atomic(fig, out / "fig_posterior.png", dpi=90)
    diag = res.diagnostics
    ess = samples.ess()
    summary = dict(
        kernel=res.kernel, wall_time_s=res.wall_time_s,
        # the whole chain's sampling time, chunks resumed from disk included
        total_sampling_s=res.total_sampling_s, acceptance_rate=diag["acceptance_rate"],
        num_divergences=diag["num_divergences"], min_ess=diag["min_ess"],
        max_r_hat=diag["max_r_hat"], step_size=float(np.asarray(res.step_size).ravel()[0]),
        num_gradient_evaluations=res.num_gradient_evaluations,
        # the pilot chain that re-whitened the sampler (its time is not in wall_time_s)
        pilot_draws=(0 if samples.pilot is None
                     else int(np.asarray(samples.pilot.samples[0]).shape[0])),
        pilot_sampling_s=(0.0 if samples.pilot is None
                          else float(samples.pilot.total_sampling_s)),
        mean={k: v.tolist() for k, v in mean.items()},
        std={k: v.tolist() for k, v in samples.std().items()},
        ess={k: v.tolist() for k, v in ess.items()},
        low_ess_systems=samples.low_ess_systems(ess=ess),
    )
    if adjusted is not None:
        summary["std_adjusted"] = {k: v.tolist() for k, v in adjusted.std().items()}
    if fit is not None and posterior is not None:
        gap = samples.mode_gap(posterior, fit.log_prob)
        summary["mode_gap"] = gap.tolist()
        summary["above_map_systems"] = np.flatnonzero(gap > 0).tolist()
    if fit is not None:
        rows = parameter_table(truth, fit, samples, adjusted=adjusted)
        summary["table"] = rows
        with atomic_path(out / "table.txt") as tmp:
            tmp.write_text(format_table(rows) + "\n")
    if truth is not None:
        summary["coverage_68"] = coverage(truth, samples, 0.68)
        if adjusted is not None:
            summary["coverage_68_adjusted"] = coverage(truth, adjusted, 0.68)
    write_json_atomic(out / "summary.json", summary)
    return summary


def run_demo(out_dir, seed: int = 0, map_steps: int = DEFAULT_MAP_STEPS, num_results: int = 150,
             num_burnin: int = 50, num_starts: int = DEFAULT_NUM_STARTS, progress: bool = True,
             coarse_starts: int = DEFAULT_COARSE_STARTS,
             newton_iter: int = DEFAULT_NEWTON_ITER,
             source_residual: int = DEFAULT_SOURCE_RESIDUAL_GRID) -> dict:
    """The package's main job on the shipped defaults: one mock, MAP, a short HMC run.

    One held-out simulated galaxy lensed by a prior-drawn SPLE + shear lens at the paper's high
    S/N (σ = 0.0333), fitted with the shipped VAE source model: a coarse-grid global search
    (``coarse_starts``), multi-start Adam MAP at full resolution, ``newton_iter`` Newton
    steps and whitened L-BFGS (:func:`tfhybrid.lens.fit.newton_polish`), with a
    ``source_residual`` × ``source_residual`` source-plane residual integrated out after it
    (0: none; :func:`tfhybrid.lens.fit.polish_with_source_residual`), the model-robust
    (sandwich) intervals at the MAP (:mod:`tfhybrid.lens.robust`), then
    ``num_burnin`` adaptation steps and ``num_results`` HMC draws from the MAP, and those
    draws with the sandwich covariance (:func:`tfhybrid.lens.robust.sandwich_adjusted_samples`).
    Writes the mock FITS, the MAP and posterior outputs and ``demo_summary.json``; returns the
    summary.
    """
    from tfhybrid.priors.vae import load_default_vae

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vae = load_default_vae()
    mocks = make_mocks(1, seed=seed, noise_levels=("high",), min_snr_high=300.0)
    write_mock_fits(mocks, out, overwrite=True)
    posterior = LensPosterior(mocks.observed["high"], mocks.noise_sigma["high"], vae,
                              psf_image=mocks.psf_image)
    residual = (SourceResidualConfig(int(source_residual), DEFAULT_RESIDUAL_PIXEL_FACTOR)
                if source_residual else None)
    fit = fit_map(posterior, num_starts=num_starts, num_steps=map_steps, seed=seed,
                  progress=progress, coarse_starts=coarse_starts, newton_iter=newton_iter,
                  source_residual=residual)
    label = f"high S/N (σ={mocks.noise_sigma['high']:g}, S/N={mocks.snr['high'][0]:.0f})"
    robust = sandwich_intervals(posterior, fit.state())
    map_summary = write_fit_outputs(out, posterior, fit, mocks, labels=[label], robust=robust)
    samples = sample_lens_posterior(posterior, fit, num_results=num_results,
                                    num_burnin=num_burnin, seed=seed, progress=progress,
                                    checkpoint_dir=out / "hmc_chunks")
    sampled = fit.posterior_of(posterior)
    adjusted = sandwich_adjusted_samples(samples, robust, sampled)
    post_summary = write_sample_outputs(out, samples, fit, mocks.params, labels=[label],
                                        posterior=sampled, adjusted=adjusted)
    truth = {k: float(v) for k, v in
             with_derived({k: mocks.params[k][0] for k in PARAM_NAMES}).items()}
    summary = dict(
        truth=truth,
        map={k: float(v) for k, v in
             with_derived({k: fit.params[k][0] for k in PARAM_NAMES}).items()},
        posterior_mean={k: v[0] for k, v in post_summary["mean"].items()},
        posterior_std={k: v[0] for k, v in post_summary["std"].items()},
        # the model-robust (sandwich) standard deviation at the MAP (tfhybrid.lens.robust)
        robust_std={k: float(v[0]) for k, v in robust.sd.items()},
        # the HMC draws with the sandwich covariance (tfhybrid.lens.robust, Shaby 2014)
        adjusted_std={k: v[0] for k, v in post_summary["std_adjusted"].items()},
        snr=float(mocks.snr["high"][0]),
        chi2_per_pixel=map_summary["chi2_per_pixel"][0],
        map_wall_time_s=fit.wall_time_s,
        hmc_wall_time_s=post_summary["wall_time_s"],
        total_wall_time_s=time.perf_counter() - t0,
        hmc=dict((k, post_summary[k]) for k in ("acceptance_rate", "num_divergences",
                                                 "min_ess", "max_r_hat", "mode_gap"))
        | dict(ess={k: v[0] for k, v in post_summary["ess"].items()}),
    )
    write_json_atomic(out / "demo_summary.json", summary)
    return summary
