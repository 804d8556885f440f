"""Figures and numbers for the shipped VAE source model (Chianese et al. 2020, section 2.3).

Held-out set: simulated galaxies NOT used in training (seed ``--seed``, distinct from the
training data's), put through the lensing paper's preprocessing (S/N cut 15-50 on the 0.03″
stamp, flux-conserving 2× downscale to 64 × 64, division by the noisy image's peak) with the
noiseless image kept and divided by the same peak, so each test image has a known truth and a
known per-image noise sigma (the training noise of that image).

1. ``vae_reconstructions.png`` (like Fig. 2): inputs (top) and reconstructions
   ``mu_d(z), z ~ e(z|x)`` (bottom) for 8 held-out images.
2. ``vae_rotations.png`` (like Fig. 3): one held-out galaxy rotated counter-clockwise by
   0-315°, new pixels filled with the known noise; reconstructions; derotated reconstructions.
3. ``vae_metrics.json``: for all held-out images,
   * mean normalised residual ``<(x - x̂) / sigma>`` and its RMS (chi per pixel), x̂ the
     mean-latent reconstruction ``mu_d(mu_e(x))``;
   * derotated-reconstruction spread: pixel-wise standard deviation over the 8 rotations of the
     derotated reconstructions, averaged inside the inscribed circle (r < 28 px), in units of
     the image peak and of the noise sigma, over ``--n-rot`` galaxies; the same for the
     derotated *inputs* for scale;
   * held-out reconstruction error against the noiseless truth, ``chi2_truth = mean((x̂ -
     truth)^2 / sigma^2)`` per pixel, for the VAE, for the noisy input itself (≈ 1) and for the
     best Gaussian blur of the input (sigma chosen on these same images, which favours the
     baseline); ``vae`` is the mean-latent reconstruction, ``vae_latent_map`` the one the
     lensing model uses, ``mu_d`` of the MAP latent ``argmax_z log N(x | mu_d(z), sigma) +
     log p(z)`` (``GalaxyVAE.fit_latent``).

    nice -n 10 python scripts/vae_figures.py --out figures/
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ANGLES_DEG = (0, 45, 90, 135, 180, 225, 270, 315)
ROT_RADIUS_PX = 28.0
BLUR_SIGMAS_PX = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def held_out_set(n_stamps: int, seed: int, central_third: bool = False):
    """(noisy, truth, sigma) of simulated galaxies through the lensing preprocessing.

    ``central_third``: for a VAE trained on galaxies zoomed to fill the central third
    (``train_default_vae.py --central-third``), each truth is zoomed likewise
    (``rescale_to_central_third``, peak 1) and the noisy image is that truth plus fresh white
    noise of the image's sigma (seeded by ``seed``).
    """
    import numpy as np

    from tfhybrid.data.preprocess import (
        LENSING_SNR_RANGE,
        downscale,
        downscaled_noise_sigma,
        rescale_to_central_third,
        snr_cut_mask,
    )
    from tfhybrid.data.simulate import simulate_galaxy_stamps

    stamps = simulate_galaxy_stamps(n_stamps, seed, stamp_size=128, keep_noiseless=True)
    keep = snr_cut_mask(stamps.images, stamps.noise_sigma, *LENSING_SNR_RANGE)
    noisy = downscale(stamps.images[keep].astype(np.float64), 64)
    truth = downscale(stamps.noiseless[keep].astype(np.float64), 64)
    peak = noisy.max(axis=(1, 2))
    sigma = downscaled_noise_sigma(stamps.noise_sigma[keep], 128, 64) / peak
    if central_third:
        truth = np.stack([rescale_to_central_third(t) for t in truth]).astype(np.float64)
        rng = np.random.default_rng(seed)
        noisy = truth + sigma[:, None, None] * rng.standard_normal(truth.shape)
        peak = np.ones(len(truth))
    return (
        (noisy / peak[:, None, None]).astype(np.float32),
        (truth / peak[:, None, None]).astype(np.float32),
        sigma.astype(np.float32),
    )


def rotate(image, angle_deg: float, fill=None, rng=None):
    """Rotate counter-clockwise (axes y, x, y up in the displayed image) about the centre.

    Pixels coming from outside the stamp are filled with ``fill`` noise (N(0, fill)) or 0.
    """
    import numpy as np
    from scipy import ndimage

    out = ndimage.rotate(image, angle_deg, reshape=False, order=1, mode="constant", cval=np.nan)
    outside = ~np.isfinite(out)
    out[outside] = rng.normal(0, fill, outside.sum()) if fill is not None else 0.0
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--model", default=None, help="saved VAE directory (default: shipped)")
    parser.add_argument("--n-stamps", type=int, default=800, help="simulated before the S/N cut")
    parser.add_argument("--n-rot", type=int, default=16, help="galaxies in the rotation spread")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--central-third", action="store_true",
                        help="zoom the held-out galaxies to fill the central third (default: "
                             "only for a VAE trained that way, per its config.json)")
    parser.add_argument("--latent-steps", type=int, default=300,
                        help="Adam steps of the latent MAP reconstruction")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import ndimage

    from tfhybrid.io import savefig_atomic, write_json_atomic
    from tfhybrid.priors.vae import default_vae_path, load_default_vae, load_vae, read_vae_config

    t0 = time.time()
    model = load_vae(args.model) if args.model else load_default_vae()
    _, metadata = read_vae_config(args.model or default_vae_path())
    central_third = args.central_third or bool(metadata.get("central_third", False))
    noisy, truth, sigma = held_out_set(args.n_stamps, args.seed, central_third)
    if central_third:
        print("the VAE was trained on galaxies zoomed to the central third: so are these",
              flush=True)
    n = len(noisy)
    print(f"held-out set: {n} images ({time.time() - t0:.0f} s)", flush=True)
    out = Path(args.out)

    recon = np.concatenate([model(noisy[i : i + 128]).numpy() for i in range(0, n, 128)])
    s = sigma[:, None, None]
    norm_resid = (noisy - recon) / s
    # The lensing model fits z to the data under the latent prior (eq. 26): reconstruct the
    # same way, z_MAP = argmax log N(x | mu_d(z), sigma) + log p(z), from the encoder means.
    z_map = model.fit_latent(noisy, sigma, num_steps=args.latent_steps)
    recon_map = model.decode(z_map).numpy()
    chi2_truth = {
        "vae": float(np.mean(((recon - truth) / s) ** 2)),
        "vae_latent_map": float(np.mean(((recon_map - truth) / s) ** 2)),
        "noisy_input": float(np.mean(((noisy - truth) / s) ** 2)),
    }
    blur = {}
    for b in BLUR_SIGMAS_PX:
        blurred = ndimage.gaussian_filter(noisy, (0, b, b), mode="constant")
        blur[b] = float(np.mean(((blurred - truth) / s) ** 2))
    best_blur = min(blur, key=blur.get)
    chi2_truth["best_blur"] = blur[best_blur]
    mse_truth = {
        "vae": float(np.mean((recon - truth) ** 2)),
        "vae_latent_map": float(np.mean((recon_map - truth) ** 2)),
        "best_blur": float(
            np.mean(
                (ndimage.gaussian_filter(noisy, (0, best_blur, best_blur), mode="constant") - truth)
                ** 2
            )
        ),
    }

    # Fig. 2: sampled-latent reconstructions, as in the paper's caption.
    show = np.arange(min(8, n))
    sampled = model.reconstruct(noisy[show], sample=True, seed=1).numpy()
    fig, axes = plt.subplots(2, len(show), figsize=(2 * len(show), 4.3))
    for j, k in enumerate(show):
        vmax = noisy[k].max()
        for row, img in enumerate((noisy[k], sampled[j])):
            axes[row, j].imshow(img, origin="lower", cmap="inferno", vmin=-0.05, vmax=vmax)
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstruction")
    fig.suptitle("Held-out simulated galaxies and VAE reconstructions (z ~ e(z|x))")
    fig.tight_layout()
    savefig_atomic(fig, out / "vae_reconstructions.png", dpi=100)
    plt.close(fig)

    # Fig. 3: rotations; spread over n_rot galaxies.
    rng = np.random.default_rng(args.seed)
    yy, xx = np.mgrid[:64, :64] - 31.5
    inside = np.hypot(yy, xx) < ROT_RADIUS_PX
    spreads, spreads_in, spreads_sigma = [], [], []
    example, example_area = None, -1
    for k in range(min(args.n_rot, n)):
        rotated = np.stack([rotate(noisy[k], a, sigma[k], rng) for a in ANGLES_DEG])
        rotated = rotated / rotated.max(axis=(1, 2), keepdims=True)  # keep the peak-1 convention
        rec = model(rotated.astype(np.float32)).numpy()
        derot = np.stack([rotate(r, -a) for r, a in zip(rec, ANGLES_DEG, strict=True)])
        derot_in = np.stack([rotate(r, -a) for r, a in zip(rotated, ANGLES_DEG, strict=True)])
        spreads.append(float(derot.std(axis=0)[inside].mean()))
        spreads_in.append(float(derot_in.std(axis=0)[inside].mean()))
        spreads_sigma.append(spreads[-1] / float(sigma[k]))
        area = int(np.sum(noisy[k] > 0.1))  # show the most extended galaxy of the set
        if area > example_area:
            example, example_area = (rotated, rec, derot), area
    fig, axes = plt.subplots(3, len(ANGLES_DEG), figsize=(2 * len(ANGLES_DEG), 6.4))
    for j, a in enumerate(ANGLES_DEG):
        for row, label in enumerate(("input", "reconstruction", "derotated")):
            axes[row, j].imshow(
                example[row][j], origin="lower", cmap="inferno", vmin=-0.05, vmax=1.0
            )
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
            if j == 0:
                axes[row, j].set_ylabel(label)
        axes[0, j].set_title(f"{a}°")
    fig.suptitle("Approximate rotational equivariance of VAE reconstructions (same colour scale)")
    fig.tight_layout()
    savefig_atomic(fig, out / "vae_rotations.png", dpi=100)
    plt.close(fig)

    metrics = {
        "n_held_out": n,
        "held_out_seed": args.seed,
        "central_third": central_third,
        "noise_sigma_median": float(np.median(sigma)),
        "mean_normalised_residual": float(norm_resid.mean()),
        "rms_normalised_residual": float(np.sqrt(np.mean(norm_resid**2))),
        "chi2_per_pixel_vs_truth": chi2_truth,
        "mse_vs_truth": mse_truth,
        "best_blur_sigma_px": best_blur,
        "blur_scan_chi2_vs_truth": {str(k): v for k, v in blur.items()},
        "derotated_reconstruction_spread_peak_units": float(np.mean(spreads)),
        "derotated_reconstruction_spread_noise_units": float(np.mean(spreads_sigma)),
        "derotated_input_spread_peak_units": float(np.mean(spreads_in)),
        "n_rotation_galaxies": len(spreads),
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(out / "vae_metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
