"""Reader for GalSim's COSMOS real-galaxy release (HST/ACS F814W postage stamps).

The lensing paper (section 2.2) trains its VAE on the 56 062 COSMOS galaxies of the GREAT3
challenge, distributed by GalSim as the "25.2" training sample. ``galsim_download_cosmos -s 25.2
-d DIR`` unpacks it into ``DIR/COSMOS_25.2_training_sample``, which holds

* ``real_galaxy_catalog_25.2.fits``: the real-galaxy catalog, one row per galaxy (IDENT, MAG,
  GAL_FILENAME / GAL_HDU, PSF_FILENAME / PSF_HDU, PIXEL_SCALE, NOISE_VARIANCE, ...);
* ``real_galaxy_catalog_25.2_fits.fits``: the parametric (Sérsic, bulge + disk) fits, row for
  row the same galaxies (``fit_status``, ``sersicfit``, ``hlr``, ``flux``, ...);
* ``real_galaxy_catalog_25.2_selection.fits``: the quality-cut quantities of GalSim's
  ``COSMOSCatalog(exclusion_level=...)``;
* the galaxy and PSF image files named in GAL_FILENAME / PSF_FILENAME, one image HDU per galaxy
  at index GAL_HDU / PSF_HDU (0-based, the primary HDU counts).

GalSim's 100-galaxy example release (``real_galaxy_catalog_23.5_example*.fits``) and the full
23.5 sample use the same layout and are read the same way.

Conventions: images are returned as float32 arrays with axis order (y, x), flux in the
catalog's units (e-/s per 0.03″ pixel for COSMOS), as stored (no background or noise
processing). Galaxy ``i`` is row ``i`` of the catalog.

Validation happens once, at the boundary: ``read_cosmos_catalog`` checks the catalog files and
their columns; ``galaxy_image`` / ``psf_image`` check the image HDU they read (file present and
readable, HDU index in range, 2-d, finite). Every failure raises :class:`COSMOSDataError`, whose
message names the file (full path) and says how to obtain the data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from tfhybrid.validation import TfhybridInputError

#: Samples recognised by ``read_cosmos_catalog``, in autodetection order.
COSMOS_SAMPLES = ("25.2", "23.5", "23.5_example")

#: Columns of the real-galaxy catalog this reader needs.
REQUIRED_CATALOG_COLUMNS = (
    "IDENT",
    "GAL_FILENAME",
    "GAL_HDU",
    "PSF_FILENAME",
    "PSF_HDU",
    "PIXEL_SCALE",
    "NOISE_VARIANCE",
)

#: Columns of the parametric-fit catalog (``*_fits.fits``) this reader needs.
REQUIRED_FIT_COLUMNS = ("IDENT", "fit_status", "sersicfit", "hlr", "flux")

DOWNLOAD_HINT = (
    "Obtain the COSMOS data with GalSim's script `galsim_download_cosmos -s 25.2 -d DIR` and "
    "pass DIR/COSMOS_25.2_training_sample (the directory that holds "
    "real_galaxy_catalog_25.2.fits), or pass a directory holding GalSim's example release "
    "(real_galaxy_catalog_23.5_example.fits)."
)


class COSMOSDataError(TfhybridInputError):
    """Missing or malformed COSMOS data: the message names the file and how to get the data."""


def _error(message: str, path: str | os.PathLike | None = None) -> COSMOSDataError:
    where = f" ({Path(path).resolve()})" if path is not None else ""
    return COSMOSDataError(f"{message}{where}. {DOWNLOAD_HINT}")


def catalog_file_names(sample: str) -> dict[str, str]:
    """File names of the three catalog files of a sample (e.g. ``"25.2"``)."""
    stem = f"real_galaxy_catalog_{sample}"
    return {
        "catalog": f"{stem}.fits",
        "parametric": f"{stem}_fits.fits",
        "selection": f"{stem}_selection.fits",
    }


def _read_table(path: Path, what: str, required: Iterable[str]):
    """Read the first binary table of a FITS file, checking that ``required`` columns exist."""
    from astropy.io import fits
    from astropy.table import Table

    if not path.is_file():
        raise _error(f"COSMOS {what} file not found", path)
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise _error(f"COSMOS {what} file has no binary table HDU", path)
            table = Table(hdu.data, copy=True)
    except COSMOSDataError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError) as err:
        raise _error(f"COSMOS {what} file is unreadable or truncated: {err}", path) from err
    missing = [c for c in required if c not in table.colnames]
    if missing:
        raise _error(
            f"COSMOS {what} file lacks required column(s) {missing}; it has {table.colnames}", path
        )
    return table


def _as_str(values) -> np.ndarray:
    """FITS string column (bytes or str, possibly padded) -> array of stripped str."""
    return np.array(
        [v.decode("ascii") if isinstance(v, bytes) else str(v) for v in np.asarray(values)],
        dtype=object,
    ).astype(str)


class COSMOSCatalog:
    """Lazy view of a COSMOS real-galaxy release on disk.

    Build it with :func:`read_cosmos_catalog`. Images are read on demand from memory-mapped
    FITS files; open files are cached in the instance (call :meth:`close`, or use it as a
    context manager, to release them).

    Attributes
    ----------
    directory : pathlib.Path
        Directory holding the catalog files.
    sample : str
        ``"25.2"``, ``"23.5"`` or ``"23.5_example"``.
    catalog : astropy.table.Table
        The real-galaxy catalog, one row per galaxy.
    parametric : astropy.table.Table
        The parametric fits, row ``i`` = galaxy ``i`` (IDENT checked to match).
    selection : astropy.table.Table or None
        The quality-cut table (None if the ``_selection.fits`` file is absent).
    ident : np.ndarray
        (n,) int64 COSMOS identifiers.
    mag : np.ndarray
        (n,) float64 F814W magnitudes (NaN if the catalog has no MAG column).
    pixel_scale_arcsec : np.ndarray
        (n,) float64 pixel side of each galaxy's stamp, arcsec.
    noise_variance : np.ndarray
        (n,) float64 pixel-noise variance of each stamp (image units squared).
    noise_sigma : np.ndarray
        (n,) float64 ``sqrt(noise_variance)``.
    """

    def __init__(self, directory: Path, sample: str, catalog, parametric, selection) -> None:
        self.directory = directory
        self.sample = sample
        self.catalog = catalog
        self.parametric = parametric
        self.selection = selection
        self.ident = np.asarray(catalog["IDENT"], dtype=np.int64)
        self.mag = (
            np.asarray(catalog["MAG"], dtype=np.float64)
            if "MAG" in catalog.colnames
            else np.full(len(catalog), np.nan)
        )
        self.pixel_scale_arcsec = np.asarray(catalog["PIXEL_SCALE"], dtype=np.float64)
        self.noise_variance = np.asarray(catalog["NOISE_VARIANCE"], dtype=np.float64)
        self.noise_sigma = np.sqrt(self.noise_variance)
        self._gal_file = _as_str(catalog["GAL_FILENAME"])
        self._psf_file = _as_str(catalog["PSF_FILENAME"])
        self._gal_hdu = np.asarray(catalog["GAL_HDU"], dtype=np.int64)
        self._psf_hdu = np.asarray(catalog["PSF_HDU"], dtype=np.int64)
        self._open: dict[Path, object] = {}

    def __len__(self) -> int:
        return int(len(self.ident))

    def __repr__(self) -> str:
        return f"COSMOSCatalog(sample={self.sample!r}, n={len(self)}, directory='{self.directory}')"

    def __enter__(self) -> COSMOSCatalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every cached FITS file."""
        for hdul in self._open.values():
            hdul.close()
        self._open.clear()

    def image_files(self) -> list[Path]:
        """Full paths of all galaxy and PSF image files the catalog refers to."""
        names = sorted(set(self._gal_file) | set(self._psf_file))
        return [self.directory / n for n in names]

    def missing_files(self) -> list[Path]:
        """Image files referred to by the catalog that do not exist."""
        return [p for p in self.image_files() if not p.is_file()]

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TfhybridInputError(f"galaxy index must be an integer; got {i!r}")
        n = len(self)
        if not -n <= i < n:
            raise TfhybridInputError(f"galaxy index {i} out of range for {n} galaxies")
        return int(i) % n

    def _hdulist(self, path: Path):
        from astropy.io import fits

        hdul = self._open.get(path)
        if hdul is None:
            if not path.is_file():
                raise _error("COSMOS image file named in the catalog not found", path)
            try:
                hdul = fits.open(path, memmap=True, lazy_load_hdus=True)
            except (OSError, ValueError, TypeError) as err:
                raise _error(f"COSMOS image file is unreadable: {err}", path) from err
            self._open[path] = hdul
        return hdul

    def _read_hdu(self, file_name: str, hdu: int, what: str, i: int) -> np.ndarray:
        path = self.directory / file_name
        hdul = self._hdulist(path)
        if hdu < 0:
            raise _error(f"{what} HDU index {hdu} of galaxy {i} is negative in file", path)
        try:
            data = hdul[hdu].data
        except IndexError as err:
            n_hdu = _count_hdus(hdul)
            raise _error(
                f"{what} HDU {hdu} of galaxy {i} (IDENT {self.ident[i]}) is out of range: the "
                f"file has {n_hdu} HDU(s) (it may be truncated or the wrong file)",
                path,
            ) from err
        except (OSError, ValueError, TypeError) as err:
            raise _error(f"{what} HDU {hdu} of galaxy {i} is unreadable: {err}", path) from err
        if data is None or np.ndim(data) != 2:
            shape = None if data is None else np.shape(data)
            raise _error(
                f"{what} HDU {hdu} of galaxy {i} is not a 2-d image (data shape {shape}) in file",
                path,
            )
        try:
            image = np.array(data, dtype=np.float32)
        except (OSError, ValueError, TypeError) as err:
            raise _error(f"{what} HDU {hdu} of galaxy {i} is unreadable: {err}", path) from err
        n_bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if n_bad:
            raise _error(
                f"{what} HDU {hdu} of galaxy {i} (IDENT {self.ident[i]}) holds {n_bad} "
                f"non-finite pixel(s) (NaN or inf) in file",
                path,
            )
        return image

    def galaxy_image(self, i: int) -> np.ndarray:
        """Galaxy ``i``'s HST stamp, (ny, nx) float32, axis order (y, x), as stored."""
        i = self._index(i)
        return self._read_hdu(self._gal_file[i], int(self._gal_hdu[i]), "galaxy image", i)

    def psf_image(self, i: int) -> np.ndarray:
        """Galaxy ``i``'s PSF image, (py, px) float32, axis order (y, x), as stored."""
        i = self._index(i)
        return self._read_hdu(self._psf_file[i], int(self._psf_hdu[i]), "PSF image", i)

    def iter_galaxies(self, indices: Iterable[int] | None = None) -> Iterator[dict]:
        """Yield one dict per galaxy, in the order of ``indices`` (default: all).

        Keys: ``image`` (ny, nx) float32, ``psf`` (py, px) float32, ``noise_sigma`` (float,
        image units), ``pixel_scale_arcsec`` (float), ``ident`` (int), ``index`` (int, row).
        """
        if indices is None:
            indices = range(len(self))
        for i in indices:
            i = self._index(i)
            yield {
                "image": self.galaxy_image(i),
                "psf": self.psf_image(i),
                "noise_sigma": float(self.noise_sigma[i]),
                "pixel_scale_arcsec": float(self.pixel_scale_arcsec[i]),
                "ident": int(self.ident[i]),
                "index": i,
            }


