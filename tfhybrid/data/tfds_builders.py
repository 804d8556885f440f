"""TensorFlow Datasets builders for tfhybrid's galaxy samples, usable fully offline.

Importing this module registers two builders with ``tensorflow_datasets``:

* ``tfhybrid_simulated_galaxies`` (``SimulatedGalaxies``): GalSim bulge + disk + knots
  galaxies from ``tfhybrid.data.simulate.simulate_galaxy_stamps``, generated locally;
* ``tfhybrid_cosmos_galaxies`` (``COSMOSGalaxies``): the real COSMOS F814W postage stamps of
  GalSim's release, read with ``tfhybrid.data.cosmos`` from a manually downloaded copy.

Neither downloads anything: GCS look-ups are off (``try_gcs=False``) and the builders have no
URLs. After a build, ``tfds.load("tfhybrid_simulated_galaxies/hsc32", data_dir=...)`` reads the
prepared files (split sizes come from the ``dataset_info.json`` written by the build)::

    import tensorflow_datasets as tfds
    import tfhybrid.data.tfds_builders  # registers the builders
    from tfhybrid.data.tfds_builders import build_simulated_dataset

    build_simulated_dataset("/data/tfds", config="hsc32", n_train=2000, n_validation=200,
                            n_test=200, seed=1)
    ds = tfds.load("tfhybrid_simulated_galaxies/hsc32", split="train", data_dir="/data/tfds")

A data directory holds one build per (builder, config, version); to rebuild with other sizes,
use another ``data_dir`` (an existing build is never regenerated).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.resources.abc
import os
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from tfhybrid.data.preprocess import matched_filter_snr
from tfhybrid.data.simulate import (
    HST_PIXEL_SCALE_ARCSEC,
    PARAM_NAMES,
    draw_psf_image,
    make_psf,
    simulate_galaxy_stamps,
)
from tfhybrid.validation import TfhybridInputError

# tensorflow-datasets 4.9.10 uses the `importlib_resources` backport unconditionally when it
# locates a builder's code (`DatasetBuilder.code_path`) but only requires it on Python < 3.9.
# The standard library module has the same API (`abc.Traversable` included) on Python >= 3.11.
try:
    import importlib_resources  # noqa: F401
except ModuleNotFoundError:
    sys.modules["importlib_resources"] = importlib.resources

#: Source parameters stored as scalar features (float32, except ``n_knots`` int32).
SOURCE_FEATURES = tuple(p for p in PARAM_NAMES if p not in ("noise_sigma", "knot_seed"))

#: Stamps simulated per call while generating a split (bounds memory for large splits).
GENERATION_BLOCK = 1024

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class SimulatedGalaxiesConfig(tfds.core.BuilderConfig):
    """Configuration of ``SimulatedGalaxies``: imaging set-up and default split sizes.

    Attributes
    ----------
    stamp_size : int
        Stamp side, pixels.
    pixel_scale_arcsec : float
        Pixel side, arcsec.
    psf_fwhm_arcsec : float or None
        None: the ACS-like HST PSF of ``tfhybrid.data.simulate``; otherwise a Gaussian (or Moffat
        with ``moffat_beta``) of this FWHM, arcsec.
    moffat_beta : float or None
        Moffat index of the PSF (None: Gaussian).
    noise_sigma : float or None
        Per-pixel noise sigma (e-/s); None: COSMOS F814W depth scaled to the pixel size.
    n_train, n_validation, n_test : int
        Default split sizes (override with the builder's keyword arguments).
    seed : int
        Base random seed; each split and block of ``GENERATION_BLOCK`` stamps gets its own seed
        derived from it, so splits are independent and the build is reproducible.
    """

    stamp_size: int = 64
    pixel_scale_arcsec: float = HST_PIXEL_SCALE_ARCSEC
    psf_fwhm_arcsec: float | None = None
    moffat_beta: float | None = None
    noise_sigma: float | None = None
    n_train: int = 10000
    n_validation: int = 1000
    n_test: int = 1000
    seed: int = 0

    def psf_image(self) -> np.ndarray:
        """(py, px) float32 unit-sum PSF image of this configuration (pixel response included)."""
        return draw_psf_image(make_psf(self.psf_fwhm_arcsec, self.moffat_beta),
                              self.pixel_scale_arcsec)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise TfhybridInputError(f"{name} must be an integer >= 0; got {value!r}")
    return int(value)


class SimulatedGalaxies(tfds.core.GeneratorBasedBuilder):
    """Simulated COSMOS-like galaxies (GalSim bulge + disk + knots), generated offline.

    Configs
    -------
    ``hst64``
        64 x 64 stamps at 0.03″/px with the ACS-like HST PSF and COSMOS F814W noise
        (default sizes 10000 / 1000 / 1000).
    ``hsc32``
        32 x 32 stamps at 0.168″/px (HSC-like) with a Gaussian PSF of FWHM 0.6″ and noise of the
        COSMOS depth scaled to the pixel (default sizes 2000 / 200 / 200).

    Splits ``train``, ``validation``, ``test`` (sizes from the config, or the ``n_train``,
    ``n_validation``, ``n_test`` keyword arguments; a split of size 0 is left out).

    Features (one example per galaxy)
    ---------------------------------
    ``image``
        (s, s, 1) float32 noisy stamp, axis order (y, x, channel), e-/s per pixel.
    ``noiseless``
        (s, s, 1) float32 stamp before noise.
    ``psf``
        (p, p) float32 unit-sum PSF image at the stamp's pixel scale (the same for every
        example of a config; stored per example so that each example is self-contained).
    ``noise_sigma``
        float32 per-pixel Gaussian noise sigma, e-/s.
    ``snr``
        float32 matched-filter S/N of the noiseless stamp, ``sqrt(sum(noiseless**2)) / sigma``
        (inf when sigma = 0).
    ``pixel_scale_arcsec``
        float32 pixel side, arcsec.
    source parameters (``SOURCE_FEATURES``)
        float32 scalars ``flux`` (e-/s), ``mag``, ``hlr_arcsec`` (circularised half-light radius
        of the total profile before PSF, arcsec), ``bulge_fraction``, ``bulge_hlr_arcsec``,
        ``disk_hlr_arcsec``, ``bulge_q``, ``disk_q``, ``bulge_beta_rad``, ``disk_beta_rad``
        (position angles, radians counter-clockwise from +x), ``knot_fraction``; int32
        ``n_knots``.

    Parameters
    ----------
    n_train, n_validation, n_test : int, optional
        Split sizes overriding the config's (used only when generating).
    seed : int, optional
        Base seed overriding the config's.
    num_workers : int, optional
        Processes used by ``simulate_galaxy_stamps`` (None: its default).
    **kwargs
        ``data_dir``, ``config``, ``version``, ``file_format`` of ``tfds.core.DatasetBuilder``.
    """

    name = "tfhybrid_simulated_galaxies"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: bulge + disk + knots GalSim galaxies."}
    BUILDER_CONFIGS = [
        SimulatedGalaxiesConfig(
            name="hst64",
            description="64x64 stamps at 0.03 arcsec/px, ACS-like HST PSF, COSMOS F814W noise",
        ),
        SimulatedGalaxiesConfig(
            name="hsc32",
            description="32x32 stamps at 0.168 arcsec/px, Gaussian PSF of FWHM 0.6 arcsec",
            stamp_size=32,
            pixel_scale_arcsec=0.168,
            psf_fwhm_arcsec=0.6,
            n_train=2000,
            n_validation=200,
            n_test=200,
        ),
    ]
    DEFAULT_CONFIG_NAME = "hsc32"

    def __init__(
        self,
        *,
        n_train: int | None = None,
        n_validation: int | None = None,
        n_test: int | None = None,
        seed: int | None = None,
        num_workers: int | None = None,
        **kwargs,
    ):
        self._split_overrides = {
            "train": None if n_train is None else _check_count("n_train", n_train),
            "validation": None if n_validation is None
            else _check_count("n_validation", n_validation),
            "test": None if n_test is None else _check_count("n_test", n_test),
        }
        self._seed_override = None if seed is None else _check_count("seed", seed)
        self._num_workers = num_workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        s = int(cfg.stamp_size)
        p = cfg.psf_image().shape[0]
        zlib = tfds.features.Encoding.ZLIB
        features = {
            "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.float32, encoding=zlib),
            "noiseless": tfds.features.Tensor(shape=(s, s, 1), dtype=np.float32, encoding=zlib),
            "psf": tfds.features.Tensor(shape=(p, p), dtype=np.float32, encoding=zlib),
            "noise_sigma": tfds.features.Tensor(shape=(), dtype=np.float32),
            "snr": tfds.features.Tensor(shape=(), dtype=np.float32),
            "pixel_scale_arcsec": tfds.features.Tensor(shape=(), dtype=np.float32),
        }
        for name in SOURCE_FEATURES:
            dtype = np.int32 if name == "n_knots" else np.float32
            features[name] = tfds.features.Tensor(shape=(), dtype=dtype)
        return self.dataset_info_from_configs(
            description=(
                "Simulated COSMOS-like galaxy stamps (GalSim bulge + disk + star-forming knots, "
                "population fitted to COSMOS F814W parametric fits), convolved with the PSF, "
                "with Gaussian pixel noise. See tfhybrid.data.simulate."
            ),
            features=tfds.features.FeaturesDict(features),
            supervised_keys=None,
            homepage="https://github.com/GalSim-developers/GalSim",
        )

    def split_sizes(self) -> dict[str, int]:
        """Number of examples each split will have when generated (config or overrides)."""
        cfg = self.builder_config
        sizes = {"train": cfg.n_train, "validation": cfg.n_validation, "test": cfg.n_test}
        for split, value in self._split_overrides.items():
            if value is not None:
                sizes[split] = value
        return sizes

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        sizes = self.split_sizes()
        if sum(sizes.values()) == 0:
            raise TfhybridInputError("all split sizes are 0: nothing to generate")
        seed = self.builder_config.seed if self._seed_override is None else self._seed_override
        return {
            split: self._generate_examples(split=split, n=n, seed=seed)
            for split, n in sizes.items()
            if n > 0
        }

    def _generate_examples(self, split: str, n: int, seed: int):
        cfg = self.builder_config
        for block, start in enumerate(range(0, n, GENERATION_BLOCK)):
            m = min(GENERATION_BLOCK, n - start)
            block_seed = int(
                np.random.SeedSequence([seed, _SPLIT_IDS[split], block]).generate_state(1)[0]
            )
            stamps = simulate_galaxy_stamps(
                m,
                block_seed,
                stamp_size=cfg.stamp_size,
                pixel_scale_arcsec=cfg.pixel_scale_arcsec,
                psf_fwhm_arcsec=cfg.psf_fwhm_arcsec,
                noise_sigma=cfg.noise_sigma,
                num_workers=self._num_workers,
                moffat_beta=cfg.moffat_beta,
            )
            snr = matched_filter_snr(stamps.noiseless, stamps.noise_sigma)
            for j in range(m):
                example = {
                    "image": stamps.images[j, :, :, None],
                    "noiseless": stamps.noiseless[j, :, :, None],
                    "psf": stamps.psf,
                    "noise_sigma": np.float32(stamps.noise_sigma[j]),
                    "snr": np.float32(snr[j]),
                    "pixel_scale_arcsec": np.float32(stamps.pixel_scale_arcsec),
                }
                for name in SOURCE_FEATURES:
                    dtype = np.int32 if name == "n_knots" else np.float32
                    example[name] = dtype(stamps.params[name][j])
                yield f"{split}_{start + j:08d}", example


@dataclasses.dataclass(eq=False)
class COSMOSGalaxiesConfig(tfds.core.BuilderConfig):
    """Configuration of ``COSMOSGalaxies``.

    Attributes
    ----------
    sample : str
        COSMOS release sample: ``"25.2"`` (F814W < 25.2, ~87 000 galaxies) or ``"23.5"``.
    max_galaxies : int or None
        Keep only the first ``max_galaxies`` galaxies (None: all).
    """

    sample: str = "25.2"
    max_galaxies: int | None = None


class COSMOSGalaxies(tfds.core.GeneratorBasedBuilder):
    """Real COSMOS HST/ACS F814W galaxy stamps and PSFs (GalSim's COSMOS release).

    The data must be downloaded by hand (see ``MANUAL_DOWNLOAD_INSTRUCTIONS``); the builder
    reads it from ``manual_dir`` with ``tfhybrid.data.cosmos.read_cosmos_catalog``.

    One split, ``train``, holding every galaxy in catalog order (slice it, e.g.
    ``split="train[:90%]"``). Stamps have varying sizes.

    Features
    --------
    ``image``
        (ny, nx, 1) float32 galaxy stamp (y, x, channel), e-/s per pixel; sizes vary.
    ``psf``
        (py, px) float32 PSF image of that galaxy.
    ``noise_sigma``
        float32 per-pixel noise sigma of the stamp, e-/s.
    ``pixel_scale_arcsec``
        float32 pixel side, arcsec (0.03 for COSMOS).
    ``ident``
        int64 COSMOS identifier.
    ``index``
        int64 row in the catalog.
    """

    name = "tfhybrid_cosmos_galaxies"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        COSMOSGalaxiesConfig(name="25.2", description="COSMOS F814W < 25.2 sample", sample="25.2"),
        COSMOSGalaxiesConfig(name="23.5", description="COSMOS F814W < 23.5 sample", sample="23.5"),
    ]
    DEFAULT_CONFIG_NAME = "25.2"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download GalSim's COSMOS release with the script installed by GalSim (about 4 GB for the
    25.2 sample, 0.3 GB for 23.5), e.g.

        galsim_download_cosmos -s 25.2 -d /path/to/manual_dir

    then pass the directory holding the catalog files (the one containing
    ``real_galaxy_catalog_25.2.fits``, e.g. ``/path/to/manual_dir/COSMOS_25.2_training_sample``)
    as ``manual_dir``:

        builder = COSMOSGalaxies(config="25.2", data_dir=...)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir="/path/to/...",
                                                         try_download_gcs=False))
    """

    def _info(self) -> tfds.core.DatasetInfo:
        zlib = tfds.features.Encoding.ZLIB
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(None, None, 1), dtype=np.float32,
                                              encoding=zlib),
                "psf": tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding=zlib),
                "noise_sigma": tfds.features.Tensor(shape=(), dtype=np.float32),
                "pixel_scale_arcsec": tfds.features.Tensor(shape=(), dtype=np.float32),
                "ident": tfds.features.Tensor(shape=(), dtype=np.int64),
                "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            }
        )
        return self.dataset_info_from_configs(
            description="COSMOS HST/ACS F814W galaxy postage stamps and PSFs (GalSim release).",
            features=features,
            homepage="https://github.com/GalSim-developers/GalSim/wiki/RealGalaxy%20Data",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

    def _generate_examples(self, directory: Path):
        from tfhybrid.data.cosmos import read_cosmos_catalog

        catalog = read_cosmos_catalog(directory, sample=self.builder_config.sample)
        n = len(catalog)
        if self.builder_config.max_galaxies is not None:
            n = min(n, int(self.builder_config.max_galaxies))
        for gal in catalog.iter_galaxies(indices=range(n)):
            yield int(gal["index"]), {
                "image": np.asarray(gal["image"], np.float32)[:, :, None],
                "psf": np.asarray(gal["psf"], np.float32),
                "noise_sigma": np.float32(gal["noise_sigma"]),
                "pixel_scale_arcsec": np.float32(gal["pixel_scale_arcsec"]),
                "ident": np.int64(gal["ident"]),
                "index": np.int64(gal["index"]),
            }


def offline_download_config(**kwargs) -> tfds.download.DownloadConfig:
    """``DownloadConfig`` that never touches the network (no GCS, no URL downloads)."""
    kwargs.setdefault("try_download_gcs", False)
    return tfds.download.DownloadConfig(**kwargs)


def build_simulated_dataset(
    data_dir: str | os.PathLike,
    config: str | SimulatedGalaxiesConfig = "hsc32",
    n_train: int | None = None,
    n_validation: int | None = None,
    n_test: int | None = None,
    seed: int | None = None,
    num_workers: int | None = None,
) -> SimulatedGalaxies:
    """Generate (if not already there) a ``tfhybrid_simulated_galaxies`` dataset, offline.

    Parameters
    ----------
    data_dir : str or PathLike
        TFDS data directory; the build goes to
        ``data_dir/tfhybrid_simulated_galaxies/<config>/<version>``.
    config : str or SimulatedGalaxiesConfig
        ``"hst64"``, ``"hsc32"`` or a custom config (a custom name cannot be found by
        ``tfds.load`` by name; read it with ``tfds.builder_from_directory``).
    n_train, n_validation, n_test : int, optional
        Split sizes (default: the config's).
    seed : int, optional
        Base seed (default: the config's).
    num_workers : int, optional
        Simulation processes.

    Returns
    -------
    SimulatedGalaxies
        The prepared builder (``builder.as_dataset(split=...)``).
    """
    names = [c.name for c in SimulatedGalaxies.BUILDER_CONFIGS]
    if isinstance(config, str) and config not in names:
        names = ", ".join(names)
        raise TfhybridInputError(f"unknown config {config!r}; expected one of {names}")
    builder = SimulatedGalaxies(
        data_dir=os.fspath(data_dir),
        config=config,
        n_train=n_train,
        n_validation=n_validation,
        n_test=n_test,
        seed=seed,
        num_workers=num_workers,
    )
    builder.download_and_prepare(download_config=offline_download_config())
    return builder
