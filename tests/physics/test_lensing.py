"""Tests of tfhybrid.physics.lensing (the forward model of 003_*, eqs. 7-17 and 24-25).

Reference: lenstronomy's ImageModel (EPL + SHEAR lens, INTERPOL source, GAUSSIAN PSF), an
independent implementation of the same physics; central finite differences for gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfhybrid.physics import lensing
from tfhybrid.validation import TfhybridInputError

PARAMS = dict(
    r_ein=1.4,
    gamma=2.15,
    q=0.65,
    phi=0.4,
    theta_lens1=0.07,
    theta_lens2=-0.11,
    gamma1=0.04,
    gamma2=-0.03,
    theta_src1=0.12,
    theta_src2=0.05,
    s=1.8,
    iota=1.3,
)


def _source(n=64, seed=0):
    """A smooth asymmetric two-blob source with pixel-level texture (catches flips / shifts)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] * (64.0 / n)
    img = np.exp(-((xx - 30) ** 2 + (yy - 36) ** 2) / 40.0)
    img += 0.5 * np.exp(-((xx - 40) ** 2 + (yy - 25) ** 2) / 15.0)
    return img * (1.0 + 0.2 * rng.uniform(size=img.shape))


def _lenstronomy_image(params, source, config, supersampling=1):
    """lenstronomy's image of one system, divided by the pixel area (surface brightness)."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.Data.pixel_grid import PixelGrid
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    n, pix = config.n_pix, config.pixel_scale_arcsec
    # (x, y) grid with pixel (i, j) at ((j - (n-1)/2) pix, (i - (n-1)/2) pix): our convention
    grid = PixelGrid(n, n, np.diag([pix, pix]), -(n - 1) / 2 * pix, -(n - 1) / 2 * pix)
    psf = PSF(
        psf_type="GAUSSIAN",
        fwhm=config.psf_sigma_arcsec * 2 * np.sqrt(2 * np.log(2)),
        pixel_size=pix,
        truncation=config.psf_truncation_sigma,
    )
    model = ImageModel(
        grid,
        psf,
        lens_model_class=LensModel(["EPL", "SHEAR"]),
        source_model_class=LightModel(["INTERPOL"]),
        kwargs_numerics={"supersampling_factor": supersampling},
    )
    kw = lensing.params_to_lenstronomy(params, source.shape)[0]
    kw["kwargs_source"][0]["image"] = source
    image = model.image(kwargs_lens=kw["kwargs_lens"], kwargs_source=kw["kwargs_source"])
    return image / pix**2


# ----------------------------------------------------------------------------------------------
# Full image vs lenstronomy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "deflection, dtype, tol",
    [
        # exact series in float64: the same arithmetic as lenstronomy up to rounding (measured
        # 2e-15 of the peak); 1e-12 leaves room for BLAS/FFT differences.
        ("epl", "float64", 1e-12),
        # the table's deflection error (<= 1e-6 relative, ~1e-6 arcsec) moves source positions
        # by ~1e-5 source pixels: measured 5e-8 of the peak.
        ("table", "float64", 1e-6),
        # float32: ~5e-7 of the peak measured (coordinate rounding of ~1e-7 arcsec)
        ("table", "float32", 5e-6),
    ],
)
def test_full_image_matches_lenstronomy(deflection, dtype, tol):
    # psf_pixel_integrated=False: lenstronomy's GAUSSIAN kernel samples the Gaussian at pixel
    # centres, truncated at 5 sigma (13 px here). The paper's 256 x 256 grid at 0.04".
    config = lensing.LensingConfig(psf_pixel_integrated=False, deflection=deflection, dtype=dtype)
    source = _source()
    ours = lensing.simulate_lensed_image(source[None], PARAMS, config).numpy()[0]
    ref = _lenstronomy_image(PARAMS, source, config)
    assert ours.shape == (256, 256)
    assert ref.max() > 1.0  # the lensed source is in the field
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol * ref.max())


def test_supersampled_image_matches_lenstronomy():
    # lenstronomy supersamples ray tracing, averages, then convolves at pixel resolution
    # (supersampling_convolution=False), as we do. Exact EPL, float64: rounding only.
    config = lensing.LensingConfig(
        n_pix=64,
        pixel_scale_arcsec=0.1,
        supersampling=3,
        psf_pixel_integrated=False,
        deflection="epl",
        dtype="float64",
    )
    source = _source(32)
    ours = lensing.simulate_lensed_image(source[None], PARAMS, config).numpy()[0]
    ref = _lenstronomy_image(PARAMS, source, config, supersampling=3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12 * ref.max())


def test_source_convention_identity_without_lens():
    # With (almost) no deflection and s = field / 2, a source of the image's size is sampled at
    # its own pixel centres: the image reproduces the source (rows increase with theta2).
    config = lensing.LensingConfig(n_pix=32, pixel_scale_arcsec=0.1, dtype="float64")
    source = _source(32)[None]
    theta1, theta2 = lensing.lens_plane_grid(config)
    out = lensing.source_surface_brightness(
        source, theta1[None], theta2[None], 0.0, 0.0, 0.5 * config.field_arcsec, 2.0
    )
    np.testing.assert_allclose(out.numpy(), 2.0 * source, atol=1e-12)
    # shifting the source centre by one source pixel along theta1 shifts columns by one
    out = lensing.source_surface_brightness(
        source, theta1[None], theta2[None], 0.1, 0.0, 0.5 * config.field_arcsec, 1.0
    )
    np.testing.assert_allclose(out.numpy()[0, :, 1:], source[0, :, :-1], atol=1e-12)


def test_resample_source_stamp_redraws_the_same_galaxy():
    # An elliptical Gaussian (sigma 6 and 4 px, off-centre) on a 64-px stamp of half-side s,
    # redrawn on a stamp k s wide, must equal the same Gaussian drawn analytically on the new
    # stamp: bilinear interpolation of the old pixels errs by ~h^2 f''/8 per axis, 1/(8 * 16)
    # of the peak along the 4-px axis (1.07 % measured in all), so 1.5 % of the peak is the
    # tolerance; a half-pixel slip in the centre convention would miss by ~7 %.
    n, c = 64, 31.5

    def gauss(x0, y0, sx, sy):
        yy, xx = np.mgrid[:n, :n].astype(float)
        return np.exp(-0.5 * (((xx - x0) / sx) ** 2 + ((yy - y0) / sy) ** 2))

    x0, y0 = 35.2, 27.7
    src = gauss(x0, y0, 6.0, 4.0)[None]
    np.testing.assert_allclose(lensing.resample_source_stamp(src, 1.0).numpy(), src, atol=1e-12)
    for k in (0.6, 1.6, 2.6):
        out = lensing.resample_source_stamp(src, k).numpy()[0]
        want = gauss(c + (x0 - c) / k, c + (y0 - c) / k, 6.0 / k, 4.0 / k)
        assert np.max(np.abs(out - want)) < 0.015, (k, np.max(np.abs(out - want)))
    # per-image factors, and the rendered surface brightness is unchanged (eq. 17 with k s);
    # rendering interpolates a second time, on the shrunken galaxy, so a wider one (10 x 8 px,
    # 3.1 px wide at k = 2.6: ~1.3 % per interpolation) and a 3 % tolerance
    src = gauss(x0, y0, 10.0, 8.0)[None]
    pair = lensing.resample_source_stamp(np.concatenate([src, src]), [1.6, 2.6]).numpy()
    rng = np.random.default_rng(3)
    b1, b2 = rng.uniform(-1.5, 1.5, (2, 1, 10, 20))
    ref = lensing.source_surface_brightness(src, b1, b2, 0.1, -0.2, 1.8, 1.0).numpy()
    for i, k in enumerate((1.6, 2.6)):
        got = lensing.source_surface_brightness(pair[i:i + 1], b1, b2, 0.1, -0.2, 1.8 * k,
                                                1.0).numpy()
        assert np.max(np.abs(got - ref)) < 0.03, (k, np.max(np.abs(got - ref)))
    with pytest.raises(TfhybridInputError, match="factor"):
        lensing.resample_source_stamp(src, 0.0)
    with pytest.raises(TfhybridInputError, match="rank 3"):
        lensing.resample_source_stamp(src[0], 2.0)


def test_ray_trace_is_theta_minus_deflections():
    from tfhybrid.physics import lens_profiles as lp

    rng = np.random.default_rng(5)
    t1, t2 = rng.uniform(-3, 3, (2, 1, 20, 20))
    b1, b2 = lensing.ray_trace(t1, t2, PARAMS, deflection="epl")
    ax, ay = lp.epl_deflection(t1, t2, 1.4, 2.15, 0.65, 0.4, 0.07, -0.11)
    sx, sy = lp.external_shear_deflection(t1, t2, 0.04, -0.03)
    np.testing.assert_allclose(b1.numpy(), t1 - ax.numpy() - sx.numpy(), atol=1e-13)
    np.testing.assert_allclose(b2.numpy(), t2 - ay.numpy() - sy.numpy(), atol=1e-13)


# ----------------------------------------------------------------------------------------------
# Batching, XLA, Keras layer
# ----------------------------------------------------------------------------------------------
SMALL = lensing.LensingConfig(n_pix=48, pixel_scale_arcsec=0.2)


def _batch_params(n, seed=2):
    prior = lensing.mock_prior(tf.float64)
    sample = prior.sample(n, seed=seed)
    p = {k: v.numpy() for k, v in sample.items()}
    p["gamma1"] *= 0.05  # keep the shear realistic so images land in the field
    p["gamma2"] *= 0.05
    p["s"] = np.full(n, 2.0)
    return p


@pytest.mark.parametrize("jit_compile", [True, False])
def test_batch_equals_single_systems_and_xla_matches(jit_compile):
    config = lensing.LensingConfig(n_pix=48, pixel_scale_arcsec=0.2, jit_compile=jit_compile)
    params = _batch_params(3)
    sources = np.stack([_source(32, seed) for seed in range(3)])
    batch = lensing.simulate_lensed_image(sources, params, config).numpy()
    assert batch.shape == (3, 48, 48) and np.all(np.isfinite(batch))
    for b in range(3):
        one = lensing.simulate_lensed_image(
            sources[b : b + 1], {k: v[b] for k, v in params.items()}, config
        ).numpy()[0]
        # float32, same ops: rounding-level differences only (XLA may fuse differently)
        np.testing.assert_allclose(batch[b], one, rtol=0, atol=1e-5 * np.abs(one).max())
    other = lensing.LensingConfig(n_pix=48, pixel_scale_arcsec=0.2, jit_compile=not jit_compile)
    np.testing.assert_allclose(
        batch, lensing.simulate_lensed_image(sources, params, other).numpy(), atol=1e-5
    )


def test_keras_layer_matches_function_and_round_trips_config():
    import keras

    layer = lensing.LensingSimulator(SMALL)
    params = _batch_params(2)
    sources = np.stack([_source(32, 0), _source(32, 1)]).astype(np.float32)
    inputs = {"source": sources, **{k: v.astype(np.float32) for k, v in params.items()}}
    out = layer(inputs).numpy()
    ref = lensing.simulate_lensed_image(sources, params, SMALL).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert clone.config == SMALL




def test_layer_xla_cluster_matches_the_plain_graph_in_value_and_gradient():
    # The layer runs the lens equation and the source lookup as an XLA cluster of its own when
    # called from a graph that is not compiled (jit_compile=True), and inlines them into a
    # compiled caller (as a nested call its gradient would not compile). Both must give the
    # plain graph's image and gradients (jit_compile=False builds no cluster). In float64, so
    # that the comparison is not limited by rounding: the gradients are sums over 2 304 pixels
    # of terms of both signs, which float32 added in another order left 1.7e-4 apart relative
    # to their largest value (on the CI machine); in float64 both agree to ~4e-14, so 1e-8 of
    # the largest value holds with a wide margin, while a wrong chain rule or a dropped term
    # would be off by O(1).
    import dataclasses

    config = dataclasses.replace(SMALL, dtype="float64")
    xla = lensing.LensingSimulator(config)
    plain = lensing.LensingSimulator(dataclasses.replace(config, jit_compile=False))
    params = {k: tf.constant(v, tf.float64) for k, v in _batch_params(2).items()}
    sources = tf.constant(np.stack([_source(32, 0), _source(32, 1)]), tf.float64)
    weights = tf.constant(np.random.default_rng(0).normal(size=(2, 48, 48)), tf.float64)

    def value_and_grads(layer):
        with tf.GradientTape() as tape:
            tape.watch([sources, params])
            image, (col, _) = layer.image_and_source_coordinates(
                {"source": sources, **params}, (24, 24))
            loss = tf.reduce_sum(weights * image) + 1e-3 * tf.reduce_sum(col)
        grads = tape.gradient(loss, [sources, params])
        return image, [grads[0]] + [grads[1][k] for k in lensing.PARAM_NAMES]

    in_graph = tf.function(value_and_grads, autograph=False)
    in_xla = tf.function(value_and_grads, jit_compile=True, autograph=False)
    ref_image, ref_grads = value_and_grads(plain)
    for fn in (in_graph, in_xla):
        image, grads = fn(xla)
        np.testing.assert_allclose(image.numpy(), ref_image.numpy(), rtol=0,
                                   atol=1e-8 * np.abs(ref_image.numpy()).max())
        for got, ref in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0,
                                       atol=1e-8 * np.abs(ref.numpy()).max())
    # the cluster is a compiled function of its own only where the caller is not compiled
    assert xla._lensed is not xla._lensed_core
    assert plain._lensed == plain._lensed_core


def test_image_and_source_coordinates_share_one_ray_trace():
    # against the two separate paths: call() for the image and traced_source_coordinates()
    # for the positions, and against the positions computed from ray_trace by hand
    layer = lensing.LensingSimulator(SMALL)
    params = _batch_params(2)
    sources = np.stack([_source(32, 0), _source(32, 1)]).astype(np.float32)
    inputs = {"source": sources, **{k: v.astype(np.float32) for k, v in params.items()}}
    image, (col, row) = layer.image_and_source_coordinates(inputs, (24, 24))
    np.testing.assert_array_equal(image.numpy(), layer(inputs).numpy())
    flat = {k: tf.constant(v, tf.float32) for k, v in params.items()}
    col_ref, row_ref = layer.traced_source_coordinates(flat, (24, 24))
    np.testing.assert_array_equal(col.numpy(), col_ref.numpy())
    np.testing.assert_array_equal(row.numpy(), row_ref.numpy())
    t1, t2 = lensing.lens_plane_grid(SMALL)
    b1, _ = lensing.ray_trace(t1[None], t2[None], params)
    # stamp edges at theta_src ± s, 24 pixels across, centres at integers (float32: 1e-4 px)
    expected = ((b1.numpy() - params["theta_src1"][:, None, None]) / params["s"][:, None, None]
                + 1.0) * 12.0 - 0.5
    np.testing.assert_allclose(col.numpy(), expected, atol=1e-3)
# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
def _loss_and_grads(config, params, source, weights):
    variables = {k: tf.Variable(np.float64(v)) for k, v in params.items()}
    src = tf.Variable(source[None])
    with tf.GradientTape() as tape:
        image = lensing.simulate_lensed_image(src, variables, config)
        loss = tf.reduce_sum(weights * image)
    grads = tape.gradient(loss, {"source": src, **variables})
    return float(loss), {k: g.numpy() for k, g in grads.items()}


@pytest.mark.parametrize("deflection", ["table", "epl"])
def test_gradients_match_finite_differences(deflection):
    # float64, 40 x 40 grid. Bilinear interpolation is piecewise linear in the coordinates: a
    # central difference whose step moves a pixel's source position across a source-pixel
    # edge gets that pixel's slope wrong by O(1). With step 1e-7 arcsec (1e-6 source pixels)
    # ~2e-6 of the pixels cross one, so rel 2e-5 (rounding: 1e-16 / 1e-7 of the loss, 1e-9).
    # Graph mode (jit_compile=False) saves XLA compiles of the 18 retraced steps; XLA
    # gradients are exercised by the no-NaN test and XLA values by the batch test.
    config = lensing.LensingConfig(
        n_pix=40, pixel_scale_arcsec=0.12, deflection=deflection, dtype="float64", jit_compile=False
    )
    source = _source(32)
    weights = np.random.default_rng(3).normal(size=(1, 40, 40))
    params = dict(PARAMS, s=1.5)
    _, grads = _loss_and_grads(config, params, source, weights)
    for name in lensing.PARAM_NAMES:
        assert np.isfinite(grads[name]), name
    assert np.all(np.isfinite(grads["source"])) and np.abs(grads["source"]).sum() > 0
    step = 1e-7
    for name in ("r_ein", "gamma", "q", "phi", "theta_lens1", "gamma2", "theta_src2", "s", "iota"):
        values = []
        for sign in (1, -1):
            p = dict(params, **{name: params[name] + sign * step})
            image = lensing.simulate_lensed_image(source[None], p, config).numpy()
            values.append(np.sum(weights * image))
        fd = (values[0] - values[1]) / (2 * step)
        assert grads[name] == pytest.approx(fd, rel=2e-5, abs=1e-7), name


@pytest.mark.parametrize("deflection", ["table", "epl"])
def test_no_nan_at_round_lens_and_lens_centre_on_a_pixel(deflection):
    # q = 1 exactly and the lens centre exactly on a pixel centre (16 px at 0.1": centres at
    # +-0.05, +-0.15, ...), for an isothermal and a steep slope; XLA on (the default).
    config = lensing.LensingConfig(
        n_pix=16, pixel_scale_arcsec=0.1, deflection=deflection, dtype="float64"
    )
    for gamma in (2.0, 2.6):
        params = dict(PARAMS, q=1.0, gamma=gamma, theta_lens1=0.05, theta_lens2=-0.15)
        weights = np.ones((1, 16, 16))
        loss, grads = _loss_and_grads(config, params, _source(16), weights)
        assert np.isfinite(loss)
        for name, g in grads.items():
            assert np.all(np.isfinite(g)), (name, gamma)


# ----------------------------------------------------------------------------------------------
# Priors, noise, S/N
# ----------------------------------------------------------------------------------------------
def test_prior_samples_lie_in_their_ranges_and_match_the_paper():
    prior = lensing.mock_prior()
    sample = {k: v.numpy() for k, v in prior.sample(4000, seed=7).items()}
    assert set(sample) == set(lensing.PARAM_NAMES)
    assert np.all((sample["q"] >= 0.1) & (sample["q"] <= 1.0))
    assert np.all((sample["gamma"] >= 1.2) & (sample["gamma"] <= 2.8))
    assert np.all(sample["r_ein"] > 0) and np.all(sample["s"] > 0) and np.all(sample["iota"] > 0)
    # untruncated ones keep the paper's mean / std (4000 draws: 5-sigma margins)
    for name, mean, std in (
        ("theta_src1", 0, 0.1),
        ("phi", 0, 1.0),
        ("gamma1", 0, 1.0),
        ("theta_lens2", 0, 0.5),
    ):
        assert abs(sample[name].mean() - mean) < 5 * std / np.sqrt(4000), name
        assert sample[name].std() == pytest.approx(std, rel=0.06), name
    lp = prior.log_prob({k: v[:5] for k, v in sample.items()}).numpy()
    assert lp.shape == (5,) and np.all(np.isfinite(lp))
    # the samples are valid simulator input (range checks pass)
    lensing.simulate_lensed_image(np.ones((5, 8, 8)), {k: v[:5] for k, v in sample.items()}, SMALL)


def test_noise_presets_and_reproducibility():
    image = np.zeros((2, 64, 64), np.float32)
    a = lensing.add_noise(image, "medium", seed=3).numpy()
    b = lensing.add_noise(image, "medium", seed=3).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.std() == pytest.approx(0.1, rel=0.03)  # 8192 draws: std error 0.8 %
    assert lensing.noise_sigma("low") == 0.333 and lensing.noise_sigma("high") == 0.0333
    with pytest.raises(TfhybridInputError, match="preset"):
        lensing.noise_sigma("ultra")


def test_signal_to_noise_hand_examples():
    # Uniform image c = 1 on 40 x 40: the blurred image is >= 1/4 everywhere (corner of a
    # zero-padded unit image), so with sigma = 0.2 every pixel is in the mask and
    # S/N = N c / (sigma sqrt N) = 40 * 1 / 0.2 = 200.
    snr, mask = lensing.signal_to_noise(np.ones((40, 40)), 0.2)
    assert mask.all() and snr == pytest.approx(200.0, rel=1e-12)
    # Empty image: empty mask, S/N defined as 0.
    snr, mask = lensing.signal_to_noise(np.zeros((2, 20, 20)), "high")
    assert not mask.any() and np.all(snr == 0.0)
    # A single bright pixel of value 100 at 0.04"/px: the 0.16" (4 px) Gaussian spreads it to
    # 100 / (2 pi 16) exp(-r^2 / 32) ~ 0.995 exp(-r^2 / 32), which is >= sigma = 0.5 for
    # r^2 <= 32 ln(1.99) = 22.0 px^2: a disc of pi 22 ~ 69 pixels (69 lattice points have
    # i^2 + j^2 <= 22). The masked sum is the bright pixel itself: S/N = 100 / (0.5 sqrt n).
    image = np.zeros((41, 41))
    image[20, 20] = 100.0
    snr, mask = lensing.signal_to_noise(image, 0.5)
    n = mask.sum()
    i, j = np.nonzero(mask)
    assert mask[20, 20] and n == 69
    assert np.all((i - 20) ** 2 + (j - 20) ** 2 <= 22)
    assert snr == pytest.approx(100.0 / (0.5 * np.sqrt(n)))


# ----------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------
def test_lenstronomy_converters_round_trip():
    kw = lensing.params_to_lenstronomy(PARAMS, (64, 64))[0]
    assert kw["kwargs_lens"][0]["theta_E"] == pytest.approx(np.sqrt(0.65) * 1.4)
    assert kw["kwargs_source"][0]["scale"] == pytest.approx(2 * 1.8 / 64)
    back = lensing.lenstronomy_to_params(kw["kwargs_lens"], kw["kwargs_source"], (64, 64))
    for name, value in PARAMS.items():
        assert back[name] == pytest.approx(value, abs=1e-12), name
    with pytest.raises(TfhybridInputError, match="square"):
        lensing.params_to_lenstronomy(PARAMS, (64, 32))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=0.0), "parameter q must be >="),
        (dict(q=1.2), "parameter q must be <="),
        (dict(q=0.05), "parameter q must be >="),  # below the table
        (dict(gamma=2.9), "parameter gamma must be <="),
        (dict(r_ein=-1.0), "r_ein must be >"),
        (dict(s=0.0), "parameter s must be >"),
        (dict(phi=np.nan), "non-finite"),
        (dict(iota=np.ones((1, 1))), "scalar or have shape"),
        (dict(theta_src1=np.zeros(3)), "has 3 values but the source batch has 1"),
    ],
)
def test_bad_parameters_raise(change, match):
    with pytest.raises(TfhybridInputError, match=match):
        lensing.simulate_lensed_image(np.ones((1, 8, 8)), dict(PARAMS, **change), SMALL)


def test_bad_inputs_raise():
    good = np.ones((1, 8, 8))
    with pytest.raises(TfhybridInputError, match="rank 3"):
        lensing.simulate_lensed_image(np.ones((8, 8)), PARAMS, SMALL)
    with pytest.raises(TfhybridInputError, match="non-finite"):
        lensing.simulate_lensed_image(np.full((1, 8, 8), np.inf), PARAMS, SMALL)
    with pytest.raises(TfhybridInputError, match="missing"):
        lensing.simulate_lensed_image(good, {k: v for k, v in PARAMS.items() if k != "q"}, SMALL)
    with pytest.raises(TfhybridInputError, match="unknown"):
        lensing.simulate_lensed_image(good, dict(PARAMS, theta_E=1.0), SMALL)
    with pytest.raises(TfhybridInputError, match="gamma must be <"):
        lensing.simulate_lensed_image(
            good,
            dict(PARAMS, gamma=3.0),
            lensing.LensingConfig(n_pix=8, deflection="epl"),
        )
    with pytest.raises(TfhybridInputError, match="psf has 3 bands but the lensed image has 1"):
        lensing.simulate_lensed_image(good, PARAMS, SMALL, psf_image=np.ones((3, 5, 5)))
    with pytest.raises(TfhybridInputError, match="odd"):
        lensing.simulate_lensed_image(good, PARAMS, SMALL, psf_image=np.ones((4, 4)))
    with pytest.raises(TfhybridInputError, match="larger than"):
        lensing.simulate_lensed_image(good, PARAMS, SMALL, psf_image=np.ones((51, 51)))
    with pytest.raises(TfhybridInputError, match="deflection must be"):
        lensing.LensingConfig(deflection="sis")
    with pytest.raises(TfhybridInputError, match="n_pix"):
        lensing.LensingConfig(n_pix=0)
    with pytest.raises(TfhybridInputError, match="rank 2"):
        lensing.signal_to_noise(np.ones(5), 0.1)
    with pytest.raises(TfhybridInputError, match="beta1, beta2"):
        lensing.source_surface_brightness(
            good, np.ones((2, 4, 4)), np.ones((2, 4, 4)), 0.0, 0.0, 1.0, 1.0
        )


def test_custom_psf_image_is_used():
    # A delta PSF leaves the image unchanged: compare with no PSF at all.
    params = dict(PARAMS, s=2.0)
    no_psf = lensing.LensingConfig(n_pix=48, pixel_scale_arcsec=0.2, psf_sigma_arcsec=None)
    delta = np.zeros((3, 3))
    delta[1, 1] = 5.0  # normalised to unit sum
    a = lensing.simulate_lensed_image(np.ones((1, 16, 16)), params, SMALL, psf_image=delta)
    b = lensing.simulate_lensed_image(np.ones((1, 16, 16)), params, no_psf)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


# -- image multiplicity ----------------------------------------------------------------------------
ROUND = dict(r_ein=1.0, gamma=2.0, q=1.0, phi=0.0, theta_lens1=0.0, theta_lens2=0.0,
             gamma1=0.0, gamma2=0.0)
# cells of 0.04" over a 10" field: enough to resolve the images below, 4x cheaper than the default
COARSE_FIELD = lensing.LensingConfig(n_pix=128, pixel_scale_arcsec=0.078125)


@pytest.mark.parametrize("deflection", ["epl", "table"])
def test_count_images_analytic_round_lenses(deflection):
    """Round power laws, whose image counts follow from the 1-D lens equation
    β = r − r_E^(γ−1) r^(2−γ): an SIS images β < r_E twice (its singular centre holds no
    image) and β > r_E once; for γ = 1.5 the radial caustic lies at β_r = 0.25 r_E, inside
    which a central image joins the two (3), outside which one image remains."""
    shallow = dict(ROUND, gamma=1.5)
    cases = [(ROUND, 0.5, 2), (ROUND, 1.5, 1), (shallow, 0.15, 3), (shallow, 0.4, 1)]
    params = {k: np.array([c[0][k] for c in cases]) for k in ROUND}
    beta1 = np.array([c[1] for c in cases])
    counts = lensing.count_images(params, beta1, 0.0 * beta1, COARSE_FIELD, deflection=deflection)
    np.testing.assert_array_equal(counts, [c[2] for c in cases])


def test_count_images_matches_lenstronomy_solver_for_steep_lenses():
    """Random elliptical power laws with shear (γ ≥ 2: no central image) and sources near the
    lens: the image count agrees with lenstronomy's LensEquationSolver (images inside the
    field with |μ| ≥ 1e-3) for every system. A quad inside the caustic, doubles and singles
    all occur among the draws."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver

    rng = np.random.default_rng(3)
    n = 12
    params = dict(
        r_ein=rng.uniform(0.8, 2.0, n), gamma=rng.uniform(2.0, 2.5, n),
        q=rng.uniform(0.4, 1.0, n), phi=rng.uniform(-1.5, 1.5, n),
        theta_lens1=rng.normal(0, 0.3, n), theta_lens2=rng.normal(0, 0.3, n),
        gamma1=rng.normal(0, 0.05, n), gamma2=rng.normal(0, 0.05, n),
    )
    beta1 = params["theta_lens1"] + rng.normal(0, 0.6, n)
    beta2 = params["theta_lens2"] + rng.normal(0, 0.6, n)
    ours = lensing.count_images(params, beta1, beta2, COARSE_FIELD, deflection="epl")
    model = LensModel(["EPL", "SHEAR"])
    solver = LensEquationSolver(model)
    full = {**params, "theta_src1": beta1, "theta_src2": beta2, "s": np.ones(n), "iota": np.ones(n)}
    theirs = []
    for i, kw in enumerate(lensing.params_to_lenstronomy(full, (64, 64))):
        x, y = solver.image_position_from_source(
            beta1[i], beta2[i], kw["kwargs_lens"], min_distance=0.01, search_window=10.0,
            precision_limit=1e-10, num_iter_max=100,
        )
        mu = model.magnification(x, y, kw["kwargs_lens"])
        theirs.append(int(np.sum((np.abs(x) < 5) & (np.abs(y) < 5) & (np.abs(mu) >= 1e-3))))
    np.testing.assert_array_equal(ours, theirs)
    assert {1, 2} <= set(theirs)


