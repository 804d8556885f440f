"""Tests of tfhybrid.data.tfds_builders: tiny offline builds read back with tfds.load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from tests.data.cosmos_example import make_cosmos_dir, requires_cosmos_example  # noqa: E402
from tfhybrid.data.simulate import simulate_galaxy_stamps  # noqa: E402
from tfhybrid.data.tfds_builders import (  # noqa: E402
    SOURCE_FEATURES,
    COSMOSGalaxies,
    SimulatedGalaxies,
    build_simulated_dataset,
    matched_filter_snr,
    offline_download_config,
)
from tfhybrid.validation import TfhybridInputError  # noqa: E402

#: Features of every simulated example, as documented in ``SimulatedGalaxies``.
DOCUMENTED = {"image", "noiseless", "psf", "noise_sigma", "snr", "pixel_scale_arcsec",
              *SOURCE_FEATURES}


@pytest.fixture(scope="module")
def simulated_build(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = build_simulated_dataset(data_dir, config="hsc32", n_train=5, n_validation=2,
                                      n_test=3, seed=7, num_workers=1)
    return data_dir, builder


def test_simulated_build_reads_back_with_tfds_load(simulated_build):
    data_dir, builder = simulated_build
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 5, "validation": 2, "test": 3}
    assert set(builder.info.features.keys()) == DOCUMENTED
    ds = tfds.load("tfhybrid_simulated_galaxies/hsc32", split="validation",
                   data_dir=str(data_dir), download=False)
    examples = list(tfds.as_numpy(ds))
    assert len(examples) == 2
    for ex in examples:
        assert set(ex) == DOCUMENTED
        assert ex["image"].shape == ex["noiseless"].shape == (32, 32, 1)
        assert ex["image"].dtype == np.float32
        assert ex["psf"].ndim == 2 and ex["psf"].sum() == pytest.approx(1.0, rel=1e-5)
        assert ex["pixel_scale_arcsec"] == pytest.approx(0.168)
        assert ex["n_knots"].dtype == np.int32
        # The recorded S/N is that of the stored noiseless stamp and sigma.
        snr = matched_filter_snr(ex["noiseless"][None, ..., 0], ex["noise_sigma"])[0]
        assert ex["snr"] == pytest.approx(snr, rel=1e-5)


def test_simulated_examples_are_the_seeded_simulation(simulated_build):
    data_dir, builder = simulated_build
    # Block 0 of split "test" (id 2) of base seed 7 is simulated with this seed.
    block_seed = int(np.random.SeedSequence([7, 2, 0]).generate_state(1)[0])
    ref = simulate_galaxy_stamps(3, block_seed, stamp_size=32, pixel_scale_arcsec=0.168,
                                 psf_fwhm_arcsec=0.6, num_workers=1)
    ds = builder.as_dataset(split="test", shuffle_files=False)
    got = sorted(tfds.as_numpy(ds), key=lambda ex: float(ex["flux"]))
    order = np.argsort(ref.params["flux"].astype(np.float32))
    for ex, i in zip(got, order, strict=True):
        np.testing.assert_array_equal(ex["image"][..., 0], ref.images[i])
        assert ex["hlr_arcsec"] == np.float32(ref.params["hlr_arcsec"][i])


def test_existing_build_is_reused_not_regenerated(simulated_build):
    data_dir, builder = simulated_build
    before = {p: p.stat().st_mtime_ns for p in Path(builder.data_dir).iterdir()}
    again = build_simulated_dataset(data_dir, config="hsc32", n_train=5, n_validation=2,
                                    n_test=3, seed=7, num_workers=1)
    assert {p: p.stat().st_mtime_ns for p in Path(again.data_dir).iterdir()} == before


def test_bad_builder_arguments(tmp_path):
    with pytest.raises(TfhybridInputError, match="unknown config"):
        build_simulated_dataset(tmp_path, config="nope")
    with pytest.raises(TfhybridInputError, match="n_train must be an integer >= 0"):
        SimulatedGalaxies(data_dir=str(tmp_path), n_train=-1)


@requires_cosmos_example
def test_cosmos_builder_reads_the_manual_directory(tmp_path):
    from tfhybrid.data.tfds_builders import COSMOSGalaxiesConfig

    directory, images = make_cosmos_dir(tmp_path / "manual")
    config = COSMOSGalaxiesConfig(name="example", description="GalSim example release",
                                  sample="23.5_example", max_galaxies=6)
    builder = COSMOSGalaxies(data_dir=str(tmp_path / "tfds"), config=config)
    builder.download_and_prepare(download_config=offline_download_config(manual_dir=directory))
    examples = sorted(tfds.as_numpy(builder.as_dataset(split="train")),
                      key=lambda ex: int(ex["index"]))
    assert [int(ex["index"]) for ex in examples] == list(range(6))
    for ex in examples:
        np.testing.assert_array_equal(ex["image"][..., 0], images[int(ex["index"])])
        assert ex["psf"].shape[0] >= 37
        assert ex["pixel_scale_arcsec"] == pytest.approx(0.03)
