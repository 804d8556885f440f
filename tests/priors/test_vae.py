"""Tests of the VAE galaxy source model (tfhybrid.priors.vae, tfhybrid.priors.vae_export).

Every model trained here is a tiny config (2-16 channels, 4-d latent) on a few dozen images, so
each fit takes a second or two on a CPU; only the ``paper`` config test builds the full
~40 M-parameter networks (no training).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tfhybrid.priors.training import load_arrays_npz, variables_to_arrays
from tfhybrid.priors.vae import (
    GalaxyVAE,
    VAEConfig,
    build_decoder,
    build_encoder,
    fit_latent_prior,
    gaussian_log_likelihood,
    kl_normal_standard_normal,
    load_default_vae,
    load_vae,
    save_vae,
    train_vae,
)
from tfhybrid.priors.vae_export import export_prior, load_prior
from tfhybrid.validation import TfhybridInputError

TINY = VAEConfig(name="tiny", latent_dim=4, base_filters=2, bottleneck_channels=8, num_mc_samples=3)


def galaxy_pairs(n: int, seed: int, noise: float = 1.0 / 50.0) -> tuple[np.ndarray, np.ndarray]:
    """(noiseless, noisy) elliptical exponential discs, each pair divided by the noisy peak."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] - 31.5
    clean, noisy = [], []
    for _ in range(n):
        q, phi, r = rng.uniform(0.4, 1.0), rng.uniform(0, np.pi), rng.uniform(3.0, 9.0)
        dy, dx = rng.normal(0, 1.5, 2)
        u = (xx - dx) * np.cos(phi) + (yy - dy) * np.sin(phi)
        v = -(xx - dx) * np.sin(phi) + (yy - dy) * np.cos(phi)
        img = np.exp(-np.hypot(u, v / q) / (r / 1.68))
        obs = img + rng.normal(0, noise, (64, 64))
        clean.append(img / obs.max())
        noisy.append(obs / obs.max())
    return np.asarray(clean, np.float32), np.asarray(noisy, np.float32)


def galaxy_images(n: int, seed: int) -> np.ndarray:
    """Peak-normalised noisy galaxy-like images (n, 64, 64), noise sigma 1/50."""
    return galaxy_pairs(n, seed)[1]


@pytest.fixture(scope="module")
def images():
    return galaxy_images(48, seed=1)


@pytest.fixture(scope="module")
def tiny_model(images):
    keras.utils.set_random_seed(3)
    model, _ = train_vae(images[:40], TINY, images[40:], epochs=1, batch_size=8, verbose=0)
    return model


