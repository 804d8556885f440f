"""Test helper: GalSim's real 100-galaxy COSMOS example release, completed with an image file.

``/work/shared/data/galsim_cosmos_example`` (found relative to the repository, or through the
``TFHYBRID_COSMOS_EXAMPLE`` environment variable) holds the real catalog, parametric-fit and
selection tables and the 100 real HST PSF images, but not the galaxy image file the catalog names
(``real_galaxy_images.fits``). :func:`make_cosmos_dir` links the real files into a temporary
folder and writes that galaxy file there in the layout of ``galsim_download_cosmos``: one image
HDU per galaxy, galaxy ``i`` at HDU ``GAL_HDU[i]`` (0-based, the primary HDU holds the first).
The real files are never copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

EXAMPLE_DIR = Path(
    os.environ.get(
        "TFHYBRID_COSMOS_EXAMPLE",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "galsim_cosmos_example",
    )
)
CATALOG = "real_galaxy_catalog_23.5_example.fits"
REAL_FILES = (
    CATALOG,
    "real_galaxy_catalog_23.5_example_fits.fits",
    "real_galaxy_catalog_23.5_example_selection.fits",
    "real_galaxy_PSF_images.fits",
)

requires_cosmos_example = pytest.mark.skipif(
    not all((EXAMPLE_DIR / f).is_file() for f in REAL_FILES),
    reason=f"GalSim's COSMOS example release not found at {EXAMPLE_DIR}",
)


def galaxy_shape(i: int) -> tuple[int, int]:
    """Stamp shape written for galaxy ``i``: varied, non-square, some below 64 pixels."""
    return 40 + (17 * i) % 61, 44 + (29 * i) % 57


def make_galaxy_images(catalog) -> list[np.ndarray]:
    """One float32 stamp per catalog row: a Gaussian blob of the row's ``stamp_flux`` plus white
    noise of its ``NOISE_VARIANCE`` (seeded by the row index)."""
    images = []
    for i in range(len(catalog)):
        ny, nx = galaxy_shape(i)
        rng = np.random.default_rng(i)
        y, x = np.indices((ny, nx))
        r2 = (y - ny // 2) ** 2 + (x - nx // 2) ** 2
        blob = np.exp(-0.5 * r2 / 4.0**2)
        blob *= float(catalog["stamp_flux"][i]) / blob.sum()
        noise = np.sqrt(float(catalog["NOISE_VARIANCE"][i])) * rng.standard_normal((ny, nx))
        images.append((blob + noise).astype(np.float32))
    return images


def make_cosmos_dir(target: Path) -> tuple[Path, list[np.ndarray]]:
    """Link the real example files into ``target`` and write its galaxy image file.

    Returns (``target``, the list of galaxy stamps written, in catalog row order).
    """
    from astropy.io import fits

    target.mkdir(parents=True, exist_ok=True)
    for name in REAL_FILES:
        (target / name).symlink_to((EXAMPLE_DIR / name).resolve())
    catalog = fits.getdata(EXAMPLE_DIR / CATALOG, 1)
    images = make_galaxy_images(catalog)
    hdus = [None] * len(images)
    for i, hdu_index in enumerate(np.asarray(catalog["GAL_HDU"])):
        hdus[int(hdu_index)] = images[i]
    assert all(h is not None for h in hdus), "GAL_HDU is not a permutation of the rows"
    hdul = fits.HDUList(
        [fits.PrimaryHDU(hdus[0])] + [fits.ImageHDU(im) for im in hdus[1:]]
    )
    names = {str(n).strip() for n in catalog["GAL_FILENAME"]}
    assert len(names) == 1, names
    hdul.writeto(target / names.pop())
    return target, images
