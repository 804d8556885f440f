"""Figures and numbers for the shipped PixelCNN++ prior (seeded; ~3 min on 2 CPU cores).

1. ``pixelcnn_samples.png``: prior samples next to real (peak-normalised, training-noise)
   training stamps.
2. The deblending paper's Fig. 2 effect (000_*, §3): for ``--n-pairs`` pairs of held-out
   isolated galaxies (g1, g2), the artificial blend ``b = g1 + shift(g2, offset)`` (offset of
   4-8 px in a random direction, zero-filled; ``make_artificial_blends``) should have a lower
   log-likelihood than either isolated galaxy. Fair normalisation: all three stamps are put
   in the prior's convention -- each divided by its own peak, exactly what the deblender's
   ``max S_k = 1`` projection feeds the prior -- and each receives an independent draw of the
   training noise (sigma = config.noise_sigma in peak units), so every stamp is a valid input
   of the same scale and the same number of pixels, and the comparison is of total log p
   (equivalently NLL per pixel). Because a blend also simply covers more pixels than one
   galaxy (and every non-background pixel costs likelihood), a second, stricter control
   compares each blend with the 5 held-out isolated galaxies (not its own components) whose
   footprint (pixels above 5 % of the peak) is closest to the blend's. Writes
   ``pixelcnn_blend_test.json`` and ``pixelcnn_blend_test.png`` (one example + histogram of
   log p(blend) - min log p(isolated)).
3. The held-out NLL per pixel of the prior and of a diagonal Gaussian fitted to the training
   stamps (both on the same noised held-out stamps), into the same JSON.

    nice -n 10 python scripts/pixelcnn_figures.py --out figures/
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--n-pairs", type=int, default=200)
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--data-cache",
        default="/tmp/tfhybrid_pixelcnn_data.npz",
        help="npz written by train_default_pixelcnn.py (else re-simulated)",
    )
    parser.add_argument("--model-dir", default=None, help="default: the shipped prior")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tfhybrid.io import savefig_atomic, write_json_atomic
    from tfhybrid.priors.pixelcnn import (
        add_training_noise,
        diagonal_gaussian_baseline,
        load_default_pixelcnn,
        load_pixelcnn,
        make_artificial_blends,
        make_pixelcnn_training_set,
    )

    model = load_pixelcnn(args.model_dir) if args.model_dir else load_default_pixelcnn()
    meta = getattr(model, "metadata", {})
    cfg = model.config
    seed0 = int(meta.get("seed", 2019))
    cache = Path(args.data_cache)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as d:
            train, test = d["train"], d["test"]
    else:
        train = make_pixelcnn_training_set(512, seed0, cfg)  # for the baseline and figure
        test = make_pixelcnn_training_set(2 * args.n_pairs, seed0 + 2, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sigma = cfg.noise_sigma

    # --- Fig. 2 effect ------------------------------------------------------------------
    def log_prob(a):
        return np.concatenate(
            [model.log_prob(a[i : i + 64]).numpy() for i in range(0, len(a), 64)]
        )

    g1, g2, blend, own, _ = make_artificial_blends(test, args.n_pairs, args.seed)
    noisy = [add_training_noise(a, sigma, args.seed + k) for k, a in enumerate((g1, g2, blend))]
    t0 = time.time()
    lp1, lp2, lpb = (log_prob(a) for a in noisy)
    lower = (lpb < lp1) & (lpb < lp2)
    npix = cfg.image_size**2

    # stricter control: isolated galaxies with the blend's footprint (see module docstring)
    pool = add_training_noise(test, sigma, args.seed + 10)
    lp_pool = log_prob(pool)
    area_pool = (test > 0.05).sum(axis=(1, 2))
    area_blend = (blend > 0.05).sum(axis=(1, 2))
    matched = np.empty(args.n_pairs)
    for k in range(args.n_pairs):
        dist = np.abs(area_pool - area_blend[k]).astype(float)
        dist[own[k]] = np.inf
        matched[k] = np.median(lp_pool[np.argsort(dist, kind="stable")[:5]])

    nll_test = float(-lp_pool.mean() / npix)
    nll_diag = diagonal_gaussian_baseline(add_training_noise(train, sigma, args.seed + 11), pool)
    result = {
        "n_pairs": int(args.n_pairs),
        "fraction_blend_lower_than_both": float(lower.mean()),
        "fraction_blend_lower_than_either": float(((lpb < lp1) | (lpb < lp2)).mean()),
        "fraction_blend_lower_than_area_matched_isolated": float((lpb < matched).mean()),
        "median_footprint_px_isolated": float(np.median(area_pool)),
        "median_footprint_px_blend": float(np.median(area_blend)),
        "median_logp_isolated": float(np.median(np.concatenate([lp1, lp2]))),
        "median_logp_blend": float(np.median(lpb)),
        "median_delta_logp_blend_minus_min_isolated": float(np.median(lpb - np.minimum(lp1, lp2))),
        "nll_per_pixel_isolated_mean": float(-np.mean(np.concatenate([lp1, lp2])) / npix),
        "nll_per_pixel_blend_mean": float(-np.mean(lpb) / npix),
        "heldout_n": int(len(test)),
        "heldout_nll_per_pixel_prior_nats": nll_test,
        "heldout_nll_per_pixel_diag_gaussian_nats": nll_diag,
        "diag_gaussian_fitted_on_n_train": int(len(train)),
        "offset_px": [4.0, 8.0],
        "noise_sigma": sigma,
        "normalisation": "each stamp divided by its own peak, then N(0, noise_sigma) added",
        "eval_seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(out / "pixelcnn_blend_test.json", result)
    print(result, flush=True)

    k = int(np.argmax(lower)) if lower.any() else 0
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.3))
    for ax, img, title in zip(
        axes[:3],
        (noisy[2][k], noisy[0][k], noisy[1][k]),
        (
            f"blend  log p = {lpb[k]:.0f}",
            f"galaxy 1  log p = {lp1[k]:.0f}",
            f"galaxy 2  log p = {lp2[k]:.0f}",
        ),
        strict=True,
    ):
        ax.imshow(img, origin="lower", cmap="magma", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[3].hist(lpb - np.minimum(lp1, lp2), bins=30, color="C0")
    axes[3].axvline(0, color="k", lw=1)
    axes[3].set_xlabel("log p(blend) - min log p(g1, g2) [nats]", fontsize=8)
    axes[3].set_title(f"{100 * lower.mean():.0f}% of {args.n_pairs} blends lower", fontsize=9)
    fig.tight_layout()
    savefig_atomic(fig, out / "pixelcnn_blend_test.png", dpi=120)
    plt.close(fig)

    # --- samples next to training stamps ---------------------------------------------------
    t0 = time.time()
    samples = model.sample(args.n_samples, seed=args.seed).numpy()
    t_sample = time.time() - t0
    real = add_training_noise(train[: args.n_samples], sigma, args.seed)
    fig, axes = plt.subplots(2, args.n_samples, figsize=(1.6 * args.n_samples, 3.6))
    for j in range(args.n_samples):
        for row, img in enumerate((real[j], samples[j])):
            axes[row, j].imshow(img, origin="lower", cmap="magma", vmin=0, vmax=1)
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
    axes[0, 0].set_ylabel("training")
    axes[1, 0].set_ylabel("PixelCNN")
    fig.suptitle(f'peak-normalised 32x32 stamps (0.168"/px); sampling {t_sample:.0f} s', fontsize=9)
    fig.tight_layout()
    savefig_atomic(fig, out / "pixelcnn_samples.png", dpi=120)
    plt.close(fig)
    print(
        f"sampled {args.n_samples} stamps in {t_sample:.1f} s (peaks: samples median "
        f"{np.median(samples.max(axis=(1, 2))):.2f}, training 1 + noise); figures in {out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