# --------------------------------------------------------------------------- architecture
def test_paper_config_matches_tables_d1_d2():
    """Output shapes, parameter counts, bias-free convs and initialisation of Tables D1/D2."""
    config = VAEConfig.paper()
    assert (config.latent_dim, config.decoder_sigma, config.prior_covariance_factor) == (
        64,
        1 / 50,
        9.0,
    )
    keras.utils.set_random_seed(0)
    enc, dec = build_encoder(config), build_decoder(config)

    # Parameter counts written out from the PyTorch layers of the tables: Conv2d(i, o, 4, ...)
    # without bias has i*o*16 weights; BatchNorm2d(c) 2c trainable (+2c running statistics);
    # Linear(i, o) i*o + o.
    def conv(i, o):
        return i * o * 16

    enc_trainable = (
        conv(1, 64)
        + conv(64, 128)
        + 2 * 128
        + conv(128, 256)
        + 2 * 256
        + conv(256, 512)
        + 2 * 512
        + conv(512, 4096)
        + 2 * (4096 * 64 + 64)
    )
    dec_trainable = (
        conv(64, 512)
        + 2 * 512
        + conv(512, 256)
        + 2 * 256
        + conv(256, 128)
        + 2 * 128
        + conv(128, 64)
        + 2 * 64
        + conv(64, 1)
    )
    assert sum(int(np.prod(w.shape)) for w in enc.trainable_weights) == enc_trainable
    assert sum(int(np.prod(w.shape)) for w in dec.trainable_weights) == dec_trainable
    assert enc_trainable == 36_834_176 and dec_trainable == 3_279_744
    # Non-trainable = BatchNorm running mean and variance of the BatchNorm2d layers.
    assert enc.count_params() - enc_trainable == 2 * (128 + 256 + 512)
    assert dec.count_params() - dec_trainable == 2 * (512 + 256 + 128 + 64)

    def out_shape(model, name):
        return tuple(model.get_layer(name).output.shape[1:])

    assert [out_shape(enc, f"enc_lrelu{i}") for i in range(1, 6)] == [
        (32, 32, 64),
        (16, 16, 128),
        (8, 8, 256),
        (4, 4, 512),
        (1, 1, 4096),
    ]
    assert out_shape(enc, "enc_mean") == out_shape(enc, "enc_scale") == (64,)
    assert [out_shape(dec, f"dec_relu{i}") for i in range(1, 5)] == [
        (4, 4, 512),
        (8, 8, 256),
        (16, 16, 128),
        (32, 32, 64),
    ]
    assert out_shape(dec, "dec_tanh") == (64, 64, 1)
    # BatchNorm after encoder blocks 2-4 and decoder blocks 1-4 only; LeakyReLU slope 0.2.
    assert {ly.name for ly in enc.layers if isinstance(ly, keras.layers.BatchNormalization)} == {
        "enc_bn2",
        "enc_bn3",
        "enc_bn4",
    }
    assert {ly.name for ly in dec.layers if isinstance(ly, keras.layers.BatchNormalization)} == {
        "dec_bn1",
        "dec_bn2",
        "dec_bn3",
        "dec_bn4",
    }
    assert all(
        math.isclose(enc.get_layer(f"enc_lrelu{i}").negative_slope, 0.2) for i in range(1, 6)
    )
    for model in (enc, dec):
        for layer in model.layers:
            if isinstance(layer, keras.layers.Conv2D | keras.layers.Conv2DTranspose):
                assert not layer.use_bias, layer.name
    # Initialisation N(0, 0.02) (33.5 M draws: the sample std is within 0.1 % of 0.02) and
    # zero final-layer biases (appendix D).
    kernel = enc.get_layer("enc_conv5").kernel.numpy()
    assert abs(kernel.std() - 0.02) < 2e-5 and abs(kernel.mean()) < 1e-5
    assert np.all(enc.get_layer("enc_mean").bias.numpy() == 0)
    assert np.all(enc.get_layer("enc_log_scale").bias.numpy() == 0)


def test_small_config_is_the_paper_graph_with_a_width_multiplier():
    small, paper = VAEConfig.small(), VAEConfig.paper()
    assert small.base_filters * 4 == paper.base_filters and small.latent_dim == 64
    enc = build_encoder(small)
    assert tuple(enc.get_layer("enc_lrelu4").output.shape[1:]) == (4, 4, 128)
    assert tuple(enc.get_layer("enc_lrelu5").output.shape[1:]) == (1, 1, 256)
    n = GalaxyVAE(small).count_params()
    assert n < 1.1e6  # ~4 MB of float32: small enough to ship


# --------------------------------------------------------------------------- ELBO
def test_pure_functions_against_scipy_and_tfp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 64, 64))
    mu = rng.normal(size=(3, 64, 64))
    got = gaussian_log_likelihood(x, mu, 0.02).numpy()
    want = stats.norm.logpdf(x, mu, 0.02).sum(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-12)  # float64 throughout
    mean, scale = rng.normal(size=(5, 4)), rng.uniform(0.1, 2, (5, 4))
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    want_kl = tfd.kl_divergence(
        tfd.MultivariateNormalDiag(mean, scale), tfd.MultivariateNormalDiag(tf.zeros(4, tf.float64))
    ).numpy()
    np.testing.assert_allclose(kl_normal_standard_normal(mean, scale).numpy(), want_kl, rtol=1e-12)