def _count_hdus(hdul) -> int:
    try:
        return len(hdul)
    except (OSError, ValueError, TypeError, IndexError):
        return -1


def _resolve_directory(directory: str | os.PathLike, sample: str | None) -> tuple[Path, str]:
    """Find the folder holding the catalog and the sample it holds."""
    if directory is None:
        raise _error("no COSMOS directory given (directory=None)")
    root = Path(directory).expanduser()
    if not root.exists():
        raise _error("COSMOS directory does not exist", root)
    if not root.is_dir():
        raise _error("COSMOS path is not a directory", root)
    if sample is not None and sample not in COSMOS_SAMPLES:
        raise TfhybridInputError(f"sample must be one of {COSMOS_SAMPLES} or None; got {sample!r}")
    samples = COSMOS_SAMPLES if sample is None else (sample,)
    for s in samples:
        # galsim_download_cosmos -d DIR unpacks into DIR/COSMOS_<sample>_training_sample.
        for folder in (root, root / f"COSMOS_{s}_training_sample"):
            if (folder / catalog_file_names(s)["catalog"]).is_file():
                return folder, s
    want = ", ".join(catalog_file_names(s)["catalog"] for s in samples)
    raise _error(f"no COSMOS real-galaxy catalog ({want}) found in directory", root)


