"""Galaxy stamps on disk: a documented multi-extension FITS format, written atomically.

Stamp files (``write_stamps_fits`` / ``read_stamps_fits``)
---------------------------------------------------------
=========  ===========  ==========================================================================
HDU        type         content
=========  ===========  ==========================================================================
PRIMARY    header only  provenance: ``TFHVER`` (tfhybrid version), ``SEED``, ``PIXSCALE``
                        (pixel side, arcsec), ``PSFDESC`` (PSF description), ``NSTAMPS``,
                        ``STAMPNY``, ``STAMPNX``, ``FORMAT`` = ``tfhybrid-stamps``, ``FMTVER``
IMAGES     image        (n, ny, nx) float32 noisy stamps, axis order (y, x), e-/s per pixel
NOISELESS  image        (n, ny, nx) float32 stamps before noise (optional)
PSF        image        (py, px) float32 PSF shared by all stamps, or (n, py, px) one per stamp;
                        pixel response included, unit sum
PARAMS     binary table one row per stamp, one column per parameter (``noise_sigma`` always);
                        ``TUNITn`` set for angles and sizes (``arcsec``, ``rad``) and fluxes
=========  ===========  ==========================================================================

Image-set files (``write_image_sets_fits`` / ``read_image_sets_fits``)
----------------------------------------------------------------------
Preprocessed training sets: a primary header with provenance (``FORMAT`` =
``tfhybrid-image-sets``, ``SETS`` = comma-separated set names) and one image extension per set
(``TRAIN``, ``VALIDATION``, ``TEST``, each (n_set, ny, nx) float32), each optionally followed by
an ``<NAME>_TABLE`` binary table with one row per image (e.g. ``index``: row of the image in the
input it came from; ``noise_sigma``: pixel noise of the normalised image).

Every file goes to a temporary name first and is renamed on success
(``tfhybrid.io.write_fits_atomic``), so an interrupted write never leaves a partial file.
Reading validates the format and raises ``TfhybridInputError`` naming the file on anything
unexpected (missing, not FITS, truncated, missing extension, inconsistent shapes, NaN).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tfhybrid.data.simulate import GalaxyStamps
from tfhybrid.validation import TfhybridInputError

#: Value of the ``FORMAT`` keyword of stamp files.
STAMPS_FORMAT = "tfhybrid-stamps"

#: Value of the ``FORMAT`` keyword of image-set files.
IMAGE_SETS_FORMAT = "tfhybrid-image-sets"

#: Format version written to ``FMTVER``; readers accept this version only.
FORMAT_VERSION = 1

#: Units of known parameter columns (FITS ``TUNIT``); others are dimensionless.
PARAM_UNITS: Mapping[str, str] = {
    "flux": "electron/s",
    "mag": "mag",
    "hlr_arcsec": "arcsec",
    "bulge_hlr_arcsec": "arcsec",
    "disk_hlr_arcsec": "arcsec",
    "bulge_beta_rad": "rad",
    "disk_beta_rad": "rad",
    "noise_sigma": "electron/s",
    "pixel_scale_arcsec": "arcsec",
}


def _check_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise TfhybridInputError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and path.is_dir():
        raise TfhybridInputError(f"{path} is a directory, not a file name")


def _stack3(name: str, value) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 3:
        raise TfhybridInputError(
            f"{name} must have shape (n, ny, nx); got shape {arr.shape} (rank {arr.ndim})"
        )
    if arr.shape[0] < 1:
        raise TfhybridInputError(f"{name} holds no stamps (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise TfhybridInputError(f"{name} contains NaN or inf values")
    return arr


def _header_card(header, key: str, value, comment: str) -> None:
    if value is not None:
        header[key] = (value, comment)


def _provenance_card(header, key: str, value) -> None:
    """``header[key] = value`` for a caller's ``value`` or ``(value, comment)``, without the
    comment where it would not fit the card beside the value (astropy would truncate it, with a
    ``VerifyWarning``; e.g. a 54–67 character path)."""
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning

    if isinstance(value, tuple) and len(value) == 2:
        with warnings.catch_warnings():
            warnings.simplefilter("error", VerifyWarning)
            try:
                _ = fits.Card(key, *value).image
            except VerifyWarning:
                value = value[0]
    header[key] = value


def write_stamps_fits(
    path: str | os.PathLike,
    stamps: GalaxyStamps | np.ndarray,
    *,
    noiseless: np.ndarray | None = None,
    noise_sigma=None,
    psf: np.ndarray | None = None,
    pixel_scale_arcsec: float | None = None,
    params: Mapping[str, np.ndarray] | None = None,
    seed: int | None = None,
    psf_description: str | None = None,
    header: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write galaxy stamps to a multi-extension FITS file (format in the module docstring).

    Parameters
    ----------
    path : str or PathLike
        Output file; written atomically (temporary file, then rename).
    stamps : GalaxyStamps or np.ndarray
        A ``GalaxyStamps`` (its fields fill the keyword arguments left as None), or (n, ny, nx)
        noisy stamps, axis order (y, x).
    noiseless : np.ndarray, optional
        (n, ny, nx) noiseless stamps.
    noise_sigma : float or (n,) array, optional
        Per-stamp pixel-noise sigma (e-/s); stored as the ``noise_sigma`` column. Required
        when ``stamps`` is an array (use 0 for noiseless data).
    psf : np.ndarray
        (py, px) PSF shared by every stamp or (n, py, px) one per stamp. Required.
    pixel_scale_arcsec : float
        Pixel side in arcsec (> 0). Required.
    params : mapping of str to (n,) arrays, optional
        Per-stamp parameters, one table column each (units from ``PARAM_UNITS``).
    seed : int, optional
        Random seed that produced the stamps (header ``SEED``).
    psf_description : str, optional
        Human-readable PSF description (header ``PSFDESC``).
    header : mapping, optional
        Extra primary-header keywords (``key -> value`` or ``key -> (value, comment)``).
    overwrite : bool
        Replace an existing file; otherwise an existing ``path`` raises.

    Returns
    -------
    Path
        ``path``.
    """
    from astropy.io import fits

    from tfhybrid import __version__
    from tfhybrid.io import write_fits_atomic

    path = Path(path)
    _check_overwrite(path, overwrite)
    if isinstance(stamps, GalaxyStamps):
        images = stamps.images
        noiseless = stamps.noiseless if noiseless is None else noiseless
        params = stamps.params if params is None else params
        if noise_sigma is None:
            # The float64 parameter column when there is one (``stamps.noise_sigma`` is float32).
            noise_sigma = (params or {}).get("noise_sigma", stamps.noise_sigma)
        psf = stamps.psf if psf is None else psf
        if pixel_scale_arcsec is None:
            pixel_scale_arcsec = stamps.pixel_scale_arcsec
    else:
        images = stamps
    images = _stack3("images", images)
    n, ny, nx = images.shape
    if noiseless is not None:
        noiseless = _stack3("noiseless", noiseless)
        if noiseless.shape != images.shape:
            raise TfhybridInputError(
                f"noiseless has shape {noiseless.shape} but images have {images.shape}"
            )
    if psf is None:
        raise TfhybridInputError("psf is required: a (py, px) or (n, py, px) PSF image")
    psf = np.asarray(psf, dtype=np.float32)
    if psf.ndim not in (2, 3) or (psf.ndim == 3 and psf.shape[0] != n):
        raise TfhybridInputError(
            f"psf must have shape (py, px) or (n={n}, py, px); got {psf.shape}"
        )
    if not np.all(np.isfinite(psf)):
        raise TfhybridInputError("psf contains NaN or inf values")
    if pixel_scale_arcsec is None:
        raise TfhybridInputError("pixel_scale_arcsec is required")
    from tfhybrid.validation import as_arcsec

    scale = as_arcsec("pixel_scale_arcsec", pixel_scale_arcsec)
    if scale <= 0:
        raise TfhybridInputError(f"pixel_scale_arcsec must be > 0 arcsec; got {scale}")
    if noise_sigma is None:
        raise TfhybridInputError("noise_sigma is required (a number or one value per stamp)")
    sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise TfhybridInputError("noise_sigma must be finite and >= 0")

    columns = dict(params or {})
    columns["noise_sigma"] = sigma
    table_cols = []
    for name, values in columns.items():
        arr = np.asarray(values)
        if arr.shape != (n,):
            raise TfhybridInputError(
                f"parameter {name!r} must have shape ({n},), one value per stamp; got {arr.shape}"
            )
        if arr.dtype.kind == "f":
            fmt, arr = "D", arr.astype(np.float64)
        elif arr.dtype.kind in "iub":
            fmt, arr = "K", arr.astype(np.int64)
        elif arr.dtype.kind in "US":
            width = max(1, int(max((len(str(v)) for v in arr), default=1)))
            fmt, arr = f"{width}A", arr.astype(str)
        else:
            raise TfhybridInputError(
                f"parameter {name!r} has unsupported dtype {arr.dtype}; expected numbers or strings"
            )
        table_cols.append(fits.Column(name=name, format=fmt, array=arr, unit=PARAM_UNITS.get(name)))

    primary = fits.PrimaryHDU()
    h = primary.header
    h["FORMAT"] = (STAMPS_FORMAT, "file layout (see tfhybrid.data.fits_io)")
    h["FMTVER"] = (FORMAT_VERSION, "file layout version")
    h["TFHVER"] = (__version__, "tfhybrid version that wrote this file")
    _header_card(h, "SEED", None if seed is None else int(seed), "random seed of the simulation")
    h["PIXSCALE"] = (scale, "[arcsec] pixel side")
    _header_card(h, "PSFDESC", psf_description, "PSF description")
    h["NSTAMPS"] = (n, "number of stamps")
    h["STAMPNY"] = (ny, "[pixel] stamp height (axis y)")
    h["STAMPNX"] = (nx, "[pixel] stamp width (axis x)")
    h["BUNIT"] = ("electron/s", "stamp pixel values")
    for key, value in (header or {}).items():
        _provenance_card(h, key, value)

    hdus = [primary, fits.ImageHDU(images, name="IMAGES")]
    if noiseless is not None:
        hdus.append(fits.ImageHDU(noiseless, name="NOISELESS"))
    psf_hdu = fits.ImageHDU(psf, name="PSF")
    psf_hdu.header["PIXSCALE"] = (scale, "[arcsec] pixel side")
    hdus.append(psf_hdu)
    hdus.append(fits.BinTableHDU.from_columns(table_cols, name="PARAMS"))
    write_fits_atomic(path, fits.HDUList(hdus))
    return path