def test_elbo_equals_hand_computation_of_eq4(tiny_model, images):
    """ELBO = mean_j log N(x | mu_d(mu_e + eps_j sigma_e), sigma_d) - KL, with fixed eps."""
    x = images[:4]
    m, d = 3, TINY.latent_dim
    eps = np.random.default_rng(5).normal(size=(m, 4, d)).astype(np.float32)
    mean, scale = (t.numpy().astype(np.float64) for t in tiny_model.encode(x))
    z = mean[None] + eps * scale[None]
    mu = tiny_model.decode(z.astype(np.float32)).numpy().astype(np.float64)  # (M, 4, 64, 64)
    loglik = stats.norm.logpdf(x[None].astype(np.float64), mu, 1 / 50).sum(axis=(2, 3))
    kl = 0.5 * np.sum(mean**2 + scale**2 - 1 - np.log(scale**2), axis=-1)
    want = loglik.mean(axis=0) - kl
    got = tiny_model.log_prob_elbo(x, eps=eps).numpy()
    # float32 network vs float64 hand computation of sums of 4096 terms of size ~1e2:
    # relative 1e-5 is far above round-off (~1e-7) and far below any modelling error.
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Eq. C3: the M-sample estimate is the mean of the single-sample ones (which differ).
    single = np.stack([tiny_model.log_prob_elbo(x, eps=eps[j : j + 1]).numpy() for j in range(m)])
    assert np.all(np.ptp(single, axis=0) > 0)
    np.testing.assert_allclose(single.mean(axis=0), got, rtol=1e-6)


# --------------------------------------------------------------------------- latent prior
def test_latent_prior_is_mvn_of_encoded_means_times_factor(tiny_model, images):
    means = tiny_model.encoded_means(images).astype(np.float64)
    for factor in (9.0, 2.5):
        prior = tiny_model.fit_latent_prior(images, covariance_factor=factor)
        np.testing.assert_allclose(prior.mean().numpy(), means.mean(0), rtol=1e-5, atol=1e-7)
        cov = factor * np.cov(means, rowvar=False)
        # float32 storage of the Cholesky factor: relative 1e-4 of the largest entry.
        np.testing.assert_allclose(prior.covariance().numpy(), cov, atol=1e-4 * np.abs(cov).max())
        # log p(z) is the MVN density of the stored (float32) parameters.
        z = np.random.default_rng(2).normal(means.mean(0), np.sqrt(np.diag(cov)), (6, 4))
        tril = tiny_model.prior_scale_tril.numpy().astype(np.float64)
        loc = tiny_model.prior_loc.numpy().astype(np.float64)
        np.testing.assert_allclose(
            tiny_model.latent_log_prob(z.astype(np.float32)).numpy(),
            stats.multivariate_normal(loc, tril @ tril.T).logpdf(z.astype(np.float32)),
            rtol=1e-5,
        )
    loc, tril = fit_latent_prior(means, 9.0)
    np.testing.assert_allclose(tril @ tril.T, 9 * np.cov(means, rowvar=False), rtol=1e-10)
    with pytest.raises(TfhybridInputError, match="more than 4 encoded images"):
        fit_latent_prior(means[:4])


# --------------------------------------------------------------------------- training
class _Interrupted(Exception):
    pass


class _InterruptAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Interrupted  # as if the job were killed right after this epoch's checkpoint


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.start_weights = [], None

    def on_train_begin(self, logs=None):
        self.start_weights = variables_to_arrays(self.model.weights)

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_resume_after_interruption_continues_from_last_checkpoint(images, tmp_path):
    ckpt = tmp_path / "ckpt"
    kwargs = dict(epochs=3, batch_size=8, checkpoint_dir=ckpt, verbose=0, seed=1, patience=None)
    with pytest.raises(_Interrupted):
        train_vae(images[:40], TINY, images[40:], callbacks=[_InterruptAfter(1)], **kwargs)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epochs_completed"] == 2
    saved = load_arrays_npz(ckpt / "last.weights.npz")
    rec = _Recorder()
    model, history = train_vae(images[:40], TINY, images[40:], callbacks=[rec], **kwargs)
    assert rec.epochs == [2]  # only the unfinished epoch runs: none lost, none repeated
    assert rec.start_weights.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(rec.start_weights[key], value, err_msg=key)
    assert len(history["loss"]) == 3 and history["loss"][:2] == state["history"]["loss"]
    assert int(model.optimizer.iterations.numpy()) == 3 * 5  # Adam state restored: 5 steps/epoch
    assert all(np.isfinite(history["val_loss"]))


