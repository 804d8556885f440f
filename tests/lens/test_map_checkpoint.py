"""fit_map's stage checkpoints (tfhybrid.lens.map_checkpoint): a killed fit resumes where it
stopped, with the same result, and never from another fit's files."""

import numpy as np
import pytest

import tfhybrid.lens.fit as fit_module
from tests.lens.test_model import CONFIG, SIGMA, TRUTH, SmoothSourceModel
from tfhybrid.lens.fit import fit_map, sample_lens_posterior
from tfhybrid.lens.model import LensPosterior
from tfhybrid.physics.lensing import PARAM_NAMES, simulate_lensed_image
from tfhybrid.validation import TfhybridInputError

# a global search with coarse source-scale jumps, Adam and a Newton polish: every
# checkpointed stage, each as short as still meaningful (~30 s in all on a 2-core CPU)
SETTINGS = dict(num_starts=2, num_steps=40, coarse_starts=3, coarse_steps=30, coarse_factor=4,
                scale_jumps=(1.6,), newton_iter=1, lbfgs_iter=0, jit_compile=False,
                progress=False)


def _posterior(vae, shift=0.0):
    z = np.full((1, 8), 0.3, np.float32)
    image = simulate_lensed_image(vae.decode(z).numpy(), {k: [v] for k, v in TRUTH.items()},
                                  CONFIG).numpy()
    observed = image + SIGMA * np.random.default_rng(1).normal(size=image.shape) + shift
    return LensPosterior(observed.astype(np.float32), SIGMA, vae, CONFIG)


def _same(a, b):
    for k in PARAM_NAMES:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    np.testing.assert_array_equal(a.z, b.z)
    np.testing.assert_array_equal(a.log_prob, b.log_prob)
    np.testing.assert_array_equal(a.best_start, b.best_start)
    np.testing.assert_array_equal(a.scale_jump, b.scale_jump)


def test_fit_map_resumes_each_finished_stage_and_refuses_another_fits(tmp_path, monkeypatch):
    vae = SmoothSourceModel()
    post = _posterior(vae)
    ckpt = tmp_path / "ckpt"
    first = fit_map(post, checkpoint_dir=ckpt, **SETTINGS)
    assert first.resumed_stages == ()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adam.npz", "config.json", "global_search.npz", "polish.npz"]

    # every stage finished: nothing reruns (the source-residual stage, not checkpointed, runs
    # after loaded stages in tests/cli/test_cli_lens.py's interrupted fit)
    calls = []
    real_find_map, real_polish = fit_module.find_map, fit_module.newton_polish

    def spy_find_map(*args, **kwargs):
        calls.append("find_map")
        return real_find_map(*args, **kwargs)

    def spy_polish(posterior, *args, **kwargs):
        calls.append("polish")
        return real_polish(posterior, *args, **kwargs)

    monkeypatch.setattr(fit_module, "find_map", spy_find_map)
    monkeypatch.setattr(fit_module, "newton_polish", spy_polish)
    again = fit_map(post, checkpoint_dir=ckpt, **SETTINGS)
    assert again.resumed_stages == ("global_search", "adam", "polish") and calls == []
    _same(again, first)
    np.testing.assert_array_equal(again.hessian, first.hessian)
    assert again.stage_seconds == first.stage_seconds  # the computing run's times
    assert again.result.message == first.result.message
    np.testing.assert_array_equal(again.result.loss_trace, first.result.loss_trace)
    assert again.message == first.message

    # killed after the global search: Adam (the coarse jump factors carried over) and the
    # polish run again, from the saved starts, to the same MAP
    (ckpt / "adam.npz").unlink()
    (ckpt / "polish.npz").unlink()
    calls.clear()
    resumed = fit_map(post, checkpoint_dir=ckpt, **SETTINGS)
    assert resumed.resumed_stages == ("global_search",)
    assert calls == ["find_map", "polish"]
    _same(resumed, first)
    np.testing.assert_allclose(resumed.hessian, first.hessian, rtol=1e-6, atol=1e-6)

    # another fit's directory: other settings or other data are refused, naming what differs
    with pytest.raises(TfhybridInputError, match=r"different settings \(num_steps\)"):
        fit_map(post, checkpoint_dir=ckpt, **dict(SETTINGS, num_steps=41))
    with pytest.raises(TfhybridInputError, match=r"different settings \(observed_sha1\)"):
        fit_map(_posterior(vae, shift=1e-3), checkpoint_dir=ckpt, **SETTINGS)
    assert calls == ["find_map", "polish"]  # refused before any work
    (ckpt / "config.json").unlink()  # stage files of unknown provenance are not used
    with pytest.raises(TfhybridInputError, match="no config.json"):
        fit_map(post, checkpoint_dir=ckpt, **SETTINGS)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TfhybridInputError, match="cannot create the checkpoint directory"):
        fit_map(post, checkpoint_dir=blocker / "ckpt", **SETTINGS)


def test_sampling_chunks_resume_only_for_the_same_data_map_and_whitening(tmp_path,
                                                                         monkeypatch):
    # The sampler runs in coordinates whitened about the MAP, so its start is always zero: the
    # chunks must record the posterior's fingerprint, the MAP and the whitening, so that a
    # rerun in the same directory with other data or another start is refused instead of
    # mixing chains. (The sampler's own check is tests/inference/test_mcmc.py's; here it is
    # given what the lens layer passes, without compiling a sampler.)
    from tfhybrid.io import check_or_write_config

    class Checked(Exception):
        pass

    def check_only(target, state, checkpoint_dir=None, checkpoint_config=None, **kwargs):
        check_or_write_config(checkpoint_dir, checkpoint_config)
        raise Checked

    monkeypatch.setattr(fit_module, "sample_posterior", check_only)
    vae = SmoothSourceModel()
    post = _posterior(vae)
    start = post.state_from_dict(dict(TRUTH, z=np.full(8, 0.3, np.float32)))
    kwargs = dict(num_results=4, num_burnin=0, progress=False,
                  hessian=np.eye(20)[None] * 1e4, checkpoint_dir=tmp_path / "chunks")
    for _ in range(2):  # written, then found the same
        with pytest.raises(Checked):
            sample_lens_posterior(post, start, **kwargs)
    with pytest.raises(TfhybridInputError, match=r"different settings \(observed_sha1\)"):
        sample_lens_posterior(_posterior(vae, shift=1e-3), start, **kwargs)
    moved = post.state_from_dict(dict(TRUTH, r_ein=1.31, z=np.full(8, 0.3, np.float32)))
    with pytest.raises(TfhybridInputError, match=r"different settings \(map_sha1\)"):
        sample_lens_posterior(post, moved, **kwargs)
    with pytest.raises(TfhybridInputError, match=r"different settings \(whitening_sha1\)"):
        sample_lens_posterior(post, start, **dict(kwargs, hessian=np.eye(20)[None] * 2e4))