def read_cosmos_catalog(directory: str | os.PathLike, sample: str | None = None) -> COSMOSCatalog:
    """Open a COSMOS real-galaxy release written by ``galsim_download_cosmos``.

    Parameters
    ----------
    directory : str or os.PathLike
        The directory holding ``real_galaxy_catalog_<sample>.fits``, or the directory given
        to ``galsim_download_cosmos -d`` (its ``COSMOS_<sample>_training_sample`` subfolder is
        searched too).
    sample : {"25.2", "23.5", "23.5_example"} or None
        None: the first of these whose catalog exists, in that order.

    Returns
    -------
    COSMOSCatalog
        Catalog tables loaded; images are read lazily.

    Raises
    ------
    COSMOSDataError
        Directory or catalog file missing, unreadable or truncated; required columns missing;
        parametric catalog not row-aligned with the real-galaxy catalog; non-positive pixel
        scales, negative noise variances or HDU indices. Missing image files are reported when
        an image is first read (see ``COSMOSCatalog.missing_files`` to check them up front).
    """
    folder, sample = _resolve_directory(directory, sample)
    names = catalog_file_names(sample)
    catalog = _read_table(
        folder / names["catalog"], "real-galaxy catalog", REQUIRED_CATALOG_COLUMNS
    )
    parametric = _read_table(
        folder / names["parametric"], "parametric-fit catalog", REQUIRED_FIT_COLUMNS
    )
    selection_path = folder / names["selection"]
    selection = (
        _read_table(selection_path, "selection catalog", ("IDENT",))
        if selection_path.exists()
        else None
    )
    cat_path = folder / names["catalog"]
    if len(catalog) == 0:
        raise _error("COSMOS real-galaxy catalog has no rows", cat_path)
    ident = np.asarray(catalog["IDENT"], dtype=np.int64)
    for table, file_name in ((parametric, names["parametric"]), (selection, names["selection"])):
        if table is None:
            continue
        other = np.asarray(table["IDENT"], dtype=np.int64)
        if other.shape != ident.shape or not np.array_equal(other, ident):
            raise _error(
                f"rows of {file_name} do not match the real-galaxy catalog {names['catalog']} "
                f"({len(other)} vs {len(ident)} rows, IDENT columns differ)",
                folder / file_name,
            )
    scale = np.asarray(catalog["PIXEL_SCALE"], dtype=np.float64)
    if not np.all(np.isfinite(scale) & (scale > 0) & (scale < 10)):
        raise _error(
            "PIXEL_SCALE column must hold finite pixel sides in (0, 10) arcsec; got range "
            f"[{np.nanmin(scale):g}, {np.nanmax(scale):g}] in file",
            cat_path,
        )
    var = np.asarray(catalog["NOISE_VARIANCE"], dtype=np.float64)
    if not np.all(np.isfinite(var) & (var >= 0)):
        raise _error("NOISE_VARIANCE column must hold finite values >= 0 in file", cat_path)
    for col in ("GAL_HDU", "PSF_HDU"):
        if np.any(np.asarray(catalog[col]) < 0):
            raise _error(f"{col} column holds negative HDU indices in file", cat_path)
    return COSMOSCatalog(folder, sample, catalog, parametric, selection)