def test_early_stopping_restores_best_weights(images, tmp_path):
    """Spoil the weights after epoch 0: validation gets worse, training stops, epoch 0 returns."""

    class Spoil(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.best = variables_to_arrays(self.model.decoder.weights)
                kernel = self.model.decoder.get_layer("dec_convt5").kernel
                kernel.assign(kernel * 0 - 5.0)  # saturates tanh: reconstruction ~ -1

    spoil = Spoil()
    model, history = train_vae(
        images[:40],
        TINY,
        images[40:],
        epochs=6,
        batch_size=8,
        patience=1,
        checkpoint_dir=tmp_path / "c",
        callbacks=[spoil],
        learning_rate=1e-5,
        verbose=0,
    )
    assert len(history["val_loss"]) == 2 and history["val_loss"][1] > history["val_loss"][0]
    now = variables_to_arrays(model.decoder.weights)
    for key, value in spoil.best.items():
        np.testing.assert_array_equal(now[key], value, err_msg=key)


def test_training_lowers_loss_and_sigma_option(images):
    keras.utils.set_random_seed(0)
    config = VAEConfig(**{**TINY.to_dict(), "trainable_sigma": True})
    model, history = train_vae(
        images[:40], config, images[40:], epochs=3, batch_size=8, learning_rate=2e-3, verbose=0
    )
    assert history["loss"][-1] < history["loss"][0]
    assert any(v is model.log_decoder_sigma for v in model.trainable_weights)
    assert not math.isclose(float(model.decoder_sigma), 1 / 50, rel_tol=1e-6)
    fixed = GalaxyVAE(TINY)
    assert all(v is not fixed.log_decoder_sigma for v in fixed.trainable_weights)
    assert math.isclose(float(fixed.decoder_sigma), 1 / 50, rel_tol=1e-6)
    # Adam with the paper's momentum parameters.
    assert (model.optimizer.beta_1, model.optimizer.beta_2) == (0.5, 0.999)


def test_strategy_argument(images):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    model, history = train_vae(
        images[:40], TINY, epochs=1, batch_size=8, verbose=0, strategy=strategy, fit_prior=False
    )
    assert np.isfinite(history["loss"][0])
    assert isinstance(model.encoder.weights[0].value, tf.distribute.DistributedValues)
    with pytest.raises(TfhybridInputError, match="strategy must be"):
        train_vae(images[:40], TINY, epochs=1, strategy="tpu-please", verbose=0)


# --------------------------------------------------------------------------- save / export
def test_savedmodel_round_trip_in_fresh_process_without_tfhybrid(tiny_model, images, tmp_path):
    path = export_prior(tiny_model, tmp_path / "export")
    rng = np.random.default_rng(4)
    x = images[:5]
    z = rng.normal(size=(6, TINY.latent_dim)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, z=z)
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        m = tf.saved_model.load({str(path)!r})
        d = np.load({str(tmp_path / "inputs.npz")!r})
        enc = m.encode(d["x"])
        out = dict(decode=m.decode(d["z"]), mean=enc["mean"], scale=enc["scale"],
                   latent_log_prob=m.latent_log_prob(d["z"]), elbo=m.log_prob_elbo(d["x"]),
                   sample=m.sample(3, 7),
                   sig_decode=m.signatures["decode"](z=tf.constant(d["z"]))["output_0"])
        assert not any(k.startswith("tfhybrid") for k in sys.modules), "tfhybrid imported"
        np.savez({str(tmp_path / "out.npz")!r}, **{{k: v.numpy() for k, v in out.items()}})
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    mean, scale = tiny_model.encode(x)
    want = dict(
        decode=tiny_model.decode(z),
        mean=mean,
        scale=scale,
        latent_log_prob=tiny_model.latent_log_prob(z),
        elbo=tiny_model.log_prob_elbo(x, seed=0),
        sample=tiny_model.sample(3, seed=7),
        sig_decode=tiny_model.decode(z),
    )
    for key, value in want.items():
        # Issue requirement: same numbers to <= 1e-6 (relative for the ~1e5-nat ELBOs).
        np.testing.assert_allclose(got[key], value.numpy(), rtol=1e-6, atol=1e-6, err_msg=key)
    prior = load_prior(path, expected_config=TINY)
    np.testing.assert_allclose(prior.decode(z).numpy(), got["decode"], atol=1e-6)
    np.testing.assert_allclose(prior.log_prob_elbo(x).numpy(), got["elbo"], rtol=1e-6)
    np.testing.assert_allclose(
        prior.latent_prior.log_prob(z).numpy(), got["latent_log_prob"], rtol=1e-6
    )


def test_save_load_round_trip_and_bad_directories(tiny_model, images, tmp_path):
    good = save_vae(tiny_model, tmp_path / "good")
    model = load_vae(good, expected_config=TINY)
    z = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.decode(z).numpy(), tiny_model.decode(z).numpy())
    np.testing.assert_array_equal(
        model.prior_scale_tril.numpy(), tiny_model.prior_scale_tril.numpy()
    )

    with pytest.raises(TfhybridInputError, match="config.json"):
        load_vae(tmp_path / "missing")
    with pytest.raises(TfhybridInputError, match="expected .*paper"):
        load_vae(good, expected_config="paper")

    def broken(name, edit):
        target = tmp_path / name
        save_vae(tiny_model, target)
        edit(target)
        return target

    bad_json = broken("json", lambda p: (p / "config.json").write_text("{not json"))
    with pytest.raises(TfhybridInputError, match="not valid JSON"):
        load_vae(bad_json)

    def truncate(p):
        data = (p / "weights.npz").read_bytes()
        (p / "weights.npz").write_bytes(data[: len(data) // 2])

    with pytest.raises(TfhybridInputError, match="corrupted or truncated"):
        load_vae(broken("trunc", truncate))

    def other_config(p):
        cfg = json.loads((p / "config.json").read_text())
        cfg["config"]["base_filters"] = 3
        (p / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(TfhybridInputError, match="another config"):
        load_vae(broken("other", other_config))

    def pickled(p):  # an object array needs pickle to load: must be refused, never unpickled
        np.savez(p / "latent_prior.npz", loc=np.array([object()]), scale_tril=np.eye(4))

    with pytest.raises(TfhybridInputError, match="plain arrays"):
        load_vae(broken("pickle", pickled))

    # SavedModel directories.
    exported = export_prior(tiny_model, tmp_path / "sm")
    with pytest.raises(TfhybridInputError, match="saved_model.pb"):
        load_prior(good)
    with pytest.raises(TfhybridInputError, match="expected .*paper"):
        load_prior(exported, expected_config="paper")
    other = tf.Module()
    other.v = tf.Variable(1.0)
    other.f = tf.function(lambda: other.v * 2, input_signature=[])
    tf.saved_model.save(other, str(tmp_path / "foreign"))
    with pytest.raises(TfhybridInputError, match="not a tfhybrid VAE export"):
        load_prior(tmp_path / "foreign")
    pb = exported / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:1000])
    with pytest.raises(TfhybridInputError, match="corrupted or truncated"):
        load_prior(exported)


def test_bad_inputs_raise_clear_errors(tiny_model, images):
    ok = images[:2]
    cases = [
        (np.zeros((2, 32, 32), np.float32), r"shape \(batch, 64, 64\)"),
        ((ok * 100).astype(np.int32), "dtype int32"),
        (ok * 300.0, "peak-normalised"),
        (np.where(np.arange(64) == 3, np.nan, ok).astype(np.float32), "NaN"),
        (np.zeros((0, 64, 64), np.float32), "empty"),
    ]
    for value, message in cases:
        with pytest.raises(TfhybridInputError, match=message):
            tiny_model.encode(value)
    with pytest.raises(TfhybridInputError, match=r"\(\.\.\., 4\)"):
        tiny_model.decode(np.zeros((2, 5), np.float32))
    with pytest.raises(TfhybridInputError, match="NaN"):
        tiny_model.decode(np.full((2, 4), np.nan, np.float32))
    with pytest.raises(TfhybridInputError, match="eps must have shape"):
        tiny_model.log_prob_elbo(ok, eps=np.zeros((3, 5, 4), np.float32))
    with pytest.raises(TfhybridInputError, match="need at least 5"):
        train_vae(images[:4], TINY, epochs=1, verbose=0)
    with pytest.raises(TfhybridInputError, match="empty"):
        train_vae(images[:0], TINY, epochs=1, verbose=0)
    with pytest.raises(TfhybridInputError, match="validation_images"):
        train_vae(images[:8], TINY, np.zeros((2, 64, 63), np.float32), epochs=1, verbose=0)
    with pytest.raises(TfhybridInputError, match="base_filters"):
        VAEConfig(base_filters=0)
    with pytest.raises(TfhybridInputError, match="unknown VAE config"):
        VAEConfig.from_dict({"widht": 3})


# --------------------------------------------------------------------------- CLI and default
def test_cli_train_vae(images, tmp_path):
    from tfhybrid.cli.main import main

    data = tmp_path / "data.npz"
    np.savez(data, train=images[:40], validation=images[40:])
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    code = main(
        [
            "train",
            "vae",
            "--data",
            str(data),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--export",
            str(tmp_path / "sm"),
        ]
    )
    assert code == 0
    model = load_vae(tmp_path / "out", expected_config=TINY)
    assert len(model.metadata["history"]["loss"]) == 1
    assert load_prior(tmp_path / "sm").latent_dim == 4
    assert (
        main(["train", "vae", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o2")])
        == 2
    )


def test_cli_reads_lensing_fits_image_sets(images, tmp_path):
    from tfhybrid.cli.train_vae import read_training_data
    from tfhybrid.data.fits_io import write_image_sets_fits

    path = write_image_sets_fits(
        tmp_path / "sets.fits", {"train": images[:6], "validation": images[6:8]}
    )
    train, val = read_training_data(path)
    np.testing.assert_array_equal(train, images[:6])
    np.testing.assert_array_equal(val, images[6:8])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TfhybridInputError, match=r"\.fits, \.npz or \.npy"):
        read_training_data(tmp_path / "x.txt")


def test_default_vae_ships_and_reconstructs_better_than_the_noisy_input():
    from tfhybrid.priors.vae import default_vae_path

    size = sum(f.stat().st_size for f in default_vae_path().iterdir())
    assert size < 8e6  # shipped asset stays small (issue: well under 20 MB)
    model = load_default_vae()
    assert model.config == VAEConfig.small()
    assert np.all(np.isfinite(model.prior_scale_tril.numpy()))
    draws = model.sample(4, seed=0).numpy()
    assert draws.shape == (4, 64, 64) and np.all(np.abs(draws) <= 1)
    # decode and the latent prior are differentiable in z (what the lens fits need).
    z = tf.Variable(model.latent_prior.mean()[None])
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(model.decode(z)) + tf.reduce_sum(model.latent_log_prob(z))
    grad = tape.gradient(value, z).numpy()
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    # Denoising check on synthetic exponential discs (inside the training distribution's
    # morphology range): the mean-latent reconstruction is closer to the noiseless image than
    # the noisy input is (the input's error is the noise itself, sigma = 1/50).
    clean, noisy = galaxy_pairs(16, seed=7)
    recon = model(noisy).numpy()
    err_recon = np.mean((recon - clean) ** 2)
    err_input = np.mean((noisy - clean) ** 2)
    assert err_recon < err_input, (err_recon, err_input)


# ------------------------------------------------------------------ augmentation, warm start
def test_dihedral_augmentation_gives_the_eight_symmetries_of_each_image():
    from tfhybrid.priors.vae import dihedral_transform, images_dataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 64)).astype(np.float32)
    expected = [np.rot90(x, k) for k in range(4)] + [np.fliplr(np.rot90(x, k)) for k in range(4)]
    for k, e in enumerate(expected):
        np.testing.assert_array_equal(dihedral_transform(tf.constant(x), tf.constant(k)).numpy(), e)
    # A centred symmetric blob stays centred: the turns are about the stamp centre.
    yy, xx = np.mgrid[:64, :64] - 31.5
    blob = np.exp(-(xx**2 + 4 * yy**2) / 20).astype(np.float32)
    np.testing.assert_allclose(dihedral_transform(tf.constant(blob), 1).numpy(), blob.T, atol=0)
    # Over epochs every image appears under several distinct transforms, reproducibly per seed.
    imgs = rng.normal(size=(4, 64, 64)).astype(np.float32)

    def epochs(seed):
        ds = images_dataset(imgs, 4, shuffle_seed=seed, augment=True)
        return [b.numpy() for b in ds.repeat().take(6)]

    a, b = epochs(3), epochs(3)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    seen = set()
    for batch in a:
        for img in batch:
            for k, e in enumerate(
                [np.rot90(imgs[0], j) for j in range(4)]
                + [np.fliplr(np.rot90(imgs[0], j)) for j in range(4)]
            ):
                if np.array_equal(img, e):
                    seen.add(k)
    assert len(seen) >= 3, seen
    # No transform without augment.
    plain = next(iter(images_dataset(imgs, 4))).numpy()
    np.testing.assert_array_equal(plain, imgs)


