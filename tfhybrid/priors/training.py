"""Shared Keras 3 training utilities for the tfhybrid priors (VAE, PixelCNN).

What lives here and why:

- :class:`ResumableCheckpoint`: a callback that, at the end of EVERY epoch, atomically writes the
  model weights, the optimizer state, the best-so-far weights and the early-stopping counters
  into one directory. :func:`restore_checkpoint` reads them back so that a job killed at any
  moment resumes at the first unfinished epoch with the same optimizer moments (no epoch lost,
  no Adam warm-up repeated). Optional early stopping on a monitored metric (e.g. the
  validation negative ELBO) with best-weights restore is built in, because its counters must be
  checkpointed together with the weights to survive an interruption.
- :class:`WallTimeBudget`: stop ``fit`` cleanly after a wall-clock budget.
- :func:`resolve_strategy`: ``None`` / ``"default"`` / ``"mirrored"`` / a
  ``tf.distribute.Strategy`` -> a strategy object (build the model inside ``strategy.scope()``).
- :func:`fit_resumable`: ``model.fit`` with the above wired together.

Files in a checkpoint directory (all plain arrays + JSON; loading never executes code):
``last.weights.npz`` (model variables by path), ``optimizer.npz`` (optimizer variables in build
order), ``best.weights.npz`` (when monitoring), ``state.json`` (epoch, history, best, wait).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfhybrid.io import (  # noqa: F401 - the npz helpers, re-exported here
    atomic_path,
    load_arrays_npz,
    save_arrays_npz,
    write_json_atomic,
)
from tfhybrid.validation import TfhybridInputError

STATE_FILE = "state.json"
LAST_WEIGHTS = "last.weights.npz"
BEST_WEIGHTS = "best.weights.npz"
OPTIMIZER_FILE = "optimizer.npz"


# --------------------------------------------------------------------------- weights as arrays
def variables_to_arrays(variables) -> dict[str, np.ndarray]:
    """Map each Keras variable's unique ``path`` to a NumPy copy of its value."""
    out = {}
    for v in variables:
        key = v.path
        if key in out:
            raise RuntimeError(f"duplicate variable path {key!r}; name the layers uniquely")
        out[key] = np.asarray(keras.ops.convert_to_numpy(v))
    return out


def assign_arrays(variables, arrays: dict[str, np.ndarray], source: str = "weights") -> None:
    """Assign ``arrays`` (by variable path) to ``variables``; every name and shape must match."""
    variables = list(variables)
    want = {v.path: v for v in variables}
    missing = sorted(set(want) - set(arrays))
    extra = sorted(set(arrays) - set(want))
    if missing or extra:
        raise TfhybridInputError(
            f"{source} do not match the model architecture: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''} (was it saved from another config?)"
        )
    for key, var in want.items():
        arr = arrays[key]
        if tuple(arr.shape) != tuple(var.shape):
            raise TfhybridInputError(
                f"{source}: variable {key!r} expected shape {tuple(var.shape)}, got "
                f"{tuple(arr.shape)} (was it saved from another config?)"
            )
    for key, var in want.items():
        var.assign(arrays[key].astype(var.dtype))


def _optimizer_arrays(optimizer) -> dict[str, np.ndarray]:
    return {
        f"{i:05d}": np.asarray(keras.ops.convert_to_numpy(v))
        for i, v in enumerate(optimizer.variables)
    }


