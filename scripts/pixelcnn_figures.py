"""Figures and numbers for the shipped PixelCNN++ prior (seeded; ~3 min on 2 CPU cores).

1. ``pixelcnn_samples.png``: prior samples next to real (peak-normalised, training-noise)
   training stamps.
2. The deblending paper's Fig. 2 effect (000_*, §3): for ``--n-pairs`` pairs of held-out
   isolated galaxies (g1, g2), the artificial blend ``b = g1 + shift(g2, offset)`` (offset of
   4-8 px in a random direction, zero-filled) should have a lower log-likelihood than either
   isolated galaxy. Fair normalisation: all three stamps are put in the prior's convention
   (each divided by its own peak, as the deblender's ``max S = 1`` would) and receive an
   independent draw of the training noise (sigma = config.noise_sigma), so every stamp is a
   valid input of the same scale and the same number of pixels; the comparison is of total
   log p (equivalently NLL per pixel). Writes ``pixelcnn_blend_test.json`` and
   ``pixelcnn_blend_test.png`` (one example + histogram of log p(blend) - min log p(isolated)).

    nice -n 10 python scripts/pixelcnn_figures.py --out figures/
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def shift_zero_fill(img, dy: int, dx: int):
    """Shift a (ny, nx) image by integer (dy, dx) pixels, filling with zeros (no wrap)."""
    import numpy as np

    out = np.zeros_like(img)
    ny, nx = img.shape
    ys, yd = (slice(0, ny - dy), slice(dy, ny)) if dy >= 0 else (slice(-dy, ny), slice(0, ny + dy))
    xs, xd = (slice(0, nx - dx), slice(dx, nx)) if dx >= 0 else (slice(-dx, nx), slice(0, nx + dx))
    out[yd, xd] = img[ys, xs]
    return out


def make_blend_pairs(stamps, n_pairs: int, seed: int):
    """(g1, g2, blend) arrays (n_pairs, ny, nx), peak-normalised, from distinct stamps."""
    import numpy as np

    from tfhybrid.priors.pixelcnn import normalize_morphology

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(stamps))[: 2 * n_pairs].reshape(n_pairs, 2)
    g1, g2 = stamps[idx[:, 0]], stamps[idx[:, 1]]
    radius = rng.uniform(4.0, 8.0, n_pairs)
    angle = rng.uniform(0, 2 * np.pi, n_pairs)
    dy = np.round(radius * np.sin(angle)).astype(int)
    dx = np.round(radius * np.cos(angle)).astype(int)
    blend = np.stack([g1[k] + shift_zero_fill(g2[k], dy[k], dx[k]) for k in range(n_pairs)])
    return normalize_morphology(g1), normalize_morphology(g2), normalize_morphology(blend)


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
        load_default_pixelcnn,
        load_pixelcnn,
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
        train = make_pixelcnn_training_set(64, seed0, cfg)
        test = make_pixelcnn_training_set(2 * args.n_pairs, seed0 + 2, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sigma = cfg.noise_sigma

    # --- Fig. 2 effect ------------------------------------------------------------------
    g1, g2, blend = make_blend_pairs(test, args.n_pairs, args.seed)
    noisy = [add_training_noise(a, sigma, args.seed + k) for k, a in enumerate((g1, g2, blend))]
    t0 = time.time()
    lps = [
        np.concatenate([model.log_prob(a[i : i + 50]).numpy() for i in range(0, len(a), 50)])
        for a in noisy
    ]
    lp1, lp2, lpb = lps
    lower = (lpb < lp1) & (lpb < lp2)
    npix = cfg.image_size**2
    result = {
        "n_pairs": int(args.n_pairs),
        "fraction_blend_lower_than_both": float(lower.mean()),
        "fraction_blend_lower_than_either": float(((lpb < lp1) | (lpb < lp2)).mean()),
        "median_logp_isolated": float(np.median(np.concatenate([lp1, lp2]))),
        "median_logp_blend": float(np.median(lpb)),
        "median_delta_logp_blend_minus_min_isolated": float(np.median(lpb - np.minimum(lp1, lp2))),
        "nll_per_pixel_isolated_mean": float(-np.mean(np.concatenate([lp1, lp2])) / npix),
        "nll_per_pixel_blend_mean": float(-np.mean(lpb) / npix),
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
    axes[3].set_xlabel("log p(blend) - min(log p(g1), log p(g2))  [nats]")
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
    print(f"sampled {args.n_samples} stamps in {t_sample:.1f} s; figures in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