def test_initial_model_warm_starts_training(tiny_model, images, tmp_path):
    # learning rate 0: the weights stay those of the initial model (BatchNorm moving statistics
    # excepted, which training updates), so the encoder's convolutions equal it exactly.
    model, _ = train_vae(images[:16], TINY, epochs=1, batch_size=8, learning_rate=0.0,
                         initial_model=tiny_model, fit_prior=False, verbose=0, augment=True)
    for name in ("enc_conv1", "enc_conv5", "dec_convt5"):
        layer = model.encoder if name.startswith("enc") else model.decoder
        ref = tiny_model.encoder if name.startswith("enc") else tiny_model.decoder
        np.testing.assert_array_equal(layer.get_layer(name).kernel.numpy(),
                                      ref.get_layer(name).kernel.numpy())
    save_vae(tiny_model, tmp_path / "init")
    model2, _ = train_vae(images[:16], TINY, epochs=1, batch_size=8, learning_rate=0.0,
                          initial_model=tmp_path / "init", fit_prior=False, verbose=0)
    np.testing.assert_array_equal(model2.encoder.get_layer("enc_conv1").kernel.numpy(),
                                  tiny_model.encoder.get_layer("enc_conv1").kernel.numpy())
    # another decoder sigma (not a network weight) is allowed, and the new model keeps its own
    sharper = VAEConfig(**{**TINY.to_dict(), "decoder_sigma": TINY.decoder_sigma / 4})
    model3, _ = train_vae(images[:16], sharper, epochs=1, batch_size=8, learning_rate=0.0,
                          initial_model=tiny_model, fit_prior=False, verbose=0)
    np.testing.assert_allclose(float(model3.decoder_sigma), TINY.decoder_sigma / 4, rtol=1e-6)
    np.testing.assert_array_equal(model3.decoder.get_layer("dec_convt5").kernel.numpy(),
                                  tiny_model.decoder.get_layer("dec_convt5").kernel.numpy())
    other = VAEConfig(**{**TINY.to_dict(), "latent_dim": 5})
    with pytest.raises(TfhybridInputError, match="initial_model has config"):
        train_vae(images[:16], other, epochs=1, batch_size=8, initial_model=tiny_model,
                  fit_prior=False, verbose=0)