def _open_fits(path: Path):
    """Open ``path`` fully into memory, turning every astropy failure into one clear error."""
    from astropy.io import fits

    if not path.exists():
        raise TfhybridInputError(f"{path} does not exist")
    if path.is_dir():
        raise TfhybridInputError(f"{path} is a directory, not a FITS file")
    with open(path, "rb") as fh:
        start = fh.read(9)
    if start != b"SIMPLE  =":
        raise TfhybridInputError(f"{path} is not a FITS file (it does not start with SIMPLE =)")
    try:
        with warnings.catch_warnings():
            # A truncated file only warns at open time; make it an error we can report.
            warnings.simplefilter("error")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
            for hdu in hdul:
                _ = hdu.data
    except (OSError, ValueError, TypeError, IndexError, Warning) as err:
        raise TfhybridInputError(
            f"{path} is not a readable FITS file (truncated or corrupt?): {err}"
        ) from err
    return hdul


def _image_extension(hdul, path: Path, name: str, rank: tuple[int, ...]) -> np.ndarray:
    if name not in hdul:
        have = ", ".join(h.name for h in hdul)
        raise TfhybridInputError(f"{path} has no {name} extension (extensions: {have})")
    data = hdul[name].data
    if data is None or data.ndim not in rank:
        shape = None if data is None else data.shape
        raise TfhybridInputError(
            f"{path}: extension {name} must be an image of rank {' or '.join(map(str, rank))}; "
            f"got shape {shape}"
        )
    arr = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise TfhybridInputError(f"{path}: extension {name} contains {n_bad} NaN/inf pixel(s)")
    return arr


