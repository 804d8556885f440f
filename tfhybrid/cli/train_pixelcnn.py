"""``tfhybrid train pixelcnn``: train the Gaussian PixelCNN++ morphology prior.

Simulates peak-normalised survey stamps (``make_survey_stamps``), or reads them from an
``.npy``/``.npz`` file, trains with Keras ``fit`` (progress bar, checkpoint every epoch,
resume from ``--checkpoint-dir``), and saves ``config.json`` + ``weights.npz`` to ``--out``
(load with ``tfhybrid.priors.pixelcnn.load_pixelcnn``); ``--export`` also writes a SavedModel.
"""

from __future__ import annotations

from tfhybrid.cli.train import add_run_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pixelcnn", help="train the PixelCNN++ (Gaussian head) deblending morphology prior"
    )
    p.add_argument("--out", required=True, help="output directory (config.json + weights.npz)")
    p.add_argument("--config", choices=("small", "paper"), default="small")
    p.add_argument(
        "--data",
        default=None,
        help="(n, 32, 32) peak-normalised stamps as .npy, or .npz with array 'train'; "
        "default: simulate --n-train stamps",
    )
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-val", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training after this many minutes of wall time",
    )
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:

    import numpy as np

    from tfhybrid.cli.train import read_training_data
    from tfhybrid.priors.pixelcnn import (
        PixelCNNConfig,
        make_pixelcnn_training_set,
        normalize_morphology,
        save_pixelcnn,
        train_pixelcnn,
    )

    config = PixelCNNConfig.paper() if args.config == "paper" else PixelCNNConfig.small()
    val = None
    if args.data:
        train, val = read_training_data(args.data)
        if train.ndim == 3 and train.size and np.max(np.abs(train)) > 1.5:
            train = normalize_morphology(train)
            val = None if val is None else normalize_morphology(val)
    else:
        train = make_pixelcnn_training_set(args.n_train, args.seed, config)
        val = make_pixelcnn_training_set(args.n_val, args.seed + 1, config)
    strategy = "mirrored" if args.mirrored else None
    model, history = train_pixelcnn(
        train,
        config,
        validation_images=val,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        checkpoint_dir=args.checkpoint_dir,
        strategy=strategy,
        seed=args.seed,
        max_seconds=60 * args.max_minutes if args.max_minutes else None,
    )
    save_pixelcnn(
        model,
        args.out,
        metadata={
            "cli": "tfhybrid train pixelcnn",
            "seed": args.seed,
            "n_train": int(len(train)),
            "history": {k: [float(v) for v in vals] for k, vals in history.items()},
        },
    )
    print(f"saved PixelCNN prior to {args.out}")
    if args.export:
        from tfhybrid.priors.pixelcnn_export import export_pixelcnn_savedmodel

        export_pixelcnn_savedmodel(model, args.export)
        print(f"exported SavedModel to {args.export}")
    return 0