def test_fit_latent_maximises_the_map_objective(tiny_model, images):
    x = images[:6]
    sigma = np.full(6, 1.0 / 50.0, np.float32)

    def objective(z, use_prior=True):
        resid = x - tiny_model.decode(z).numpy()
        value = -0.5 * np.sum(resid**2 / sigma[:, None, None] ** 2, axis=(1, 2))
        if use_prior:
            value = value + tiny_model.latent_log_prob(z).numpy()
        return value

    z0 = tiny_model.encode(x)[0]
    z_map = tiny_model.fit_latent(x, sigma, num_steps=200)
    assert z_map.shape == (6, TINY.latent_dim)
    # every image's objective improves on the encoder mean, and the result is a local maximum:
    # small random moves do not improve it.
    assert np.all(objective(z_map) > objective(z0))
    rng = np.random.default_rng(0)
    for _ in range(5):
        dz = rng.normal(0, 0.05, z_map.shape).astype(np.float32)
        assert np.all(objective(z_map + dz) <= objective(z_map) + 1e-3 * np.abs(objective(z_map)))
    z_ml = tiny_model.fit_latent(x, sigma, num_steps=200, use_prior=False)
    lik_map = objective(z_map, False)
    assert np.all(objective(z_ml, False) >= lik_map - 1e-3 * np.abs(lik_map))
    with pytest.raises(TfhybridInputError, match="noise_sigma"):
        tiny_model.fit_latent(x, -1.0)
    with pytest.raises(TfhybridInputError, match="num_steps"):
        tiny_model.fit_latent(x, 0.02, num_steps=0)