def read_stamps_fits(path: str | os.PathLike) -> GalaxyStamps:
    """Read a stamp file written by ``write_stamps_fits``, validating its format.

    Parameters
    ----------
    path : str or PathLike
        FITS file.

    Returns
    -------
    GalaxyStamps
        ``images`` (n, ny, nx) float32 (y, x); ``noiseless`` or None; ``noise_sigma`` (n,)
        float32; ``psf`` (py, px), or (n, py, px) for files with one PSF per stamp;
        ``pixel_scale_arcsec``; ``params`` every PARAMS column as an (n,) array (strings
        included, e.g. COSMOS identifiers).

    Raises
    ------
    TfhybridInputError
        If the file is missing, not FITS, truncated or corrupt, lacks an extension, has
        inconsistent shapes or NaN/inf pixels.
    """
    path = Path(path)
    hdul = _open_fits(path)
    with hdul:
        header = hdul[0].header
        if header.get("FORMAT") != STAMPS_FORMAT:
            raise TfhybridInputError(
                f"{path} is not a tfhybrid stamp file (FORMAT={header.get('FORMAT')!r}, "
                f"expected {STAMPS_FORMAT!r})"
            )
        if header.get("FMTVER") != FORMAT_VERSION:
            raise TfhybridInputError(
                f"{path} has format version {header.get('FMTVER')!r}; this tfhybrid reads "
                f"version {FORMAT_VERSION}"
            )
        images = _image_extension(hdul, path, "IMAGES", (3,))
        n = images.shape[0]
        noiseless = None
        if "NOISELESS" in hdul:
            noiseless = _image_extension(hdul, path, "NOISELESS", (3,))
            if noiseless.shape != images.shape:
                raise TfhybridInputError(
                    f"{path}: NOISELESS has shape {noiseless.shape} but IMAGES has {images.shape}"
                )
        psf = _image_extension(hdul, path, "PSF", (2, 3))
        if psf.ndim == 3 and psf.shape[0] != n:
            raise TfhybridInputError(
                f"{path}: PSF cube has {psf.shape[0]} planes but IMAGES has {n} stamps"
            )
        if "PARAMS" not in hdul:
            raise TfhybridInputError(f"{path} has no PARAMS extension")
        table = hdul["PARAMS"].data
        if table is None or len(table) != n:
            rows = 0 if table is None else len(table)
            raise TfhybridInputError(f"{path}: PARAMS has {rows} rows but IMAGES has {n} stamps")
        params = {}
        for name in table.columns.names:
            col = np.asarray(table[name])
            params[name] = col.astype(str) if col.dtype.kind in "SU" else col.copy()
        if "noise_sigma" not in params:
            raise TfhybridInputError(f"{path}: PARAMS has no noise_sigma column")
        scale = header.get("PIXSCALE")
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise TfhybridInputError(f"{path}: header PIXSCALE must be > 0 arcsec; got {scale!r}")
        for key, expect in (("NSTAMPS", n), ("STAMPNY", images.shape[1]),
                            ("STAMPNX", images.shape[2])):
            if header.get(key, expect) != expect:
                raise TfhybridInputError(
                    f"{path}: header {key}={header.get(key)} does not match IMAGES shape "
                    f"{images.shape}"
                )
    sigma = np.asarray(params["noise_sigma"], dtype=np.float32)
    return GalaxyStamps(
        images=images,
        noiseless=noiseless,
        noise_sigma=sigma,
        psf=psf,
        pixel_scale_arcsec=float(scale),
        params=params,
    )