def test_source_light_centroid_and_count_images_errors():
    src = np.zeros((8, 8))
    src[2, 6] = 1.0  # row 2 → v = -1 + 5/8, column 6 → u = -1 + 13/8
    b1, b2 = lensing.source_light_centroid(src, dict(theta_src1=0.1, theta_src2=-0.2, s=2.0))
    np.testing.assert_allclose([b1[0], b2[0]], [0.1 + 2.0 * 0.625, -0.2 + 2.0 * (-0.375)])
    # negative pixels (a decoder's ringing) carry no light: the centroid is the positive part's
    ringing = src.copy()
    ringing[5, 1] = -0.3
    np.testing.assert_allclose(
        lensing.source_light_centroid(ringing, dict(theta_src1=0.1, theta_src2=-0.2, s=2.0)),
        (b1, b2))
    with pytest.raises(TfhybridInputError, match=r"\[1\] have no positive pixel"):
        lensing.source_light_centroid(np.stack([src, -src]),
                                      dict(theta_src1=0.0, theta_src2=0.0, s=1.0))
    with pytest.raises(TfhybridInputError, match="lack"):
        lensing.source_light_centroid(src, dict(theta_src1=0.0, s=1.0))
    with pytest.raises(TfhybridInputError, match="supersampling"):
        lensing.count_images(ROUND, 0.1, 0.0, supersampling=0)
    with pytest.raises(TfhybridInputError, match="min_magnification"):
        lensing.count_images(ROUND, 0.1, 0.0, min_magnification=-1.0)
    with pytest.raises(TfhybridInputError, match="batch"):
        lensing.count_images(ROUND, np.zeros(2), np.zeros(3))