def test_default_vae_beats_the_best_blur_on_held_out_simulated_galaxies():
    """Issue 4's criterion on a small held-out set (scripts/vae_figures.py runs the full one).

    Simulated galaxies from a seed stream the training never used, through the lensing
    preprocessing, with the noiseless image kept: chi^2 per pixel against the truth, in units of
    each image's noise. Measured on 151 images: encoder reconstruction 0.31, latent-MAP
    reconstruction (what the lens model uses) 0.20, best Gaussian blur of the input 0.37 (its
    width chosen on the same images, which favours the baseline).
    """
    from scipy import ndimage

    from tfhybrid.data.preprocess import (
        LENSING_SNR_RANGE,
        downscale,
        downscaled_noise_sigma,
        snr_cut_mask,
    )
    from tfhybrid.data.simulate import simulate_galaxy_stamps

    stamps = simulate_galaxy_stamps(240, 4242, stamp_size=128, keep_noiseless=True)
    keep = snr_cut_mask(stamps.images, stamps.noise_sigma, *LENSING_SNR_RANGE)
    noisy = downscale(stamps.images[keep].astype(np.float64), 64)
    truth = downscale(stamps.noiseless[keep].astype(np.float64), 64)
    peak = noisy.max(axis=(1, 2))
    sigma = (downscaled_noise_sigma(stamps.noise_sigma[keep], 128, 64) / peak).astype(np.float32)
    noisy = (noisy / peak[:, None, None]).astype(np.float32)
    truth = truth / peak[:, None, None]
    assert len(noisy) >= 30
    s = sigma[:, None, None]

    def chi2(x):
        return float(np.mean(((x - truth) / s) ** 2))

    model = load_default_vae()
    blur = min(chi2(ndimage.gaussian_filter(noisy, (0, b, b), mode="constant"))
               for b in (0.5, 0.625, 0.75, 0.875, 1.0))
    encoder = chi2(model(noisy).numpy())
    latent_map = chi2(model.decode(model.fit_latent(noisy, sigma, num_steps=300)).numpy())
    assert chi2(noisy) == pytest.approx(1.0, abs=0.05)
    assert latent_map < 0.75 * blur, (latent_map, blur)
    assert encoder < blur, (encoder, blur)
