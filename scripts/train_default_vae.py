"""Train the default (``small``) VAE shipped in ``tfhybrid/assets/vae_default``.

Data: ``tfhybrid.data.preprocess.make_lensing_training_set(n, seed)`` (simulated COSMOS-like
galaxies, S/N cut and peak normalisation of the lensing paper, section 2.2) -> train /
validation / test splits (cached in ``--cache``). ``scripts/vae_figures.py`` evaluates the
model on a separately simulated held-out set with known noiseless truth.

Seeded and bounded: ``--max-minutes`` caps the training wall time (default 14 min on a 2-core
CPU, shared). Checkpoints every epoch in ``--checkpoint-dir``: rerunning the same command after an
interruption resumes where it stopped.

    nice -n 10 python scripts/train_default_vae.py --n 4000 --max-minutes 14 \
        > /tmp/vae_train.log 2>&1 &

Training uses random quarter turns and flips of the images (D4 augmentation, ``--no-augment``
to turn off). The shipped default was trained in three stages on the same data, each
warm-started from the last with ``--init-from`` (recorded in its ``config.json``):
the previous default (no augmentation, 109 epochs at lr 5e-4), then
``--learning-rate 3e-4 --patience 10 --max-minutes 38 --init-from STAGE1 --out STAGE2`` (57
epochs), then ``--learning-rate 1e-4 --patience 15 --seed 1 --max-minutes 25 --init-from
STAGE2`` (17 epochs, early-stopped). ``scripts/vae_figures.py`` measures it.

A sharper variant (not shipped; CHANGELOG, study v11): ``--noiseless --central-third
--decoder-sigma 0.005 --learning-rate 3e-4 --patience 10 --init-from tfhybrid/assets/vae_default
--n 8000`` fine-tunes the default on the noise-free versions of the galaxies, zoomed to fill the
central third of the stamp as the lensing mocks' sources are (78 epochs, 11 min). It halves the
held-out reconstruction error but did not remove the lens-parameter bias.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DATA_SEED = 2020


SPLITS = ("train", "validation", "test")


def load_or_make_data(n: int, seed: int, cache: Path, noiseless: bool = False) -> dict:
    """Splits (and per-image noise sigma) of ``make_lensing_training_set(n, seed)``, cached."""
    import numpy as np

    from tfhybrid.data.preprocess import make_lensing_training_set
    from tfhybrid.priors.training import save_arrays_npz

    key = f"n={n},seed={seed}" + (",noiseless" if noiseless else "")
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            if "key" in f.files and str(f["key"]) == key:
                return {k: f[k] for k in f.files if k != "key"}
    data = make_lensing_training_set(n, seed, progress=True, noiseless=noiseless)
    save_arrays_npz(cache, {**data, "key": np.array(key)})
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000, help="galaxies requested from the data set")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--max-minutes", type=float, default=14.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true",
                   help="train without random quarter turns and flips of the images")
    p.add_argument("--noiseless", action="store_true",
                   help="train on the noise-free versions of the same galaxies (the source "
                        "prior then learns galaxies, not galaxies blurred by the noise)")
    p.add_argument("--central-third", action="store_true",
                   help="zoom every image so its 90 %%-flux radius is 1/6 of the side "
                        "(rescale_to_central_third, as the lensing mocks' sources are): the "
                        "galaxy's physical size is then the lens model's s alone")
    p.add_argument("--decoder-sigma", type=float, default=None,
                   help="sigma_d of the likelihood (default: the 'small' config's 1/50)")
    p.add_argument("--init-from", default=None,
                   help="saved VAE directory (same config) whose weights start the training")
    p.add_argument("--data-seed", type=int, default=DATA_SEED)
    p.add_argument("--out", default=str(REPO / "tfhybrid" / "assets" / "vae_default"))
    p.add_argument(
        "--checkpoint-dir", default=str(Path(tempfile.gettempdir()) / "tfhybrid_vae_default_ckpt")
    )
    p.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "tfhybrid_vae_default_data.npz"),
        help="npz cache of the simulated splits (recomputed if absent)",
    )
    args = p.parse_args(argv)

    import numpy as np

    from tfhybrid.priors.vae import VAEConfig, save_vae, train_vae

    t0 = time.time()
    data = load_or_make_data(args.n, args.data_seed, Path(args.cache), args.noiseless)
    if args.noiseless:
        for split in SPLITS:
            data[split] = data[f"{split}_noiseless"]
    if args.central_third:
        from tfhybrid.data.preprocess import rescale_to_central_third

        for split in SPLITS:
            data[split] = np.stack([rescale_to_central_third(x) for x in data[split]])
    config = VAEConfig.small()
    if args.decoder_sigma is not None:
        config = dataclasses.replace(config, decoder_sigma=args.decoder_sigma)
    print(
        f"data: train {data['train'].shape}, validation {data['validation'].shape}, "
        f"test {data['test'].shape} ({time.time() - t0:.0f} s)",
        flush=True,
    )

    t1 = time.time()
    model, history = train_vae(
        data["train"],
        config,
        validation_images=data["validation"],
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience,
        checkpoint_dir=args.checkpoint_dir,
        max_seconds=60 * args.max_minutes,
        seed=args.seed,
        verbose=2,
        augment=not args.no_augment,
        initial_model=args.init_from,
    )
    train_s = time.time() - t1
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_vae(
        model,
        tmp,
        metadata={
            "script": "scripts/train_default_vae.py",
            "data": "tfhybrid.data.preprocess.make_lensing_training_set",
            "n_requested": args.n,
            "data_seed": args.data_seed,
            "seed": args.seed,
            "augment": not args.no_augment,
            "noiseless": args.noiseless,
            "central_third": args.central_third,
            "init_from": args.init_from,
            "n_train": int(len(data["train"])),
            "n_validation": int(len(data["validation"])),
            "n_test": int(len(data["test"])),
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "epochs_run": len(history.get("loss", [])),
            "train_seconds": round(train_s, 1),
            "history": history,
        },
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    best = min(history["val_loss"]) if history.get("val_loss") else float("nan")
    print(
        f"saved {out}: {len(history.get('loss', []))} epochs in {train_s:.0f} s, "
        f"best val -ELBO {best:.1f} nats/image",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
