"""Stage-by-stage checkpoints of :func:`tfhybrid.lens.fit.fit_map`, so a killed fit resumes.

A MAP of many systems batched takes long (10 study mocks: 10–20 min on a 2-core CPU), in
stages: the global search, full-resolution Adam (with the source-scale jumps when
``jump_stage="full"``), the white polish, then the source-residual stage. With a
``checkpoint_dir`` each completed stage's result is written there (one ``.npz`` of plain
arrays, atomically: a temporary file, then a rename), after ``config.json`` records what the
fit was asked to do: a digest of the data, noise, grid, prior and VAE weights, every setting
of the call, and the package's version. A later call with the same directory and the same
arguments loads the finished stages instead of running them again; one with other arguments
gets a clear error instead of another fit's results. The last stage is not checkpointed: its
result is the fit's, which the caller writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tfhybrid.inference.map import MapResult
from tfhybrid.io import array_digest, check_or_write_config, load_arrays_npz, save_arrays_npz
from tfhybrid.validation import TfhybridInputError

FORMAT = "tfhybrid.lens.fit_map.checkpoint/1"

#: the stages written, in order (file ``<stage>.npz``)
STAGES = ("global_search", "adam", "polish")


def posterior_fingerprint(posterior) -> dict:
    """What a :class:`tfhybrid.lens.model.LensPosterior` fit depends on, as JSON values."""
    weights = [np.asarray(w) for w in getattr(posterior.vae, "weights", [])]
    return dict(
        observed_sha1=array_digest(np.asarray(posterior.observed_images)),
        noise_sigma=np.asarray(posterior.noise_sigma, np.float64).tolist(),
        noise_map_sha1=(array_digest(posterior.noise_map) if posterior.has_noise_map
                        else None),
        config=repr(posterior.config),
        psf_sha1=(None if posterior.psf_image is None
                  else array_digest(np.asarray(posterior.psf_kernel))),
        prior=repr(posterior.prior),
        vae=type(posterior.vae).__qualname__,
        vae_weights_sha1=array_digest(*weights),
        source_residual=(None if posterior.source_residual is None
                         else dataclasses.asdict(posterior.source_residual)),
        residual_sigma=(None if posterior.residual_sigma is None
                        else np.asarray(posterior.residual_sigma, np.float64).ravel().tolist()),
    )


class MapCheckpoint:
    """The directory of one :func:`~tfhybrid.lens.fit.fit_map` call's finished stages.

    ``config``: JSON-serialisable settings; the directory must hold the same (or none).
    """

    def __init__(self, directory, config: dict):
        from tfhybrid import __version__

        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TfhybridInputError(
                f"cannot create the checkpoint directory {self.directory}: {err}") from err
        if not (self.directory / "config.json").exists() and any(
                (self.directory / f"{stage}.npz").exists() for stage in STAGES):
            raise TfhybridInputError(
                f"checkpoint_dir {self.directory} holds stage files but no config.json, so "
                "what they were fitted with is unknown; remove them to start afresh")
        check_or_write_config(self.directory, dict(config, format=FORMAT, version=__version__))
        self.loaded: list[str] = []

    def _path(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        return self.directory / f"{stage}.npz"

    def load(self, stage: str) -> dict | None:
        """The arrays saved for ``stage``, or None if it has not finished."""
        path = self._path(stage)
        if not path.is_file():
            return None
        arrays = load_arrays_npz(path)
        self.loaded.append(stage)
        return arrays

    def save(self, stage: str, arrays: dict) -> None:
        """Write ``stage``'s arrays (atomically)."""
        save_arrays_npz(self._path(stage), {k: np.asarray(v) for k, v in arrays.items()
                                            if v is not None})


def map_result_arrays(result: MapResult, prefix: str = "result_") -> dict:
    """A :class:`MapResult` as plain arrays (keys ``prefix + field``) for
    :class:`MapCheckpoint`."""
    out = {f"{prefix}state_{i}": np.asarray(p) for i, p in enumerate(result.state)}
    out.update({f"{prefix}ustate_{i}": np.asarray(p)
                for i, p in enumerate(result.unconstrained_state)})
    out.update({
        f"{prefix}log_prob": result.log_prob, f"{prefix}loss_trace": result.loss_trace,
        f"{prefix}converged": result.converged, f"{prefix}num_steps": result.num_steps,
        f"{prefix}message": np.str_(result.message),
        f"{prefix}best_index": (None if result.best_index is None
                                else np.asarray(result.best_index, np.int64)),
        f"{prefix}chunk_seconds": result.chunk_seconds,
        f"{prefix}kept_starts": result.kept_starts,
    })
    return out


def map_result_from_arrays(arrays: dict, prefix: str = "result_") -> MapResult:
    """Inverse of :func:`map_result_arrays` (the state parts as NumPy arrays)."""
    import tensorflow as tf

    def parts(name):
        n = sum(1 for k in arrays if k.startswith(f"{prefix}{name}_"))
        return [tf.constant(arrays[f"{prefix}{name}_{i}"]) for i in range(n)]

    best = arrays.get(f"{prefix}best_index")
    return MapResult(
        state=parts("state"), unconstrained_state=parts("ustate"),
        log_prob=arrays[f"{prefix}log_prob"], loss_trace=arrays[f"{prefix}loss_trace"],
        converged=arrays[f"{prefix}converged"], num_steps=int(arrays[f"{prefix}num_steps"]),
        message=str(arrays[f"{prefix}message"]),
        best_index=None if best is None else tuple(int(i) for i in best),
        chunk_seconds=arrays.get(f"{prefix}chunk_seconds"),
        kept_starts=arrays.get(f"{prefix}kept_starts"),
    )
