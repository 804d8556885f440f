"""``tfhybrid train vae``: train the VAE galaxy source model of the lensing paper.

Reads peak-normalised 64 × 64 images from ``--data`` (the FITS file of ``tfhybrid data
preprocess --task lensing``, an ``.npz`` with arrays ``train`` and optionally ``validation``, or
an ``.npy`` of training images) or, without ``--data``, simulates ``--n`` images with
``make_lensing_training_set``. Trains with Keras ``fit`` (progress bar, checkpoint every epoch,
resume from ``--checkpoint-dir``, early stopping on the validation negative ELBO with
best-weights restore), fits the latent prior, and saves ``config.json`` + ``weights.npz`` +
``latent_prior.npz`` to ``--out`` (load with ``tfhybrid.priors.vae.load_vae``); ``--export``
also writes a SavedModel (load with ``tfhybrid.priors.vae_export.load_prior`` or plain
``tf.saved_model.load``).
"""

from __future__ import annotations

from tfhybrid.cli.train import add_run_arguments, read_training_data


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "vae", help="train the VAE galaxy source model (Chianese et al. 2020)"
    )
    p.add_argument(
        "--out", required=True, help="output directory (config.json, weights.npz, latent_prior.npz)"
    )
    p.add_argument(
        "--config",
        default="small",
        help="'small' (default, width multiplier 1/4), 'paper' (Tables D1/D2) or a JSON file "
        "of VAEConfig fields",
    )
    p.add_argument(
        "--data",
        default=None,
        help="lensing image-set FITS (tfhybrid data preprocess --task lensing), .npz with "
        "'train' [and 'validation'], or .npy of (n, 64, 64) images; default: simulate --n",
    )
    p.add_argument("--n", type=int, default=4000, help="images to simulate without --data")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="early stopping after this many epochs without a better validation ELBO (0 disables)",
    )
    p.add_argument("--trainable-sigma", action="store_true", help="learn sigma_d (default fixed)")
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop after this many minutes of wall time"
    )
    p.add_argument("--tensorboard-dir", default=None, help="write TensorBoard logs here")
    add_run_arguments(p)
    p.set_defaults(func=run)


def _read_config(value: str):
    import json
    from pathlib import Path

    from tfhybrid.priors.vae import VAEConfig, resolve_config
    from tfhybrid.validation import TfhybridInputError

    if value in ("small", "paper"):
        return resolve_config(value)
    path = Path(value)
    if not path.is_file():
        raise TfhybridInputError(
            f"--config must be 'small', 'paper' or an existing JSON file; got {value!r}"
        )
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise TfhybridInputError(f"--config {path} is not valid JSON: {err}") from err
    return VAEConfig.from_dict(data)


def run(args) -> int:
    import numpy as np

    from tfhybrid.priors.vae import save_vae, train_vae
    from tfhybrid.validation import TfhybridInputError

    config = _read_config(args.config)
    if args.trainable_sigma:
        import dataclasses

        config = dataclasses.replace(config, trainable_sigma=True)
    if args.epochs < 1 or args.batch_size < 1:
        raise TfhybridInputError(
            f"--epochs and --batch-size must be >= 1; got {args.epochs}, {args.batch_size}"
        )
    if args.data:
        train, val = read_training_data(args.data)
    else:
        from tfhybrid.data.preprocess import make_lensing_training_set

        sets = make_lensing_training_set(args.n, args.seed, progress=True)
        train, val = sets["train"], sets["validation"]
    model, history = train_vae(
        np.asarray(train),
        config,
        validation_images=val,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience or None,
        checkpoint_dir=args.checkpoint_dir,
        tensorboard_dir=args.tensorboard_dir,
        max_seconds=60 * args.max_minutes if args.max_minutes else None,
        strategy="mirrored" if args.mirrored else None,
        seed=args.seed,
    )
    save_vae(
        model,
        args.out,
        metadata={
            "cli": "tfhybrid train vae",
            "data": str(args.data)
            if args.data
            else f"make_lensing_training_set({args.n}, {args.seed})",
            "seed": args.seed,
            "n_train": int(len(train)),
            "n_validation": int(len(val)) if val is not None else 0,
            "history": {k: [float(v) for v in vals] for k, vals in history.items()},
        },
    )
    epochs_run = len(history.get("loss", []))
    best = min(history["val_loss"]) if history.get("val_loss") else float("nan")
    print(
        f"saved VAE ({model.config.name}) to {args.out}: {epochs_run} epoch(s), "
        f"best validation -ELBO {best:.1f} nats/image"
    )
    if args.export:
        from tfhybrid.priors.vae_export import export_prior

        export_prior(model, args.export)
        print(f"exported SavedModel to {args.export}")
    return 0