def _restore_optimizer(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    opt = model.optimizer
    if not opt.built:
        opt.build(model.trainable_variables)
    variables = opt.variables
    if len(variables) != len(arrays):
        raise TfhybridInputError(
            f"optimizer checkpoint has {len(arrays)} variables, the optimizer has "
            f"{len(variables)} (different model or optimizer?)"
        )
    for i, v in enumerate(variables):
        arr = arrays[f"{i:05d}"]
        if tuple(arr.shape) != tuple(v.shape):
            raise TfhybridInputError(
                f"optimizer checkpoint variable {i} has shape {arr.shape}, expected {v.shape}"
            )
        v.assign(arr)


# --------------------------------------------------------------------------- callbacks
class ResumableCheckpoint(keras.callbacks.Callback):
    """Checkpoint every epoch (weights + optimizer + early-stopping state), atomically.

    Parameters
    ----------
    directory : path
        Checkpoint directory (created). Pass the same directory to :func:`restore_checkpoint`
        before calling ``fit`` again to resume.
    monitor : str or None
        Metric to watch for best weights and early stopping (e.g. ``"val_loss"``). Lower is
        better. ``None``: no best tracking.
    patience : int or None
        Stop after this many epochs without improvement of ``monitor`` (``None``: never stop).
    min_delta : float
        Minimum decrease of ``monitor`` that counts as an improvement.
    restore_best : bool
        At the end of training, load the best weights (paper: stop when the validation ELBO
        turns up and keep the best model).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        monitor: str | None = "val_loss",
        patience: int | None = None,
        min_delta: float = 0.0,
        restore_best: bool = True,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.best = math.inf
        self.best_epoch = -1
        self.wait = 0
        self.history: dict[str, list[float]] = {}
        self.stopped_early = False

    def load_state(self) -> int:
        """Load counters from ``state.json``; return the number of completed epochs (0 if none)."""
        path = self.directory / STATE_FILE
        if not path.is_file():
            return 0
        try:
            state = json.loads(path.read_text())
            self.best = float(state["best"]) if state["best"] is not None else math.inf
            self.best_epoch = int(state["best_epoch"])
            self.wait = int(state["wait"])
            self.history = {k: list(map(float, v)) for k, v in state["history"].items()}
            return int(state["epochs_completed"])
        except (ValueError, KeyError, TypeError) as err:
            raise TfhybridInputError(f"checkpoint state {path} is corrupted: {err}") from err

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))
        self.directory.mkdir(parents=True, exist_ok=True)
        improved = False
        if self.monitor is not None:
            if self.monitor not in logs:
                raise TfhybridInputError(
                    f"ResumableCheckpoint monitors {self.monitor!r} but fit logged only "
                    f"{sorted(logs)} (pass validation data?)"
                )
            value = float(logs[self.monitor])
            if value < self.best - self.min_delta:
                self.best, self.best_epoch, self.wait, improved = value, epoch, 0, True
            else:
                self.wait += 1
        if improved:
            save_arrays_npz(self.directory / BEST_WEIGHTS, variables_to_arrays(self.model.weights))
        save_arrays_npz(self.directory / LAST_WEIGHTS, variables_to_arrays(self.model.weights))
        save_arrays_npz(self.directory / OPTIMIZER_FILE, _optimizer_arrays(self.model.optimizer))
        # state.json last: it is the commit marker of a complete checkpoint.
        write_json_atomic(
            self.directory / STATE_FILE,
            {
                "epochs_completed": epoch + 1,
                "best": None if math.isinf(self.best) else self.best,
                "best_epoch": self.best_epoch,
                "wait": self.wait,
                "monitor": self.monitor,
                "history": self.history,
            },
        )
        if self.patience is not None and self.wait >= self.patience:
            self.stopped_early = True
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        best = self.directory / BEST_WEIGHTS
        if self.restore_best and self.monitor is not None and best.is_file():
            assign_arrays(self.model.weights, load_arrays_npz(best), source=str(best))


class WallTimeBudget(keras.callbacks.Callback):
    """Stop training at the end of the first epoch that finishes after ``seconds`` of wall time."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = float(seconds)
        self._t0 = None

    def on_train_begin(self, logs=None):
        self._t0 = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if time.monotonic() - self._t0 > self.seconds:
            self.model.stop_training = True


def restore_checkpoint(
    model: keras.Model, checkpoint: ResumableCheckpoint | str | os.PathLike
) -> int:
    """Restore weights, optimizer state and counters from a checkpoint directory.

    The model must be compiled and built. Returns the number of completed epochs, to pass as
    ``initial_epoch`` to ``fit``; 0 (and nothing changed) when the directory holds no checkpoint.
    """
    cb = (
        checkpoint
        if isinstance(checkpoint, ResumableCheckpoint)
        else ResumableCheckpoint(checkpoint, monitor=None)
    )
    done = cb.load_state()
    if done == 0:
        return 0
    assign_arrays(
        model.weights, load_arrays_npz(cb.directory / LAST_WEIGHTS), source="checkpoint weights"
    )
    _restore_optimizer(model, load_arrays_npz(cb.directory / OPTIMIZER_FILE))
    return done


def resolve_strategy(strategy=None):
    """Return a ``tf.distribute.Strategy`` from ``None``/``"default"``/``"mirrored"``/a strategy."""
    import tensorflow as tf

    if strategy is None or strategy == "default":
        return tf.distribute.get_strategy()
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    raise TfhybridInputError(
        "strategy must be None, 'default', 'mirrored' or a tf.distribute.Strategy; "
        f"got {strategy!r}"
    )


def fit_resumable(
    model: keras.Model,
    train_data,
    validation_data=None,
    epochs: int = 10,
    checkpoint_dir: str | os.PathLike | None = None,
    monitor: str | None = "val_loss",
    patience: int | None = None,
    restore_best: bool = True,
    tensorboard_dir: str | os.PathLike | None = None,
    max_seconds: float | None = None,
    callbacks: list | None = None,
    verbose: int | str = "auto",
):
    """``model.fit`` with checkpoint-every-epoch, resume, early stopping and optional TensorBoard.

    If ``checkpoint_dir`` holds a checkpoint, training resumes at the first unfinished epoch
    with the saved weights, optimizer moments and early-stopping counters. Without a
    ``checkpoint_dir`` the same early stopping runs through a temporary directory.
    Returns ``(history_dict, checkpoint_callback)``; ``history_dict`` covers all epochs,
    including those run before an interruption.
    """
    import tempfile

    if validation_data is None:
        monitor = monitor if monitor and not monitor.startswith("val_") else None
    tmp = None
    if checkpoint_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tfhybrid_ckpt_")
        checkpoint_dir = tmp.name
    ckpt = ResumableCheckpoint(checkpoint_dir, monitor, patience, restore_best=restore_best)
    ckpt.set_model(model)
    initial_epoch = restore_checkpoint(model, ckpt)
    cbs = [ckpt, *(callbacks or [])]
    if max_seconds is not None:
        cbs.append(WallTimeBudget(max_seconds))
    if tensorboard_dir is not None:
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)))
    try:
        if initial_epoch < epochs and not (
            patience is not None and ckpt.wait >= patience
        ):
            model.fit(
                train_data,
                validation_data=validation_data,
                epochs=epochs,
                initial_epoch=initial_epoch,
                callbacks=cbs,
                verbose=verbose,
                # a tf.data pipeline shuffles itself (Keras ignores the flag then, and warns)
                shuffle=not isinstance(train_data, tf.data.Dataset),
            )
        elif restore_best:
            ckpt.on_train_end()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return ckpt.history, ckpt
