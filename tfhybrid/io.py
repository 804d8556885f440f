"""Atomic file output: every file tfhybrid writes goes to a temporary name, then is renamed.

A job killed midway therefore never leaves a half-written FITS, JSON, PNG or NPZ file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file keeps ``path``'s suffix so that writers choosing a format from the
    extension (matplotlib, astropy) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            # mkstemp creates 0600 files: give the result the permissions of a normal open()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    For outputs that are directories (SavedModels): an interrupted export never leaves a
    half-written model, and an existing ``path`` is replaced only once the new one is complete.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    return Path(path)


def write_fits_atomic(path: str | os.PathLike, hdulist) -> Path:
    """Write an ``astropy.io.fits.HDUList`` atomically (overwriting ``path``)."""
    with atomic_path(path) as tmp:
        hdulist.writeto(tmp, overwrite=True)
    return Path(path)


def savefig_atomic(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return Path(path)


def save_arrays_npz(path: str | os.PathLike, arrays: dict) -> Path:
    """Write a dict of arrays to ``path`` (.npz) atomically (no pickles)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return Path(path)


def load_arrays_npz(path: str | os.PathLike) -> dict:
    """Read an .npz of plain arrays (``allow_pickle=False``), with a clear error if unreadable."""
    import numpy as np

    from tfhybrid.validation import TfhybridInputError

    path = Path(path)
    if not path.is_file():
        raise TfhybridInputError(f"expected the file {path}; it does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # zipfile.BadZipFile, ValueError (pickled object), EOFError, ...
        raise TfhybridInputError(
            f"{path} is not a readable .npz of plain arrays (corrupted or truncated?): {err}"
        ) from err


def array_digest(*arrays) -> str:
    """SHA-1 of the arrays' bytes (C order, their own dtypes) and shapes: what a resumable
    job's ``config.json`` records of its inputs (:func:`check_or_write_config`)."""
    import hashlib

    import numpy as np

    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_or_write_config(directory: str | os.PathLike, config: dict,
                          name: str = "checkpoint_dir") -> None:
    """The settings a resumable job's directory was made with: ``directory/config.json``.

    Writes ``config`` (JSON-serialisable) there atomically if the file is absent; otherwise
    compares it with the stored one and raises :class:`tfhybrid.validation.TfhybridInputError`
    naming the settings that differ, so a run never resumes from another run's files.
    """
    from tfhybrid.validation import TfhybridInputError

    path = Path(directory) / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise TfhybridInputError(
                f"{name} {directory} has an unreadable config.json ({err}); remove the "
                "directory to start afresh") from err
        new = json.loads(json.dumps(config, default=_json_default))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise TfhybridInputError(
                f"{name} {directory} holds a run with different settings ({', '.join(diff)}); "
                "use the same arguments to resume, or another directory (or remove this one) "
                "to start afresh"
            )
    else:
        write_json_atomic(path, config)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