def read_stamps_header(path: str | os.PathLike) -> dict:
    """Provenance keywords of a stamp or image-set file's primary header, as a dict."""
    path = Path(path)
    with _open_fits(path) as hdul:
        return {k: v for k, v in hdul[0].header.items() if k not in ("COMMENT", "HISTORY", "")}


def write_image_sets_fits(
    path: str | os.PathLike,
    sets: Mapping[str, np.ndarray],
    *,
    tables: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    header: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write named image sets (e.g. train / validation / test) to one FITS file, atomically.

    Parameters
    ----------
    path : str or PathLike
        Output file.
    sets : mapping of str to np.ndarray
        Set name (extension name, upper-cased) -> (n_set, ny, nx) images, axis order (y, x).
        Empty sets (n_set = 0) are allowed.
    tables : mapping of str to mapping of str to (n_set,) arrays, optional
        Per-image columns of each set (set name -> column name -> values), written as
        ``<NAME>_TABLE`` binary tables (e.g. ``index``, ``noise_sigma``).
    header : mapping, optional
        Provenance for the primary header (``key -> value`` or ``key -> (value, comment)``).
    overwrite : bool
        Replace an existing file.
    """
    from astropy.io import fits

    from tfhybrid import __version__
    from tfhybrid.io import write_fits_atomic

    path = Path(path)
    _check_overwrite(path, overwrite)
    if not sets:
        raise TfhybridInputError("sets is empty: nothing to write")
    primary = fits.PrimaryHDU()
    primary.header["FORMAT"] = (IMAGE_SETS_FORMAT, "file layout (see tfhybrid.data.fits_io)")
    primary.header["FMTVER"] = (FORMAT_VERSION, "file layout version")
    primary.header["TFHVER"] = (__version__, "tfhybrid version that wrote this file")
    primary.header["SETS"] = (",".join(s.upper() for s in sets), "image-set extensions")
    for key, value in (header or {}).items():
        _provenance_card(primary.header, key, value)
    hdus = [primary]
    for name, images in sets.items():
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim != 3:
            raise TfhybridInputError(f"set {name!r} must have shape (n, ny, nx); got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise TfhybridInputError(f"set {name!r} contains NaN or inf values")
        # FITS cannot hold a zero-length axis: an empty set keeps its stamp shape in the header.
        hdu = fits.ImageHDU(arr if arr.shape[0] else None, name=name.upper())
        hdu.header["NSET"] = (arr.shape[0], "number of images in this set")
        hdu.header["SETNY"] = (arr.shape[1], "[pixel] image height (axis y)")
        hdu.header["SETNX"] = (arr.shape[2], "[pixel] image width (axis x)")
        hdus.append(hdu)
        if tables is not None and tables.get(name):
            cols = []
            for col_name, values in tables[name].items():
                col = np.asarray(values)
                if col.shape != (arr.shape[0],):
                    raise TfhybridInputError(
                        f"column {col_name!r} of set {name!r} must have shape ({arr.shape[0]},), "
                        f"one value per image; got {col.shape}"
                    )
                fmt = "K" if col.dtype.kind in "iub" else "D"
                cols.append(fits.Column(name=col_name, format=fmt, array=col.astype(
                    np.int64 if fmt == "K" else np.float64), unit=PARAM_UNITS.get(col_name)))
            hdus.append(fits.BinTableHDU.from_columns(cols, name=f"{name.upper()}_TABLE"))
    write_fits_atomic(path, fits.HDUList(hdus))
    return path


def read_image_sets_fits(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the image sets of a file written by ``write_image_sets_fits``.

    Returns
    -------
    dict
        Lower-case set name -> (n_set, ny, nx) float32 images, in file order, and for sets with
        a table, ``"<set>_<column>"`` -> (n_set,) array (e.g. ``train_index``,
        ``train_noise_sigma``: the layout of ``make_lensing_training_set``'s output).
    """
    path = Path(path)
    with _open_fits(path) as hdul:
        header = hdul[0].header
        if header.get("FORMAT") != IMAGE_SETS_FORMAT:
            raise TfhybridInputError(
                f"{path} is not a tfhybrid image-set file (FORMAT={header.get('FORMAT')!r})"
            )
        names = [s for s in str(header.get("SETS", "")).split(",") if s]
        if not names:
            raise TfhybridInputError(f"{path}: header SETS lists no image sets")
        out = {}
        for name in names:
            if name not in hdul:
                raise TfhybridInputError(f"{path} has no {name} extension")
            hdr = hdul[name].header
            if hdr.get("NSET") == 0:
                out[name.lower()] = np.zeros((0, hdr["SETNY"], hdr["SETNX"]), np.float32)
            else:
                out[name.lower()] = _image_extension(hdul, path, name, (3,))
            n_set = len(out[name.lower()])
            if f"{name}_TABLE" in hdul:
                table = hdul[f"{name}_TABLE"].data
                rows = 0 if table is None else len(table)
                if rows != n_set:
                    raise TfhybridInputError(
                        f"{path}: {name}_TABLE has {rows} rows but {name} has {n_set} images"
                    )
                for col in [] if table is None else table.columns.names:
                    out[f"{name.lower()}_{col}"] = np.asarray(table[col]).copy()
    return out
