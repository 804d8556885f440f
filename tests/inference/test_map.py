"""Tests of tfhybrid.inference.map: optimum of ill-conditioned quadratic and Rosenbrock."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.inference.map import FunctionalAdam, find_map
from tfhybrid.validation import TfhybridInputError

tfb = tfp.bijectors


def _rosenbrock_lp(x, y):
    return -((1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2)


def test_lbfgs_quadratic_100d_and_rosenbrock():
    """One L-BFGS run (tracing costs seconds) over two independent blocks of parameters."""
    rng = np.random.default_rng(0)
    d = 100
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    hess = (q * np.logspace(0, 3, d)) @ q.T  # rotated, condition number 1e3
    mu = rng.normal(size=d)
    h, m = tf.constant(hess), tf.constant(mu)

    def lp(x, xy):
        quad = -0.5 * tf.reduce_sum((x - m) * tf.linalg.matvec(h, x - m), -1)
        return quad + _rosenbrock_lp(xy[..., 0], xy[..., 1])

    start = [tf.zeros(d, tf.float64), tf.constant([-1.2, 1.0], tf.float64)]
    res = find_map(lp, start, method="lbfgs", num_steps=2000, tolerance=1e-9, progress=False)
    assert res.all_converged, res.message
    # float64, gradient tolerance 1e-9 / smallest curvature 1 -> error ~1e-9; allow 1e-6
    np.testing.assert_allclose(res.state[0].numpy(), mu, atol=1e-6)
    np.testing.assert_allclose(res.state[1].numpy(), [1.0, 1.0], atol=1e-6)
    assert res.log_prob > -1e-10


def test_adam_rosenbrock_multistart_batched():
    starts = [tf.constant([-1.2, 0.0], tf.float64), tf.constant([1.0, 0.0], tf.float64)]
    # a decaying step is what makes Adam settle in the banana valley instead of orbiting in it
    schedule = keras.optimizers.schedules.PolynomialDecay(0.05, 8000, 1e-4)
    res = find_map(
        _rosenbrock_lp, starts, method="adam", num_steps=10000, learning_rate=schedule,
        rtol=1e-10, progress=False, steps_per_update=200,
    )
    assert res.all_converged, res.message
    # Adam (the paper's optimiser) creeps along the banana valley: 1e-4 is what it reaches
    np.testing.assert_allclose(res.state[0].numpy(), 1.0, atol=1e-4)
    np.testing.assert_allclose(res.state[1].numpy(), 1.0, atol=2e-4)
    assert res.loss_trace.shape[1:] == (2,) and res.best_index is not None


def test_functional_adam_matches_the_adam_update_and_keras_adam():
    """The compiled loop's Adam against a float64 NumPy Adam (Kingma & Ba, Keras's form of the
    bias correction) to 1e-12, and against keras.optimizers.Adam to 1e-4: Keras rounds
    β₂ = 0.999 to float32 before using it in float64 (1 − β₂ off by 1.3e-5 relative), which
    moves its float64 steps by ~7e-6 relative (a wrong ε, β or bias correction moves them by
    > 1e-3). A schedule (evaluated at the 0-based step, as Keras does) and a non-quadratic
    target with gradients of very different sizes per coordinate exercise the bias correction
    and ε.
    """
    schedule = keras.optimizers.schedules.PolynomialDecay(0.05, 40, 1e-3)
    x0 = [np.array([-1.2, 1.0, 1e-4]), np.array([[3.0]])]

    def loss(x, y):
        return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2 + 1e-6 * x[2] + y[0, 0] ** 4

    def grads_of(params):
        with tf.GradientTape() as tape:
            tape.watch(params)
            value = loss(*params)
        return tape.gradient(value, params)

    variables = [tf.Variable(v) for v in x0]
    keras_adam = keras.optimizers.Adam(learning_rate=schedule)
    ours = FunctionalAdam(schedule)
    params = [tf.constant(v) for v in x0]
    state = ours.init(params)
    ref, m, v = [v.copy() for v in x0], [0.0 * v for v in x0], [0.0 * v for v in x0]
    for step in range(50):
        keras_adam.apply_gradients(zip(grads_of([tf.convert_to_tensor(x) for x in variables]),
                                       variables, strict=False))
        updates, state = ours.update(grads_of(params), state, params)
        params = [p + u for p, u in zip(params, updates, strict=False)]
        lr = float(schedule(step))
        for i, g in enumerate(grads_of([tf.constant(x) for x in ref])):
            g = g.numpy()
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            m_hat, v_hat = m[i] / (1 - 0.9 ** (step + 1)), v[i] / (1 - 0.999 ** (step + 1))
            eps_hat = 1e-7 / np.sqrt(1 - 0.999 ** (step + 1))  # Keras adds ε to √v, not √v̂
            ref[i] = ref[i] - lr * m_hat / (np.sqrt(v_hat) + eps_hat)
    for r, p, k in zip(ref, params, variables, strict=False):
        np.testing.assert_allclose(p.numpy(), r, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(p.numpy(), k.numpy(), rtol=1e-4)
    assert int(state[0]) == 50


@pytest.mark.parametrize("jit", [False, True])
def test_adam_chunks_resume_the_optimiser_state(jit):
    """Chunked Adam (optimiser state carried between compiled chunks) == one long chunk."""
    args = dict(method="adam", num_steps=60, learning_rate=0.05, rtol=0.0, progress=False,
                jit_compile=jit)
    start = tf.constant([-1.2, 1.0], tf.float64)

    def lp(x):
        return _rosenbrock_lp(x[0], x[1])

    chunked = find_map(lp, start, steps_per_update=7, **args)
    whole = find_map(lp, start, steps_per_update=60, **args)
    assert chunked.num_steps == whole.num_steps == 60
    np.testing.assert_allclose(chunked.state[0].numpy(), whole.state[0].numpy(), rtol=1e-10)
    np.testing.assert_allclose(chunked.loss_trace, whole.loss_trace, rtol=1e-10)


@pytest.mark.parametrize("jit,grouped", [(False, False), (True, False), (True, True)])
def test_pruned_starts_follow_the_unpruned_run_and_keep_the_deepest_wells(jit, grouped):
    """``prune_after``: the kept starts continue exactly as in the run without pruning (their
    Adam moments and the step count carried over: float64, 1e-12), the dropped ones leave NaN
    in the loss trace, and on a double well per system the kept starts are the deeper well's.
    A start's trajectory depends only on its own coordinates (Adam is per coordinate), so any
    mix-up of starts, systems or moments in the gather shows as a different state. With
    ``prune_grouped`` the starts run two at a time before the pruning (4 starts: 2 groups)."""
    tilt = tf.constant([0.3, -0.3, 0.2], tf.float64)  # system j's deeper well: sign(tilt_j)

    def lp(x, y):  # batch (starts, systems); x: double well, y (event size 2): a quadratic
        quad = -tf.reduce_sum((y - tf.constant([1.0, -2.0], tf.float64)) ** 2, -1)
        return -((x**2 - 1.0) ** 2) + tilt * x + quad

    xs = np.array([-1.6, -0.4, 0.3, 1.7])[:, None] * np.array([1.0, 1.1, 0.9])[None]
    start = [tf.constant(xs), tf.zeros((4, 3, 2), tf.float64)]
    args = dict(method="adam", num_steps=300, learning_rate=0.02, rtol=0.0, progress=False,
                steps_per_update=40, jit_compile=jit)
    full = find_map(lp, start, **args)
    args["prune_grouped"] = grouped
    pruned = find_map(lp, start, prune_after=60, prune_keep=2, **args)
    kept = pruned.kept_starts
    assert full.kept_starts is None and kept.shape == (2, 3)
    # the kept starts are the ones in the deeper well (x > 0 for tilt > 0), best first
    for j, t in enumerate(tilt.numpy()):
        assert set(kept[:, j]) == ({2, 3} if t > 0 else {0, 1})
    assert pruned.log_prob.shape == (2, 3) and pruned.state[1].shape == (2, 3, 2)
    for part_p, part_f in zip(pruned.state, full.state, strict=True):
        want = np.take_along_axis(part_f.numpy(), kept.reshape(kept.shape + (1,) * (
            part_f.shape.rank - 2)), axis=0)
        np.testing.assert_allclose(part_p.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pruned.log_prob, np.take_along_axis(full.log_prob, kept, 0),
                               rtol=1e-12)
    trace = pruned.loss_trace
    assert trace.shape == full.loss_trace.shape == (300, 4, 3)
    np.testing.assert_array_equal(trace[:60], full.loss_trace[:60])
    after = np.isnan(trace[60:])
    dropped = np.ones((4, 3), bool)
    np.put_along_axis(dropped, kept, False, axis=0)
    assert np.array_equal(after, np.broadcast_to(dropped, after.shape))
    assert pruned.best_index == np.unravel_index(np.argmax(pruned.log_prob), (2, 3))

    # prune_margin: the pruning waits for the first chunk end (steps 60, 100, 140, ...) where
    # the kept starts lead the dropped ones by the margin in every column; read off the
    # unpruned run's trace (the loss at a chunk's last step)
    ranked = np.sort(full.loss_trace, axis=1)
    lead = (ranked[:, 2] - ranked[:, 1]).min(axis=1)  # (steps,), weakest column
    ends = [60, 100, 140, 180, 220, 260]
    margin = 0.5 * (lead[ends[0] - 1] + lead[ends[2] - 1])
    expected = next(k for k in ends if lead[k - 1] >= margin)
    assert expected > 60  # the margin holds the pruning back
    late = find_map(lp, start, prune_after=60, prune_keep=2, prune_margin=margin, **args)
    first_nan = np.flatnonzero(np.isnan(late.loss_trace).any(axis=(1, 2)))[0]
    assert first_nan == expected
    # the same starts (ranked at a later step, so perhaps in another order) reach the same
    # optimum: the later pruning changes no trajectory
    np.testing.assert_array_equal(np.sort(late.kept_starts, 0), np.sort(kept, 0))
    np.testing.assert_allclose(np.sort(late.log_prob, 0), np.sort(pruned.log_prob, 0),
                               rtol=1e-12)
    never = find_map(lp, start, prune_after=60, prune_keep=2, prune_margin=1e9, **args)
    assert never.kept_starts is None and never.log_prob.shape == (4, 3)
    np.testing.assert_array_equal(never.loss_trace, full.loss_trace)


def test_grouped_pruning_pads_the_last_group():
    """3 starts in groups of 2: the padded copy's results are dropped, and every start's
    trajectory is the unpruned run's (float64, 1e-12)."""
    def lp(x):
        return -((x**2 - 1.0) ** 2) + 0.2 * x

    start = tf.constant([-1.5, 0.2, 1.4], tf.float64)
    args = dict(method="adam", num_steps=100, learning_rate=0.02, rtol=0.0, progress=False,
                steps_per_update=20, jit_compile=True)
    full = find_map(lp, start, **args)
    grouped = find_map(lp, start, prune_after=40, prune_keep=2, prune_grouped=True, **args)
    np.testing.assert_array_equal(grouped.loss_trace[:40], full.loss_trace[:40])
    assert sorted(grouped.kept_starts.tolist()) == [1, 2]
    np.testing.assert_allclose(grouped.state[0].numpy(),
                               full.state[0].numpy()[grouped.kept_starts], rtol=1e-12)


def test_pruning_bad_inputs_and_no_ops():
    lp = _rosenbrock_lp
    two = [tf.constant([-1.2, 1.0]), tf.constant([1.0, 0.5])]
    with pytest.raises(TfhybridInputError, match="adam"):
        find_map(lp, two, method="lbfgs", prune_after=5, progress=False)
    with pytest.raises(TfhybridInputError, match="prune_after"):
        find_map(lp, two, prune_after=0, num_steps=20, progress=False)
    with pytest.raises(TfhybridInputError, match="prune_margin"):
        find_map(lp, two, prune_after=5, prune_margin=-1.0, num_steps=20, progress=False)
    with pytest.raises(TfhybridInputError, match="prune_keep"):
        find_map(lp, two, prune_after=5, prune_keep=0, num_steps=20, progress=False)
    with pytest.raises(TfhybridInputError, match="batched"):
        find_map(lp, [tf.constant(-1.2), tf.constant(1.0)], prune_after=5, num_steps=20,
                 progress=False)
    # keeping every start, or pruning at the end, is no pruning
    for kw in (dict(prune_after=5, prune_keep=2), dict(prune_after=20, prune_keep=1)):
        res = find_map(lp, two, num_steps=20, steps_per_update=5, progress=False, **kw)
        assert res.kept_starts is None and res.log_prob.shape == (2,)


def _numpy_adam(grad, x0: np.ndarray, lr: float, steps: range, m=None, v=None):
    """Adam in float64 NumPy (Keras's bias correction, at the global 0-based ``steps``)."""
    x = x0.copy()
    m = np.zeros_like(x) if m is None else m
    v = np.zeros_like(x) if v is None else v
    for step in steps:
        g = grad(x)
        m, v = m + (g - m) * (1 - 0.9), v + (g * g - v) * (1 - 0.999)
        t = step + 1
        x = x + -(lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)) * m / (np.sqrt(v) + 1e-7)
    return x, m, v


@pytest.mark.parametrize("jit", [False, True])
def test_restart_replaces_the_marked_starts_with_zeroed_moments(jit):
    """``restart_after``/``restart_fn``: at step 40 the worst start of each system (column)
    restarts at the best one's point moved (x tripled, y + 1), through a bijector. The starts that
    were not marked continue exactly as without the restart; a restarted start follows Adam from
    its new point with zero moments and the run's step count (both against a float64 NumPy
    Adam, 1e-10). The callback sees the constrained state and the last losses."""
    centre = np.array([[1.0, -2.0]])  # optimum of y (constrained, > 0 after exp is the x part)

    def lp(x, y):  # x > 0 through Exp; batch (starts, systems)
        return -(tf.math.log(x) - 0.5) ** 2 - tf.reduce_sum((y - centre) ** 2, -1)

    x0 = np.array([[0.5, 2.0], [1.5, 0.3], [4.0, 1.0]])
    y0 = np.zeros((3, 2, 2))
    seen = {}

    def restart_fn(state, loss):
        seen["state"], seen["loss"] = state, loss
        best, worst = np.argmin(loss, 0), np.argmax(loss, 0)
        rows = np.zeros(loss.shape, bool)
        rows[worst, [0, 1]] = True
        new = [p.copy() for p in state]
        # away from the optimum, where Adam's normalised steps would amplify rounding
        new[0][worst, [0, 1]] = 3.0 * state[0][best, [0, 1]]
        new[1][worst, [0, 1]] = state[1][best, [0, 1]] + 1.0
        seen["rows"], seen["new"] = rows, new
        return rows, new

    args = dict(bijectors=[tfb.Exp(), None], num_steps=100, learning_rate=0.05, rtol=0.0,
                progress=False, steps_per_update=30, jit_compile=jit)
    start = [tf.constant(x0), tf.constant(y0)]
    plain = find_map(lp, start, **args)
    res = find_map(lp, start, restart_after=40, restart_fn=restart_fn, **args)
    rows = seen["rows"]
    # the callback got the constrained state at step 40 and the loss of its last step
    assert seen["state"][0].shape == (3, 2) and np.all(seen["state"][0] > 0)
    np.testing.assert_allclose(seen["loss"], res.loss_trace[39], rtol=1e-12)
    np.testing.assert_array_equal(res.loss_trace[:40], plain.loss_trace[:40])

    def grad_u(w):  # gradient of -lp in unconstrained space, w = (log x, y0, y1)
        return np.concatenate([2.0 * (w[:1] - 0.5), 2.0 * (w[1:] - centre[0])])

    for i, j in np.ndindex(rows.shape):
        got = np.concatenate([[np.log(res.state[0].numpy()[i, j])], res.state[1].numpy()[i, j]])
        w0 = np.concatenate([[np.log(x0[i, j])], y0[i, j]])
        if rows[i, j]:
            w_mid, m, v = _numpy_adam(grad_u, w0, 0.05, range(40))
            w_new = np.concatenate([[np.log(seen["new"][0][i, j])], seen["new"][1][i, j]])
            want = _numpy_adam(grad_u, w_new, 0.05, range(40, 100))[0]
        else:
            want = _numpy_adam(grad_u, w0, 0.05, range(100))[0]
            np.testing.assert_array_equal(res.state[1].numpy()[i, j],
                                          plain.state[1].numpy()[i, j])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # a restart whose moments were not reset would differ (the check has teeth)
    w_new = np.concatenate([[np.log(seen["new"][0][0, 0])], seen["new"][1][0, 0]])
    i = int(np.argmax(rows[:, 0]))
    _, m, v = _numpy_adam(grad_u, np.concatenate([[np.log(x0[i, 0])], y0[i, 0]]), 0.05,
                          range(40))
    kept_moments = _numpy_adam(grad_u, w_new, 0.05, range(40, 100), m, v)[0]
    fresh = _numpy_adam(grad_u, w_new, 0.05, range(40, 100))[0]
    assert np.max(np.abs(kept_moments - fresh)) > 1e-6


def test_restart_bad_inputs():
    lp = _rosenbrock_lp
    two = [tf.constant([-1.2, 1.0]), tf.constant([1.0, 0.5])]
    with pytest.raises(TfhybridInputError, match="adam"):
        find_map(lp, two, method="lbfgs", restart_after=5, restart_fn=lambda s, l: None,
                 progress=False)
    with pytest.raises(TfhybridInputError, match="callable"):
        find_map(lp, two, restart_after=5, num_steps=20, progress=False)
    with pytest.raises(TfhybridInputError, match="cannot be combined"):
        find_map(lp, two, restart_after=5, restart_fn=lambda s, l: None, prune_after=5,
                 num_steps=20, progress=False)
    with pytest.raises(TfhybridInputError, match="rows of shape"):
        find_map(lp, two, restart_after=5, num_steps=20, progress=False,
                 restart_fn=lambda s, l: (np.ones(3, bool), s))
    with pytest.raises(TfhybridInputError, match="outside the support"):
        find_map(lp, two, bijectors=[tfb.Exp(), None], restart_after=5, num_steps=20,
                 progress=False, restart_fn=lambda s, l: (np.ones(2, bool), [-s[0], s[1]]))
    # returning None changes nothing
    a = find_map(lp, two, num_steps=20, steps_per_update=5, progress=False)
    b = find_map(lp, two, num_steps=20, steps_per_update=5, progress=False, restart_after=5,
                 restart_fn=lambda s, l: None)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


def test_bijectors_keep_parameters_in_support():
    # Gamma(3, 2) mode is 1; q with a Beta(2, 5) prior has mode 0.2 inside (0, 1)
    def lp(scale, q):
        return tfp.distributions.Gamma(3.0, 2.0).log_prob(scale) + tfp.distributions.Beta(
            2.0, 5.0
        ).log_prob(q)

    res = find_map(
        lp, [tf.constant(5.0), tf.constant(0.9)], bijectors=[tfb.Softplus(), tfb.Sigmoid()],
        method="adam", num_steps=3000, learning_rate=0.05, num_starts=4, seed=3, progress=False,
    )
    assert res.all_converged, res.message
    np.testing.assert_allclose(res.state[0].numpy(), 1.0, atol=1e-3)
    np.testing.assert_allclose(res.state[1].numpy(), 0.2, atol=1e-3)
    assert np.all(res.state[0].numpy() > 0) and np.all(res.state[1].numpy() > 0)
    assert np.all(res.state[1].numpy() < 1)
    # jittered starts differ (start 0 is the given point)
    assert len(np.unique(res.loss_trace[0])) == 4


def test_not_converged_is_reported_not_raised():
    res = find_map(_rosenbrock_lp, [tf.constant(-1.2), tf.constant(1.0)], num_steps=20,
                   learning_rate=1e-4, progress=False, steps_per_update=10)
    assert not res.all_converged and "NOT converged" in res.message


def test_bad_inputs():
    with pytest.raises(TfhybridInputError, match="outside the support"):
        find_map(lambda s: -s, tf.constant(-1.0), bijectors=tfb.Softplus(), progress=False)
    with pytest.raises(TfhybridInputError, match="method"):
        find_map(lambda s: -s, tf.constant(1.0), method="sgd", progress=False)
    with pytest.raises(TfhybridInputError, match="not finite"):
        find_map(lambda s: tf.math.log(s), tf.constant(0.0), progress=False)


def test_bijector_keeps_iterates_inside_support_when_optimum_is_outside():
    """The unconstrained optimum of -(s + 1)^2 / 2 is s = -1, outside s > 0.

    Through a Softplus bijector every iterate the target sees must stay strictly positive
    (checked inside the compiled loop by an assertion that raises if violated) while the MAP
    is driven to the boundary s -> 0+. Without the bijector Adam would reach s = -1 within a
    few hundred steps of 0.05 (the last check proves that it would fail the assertion).
    float64 so that softplus(u) of a large negative u stays representable (> 0).
    """

    def lp_checked(s):
        with tf.control_dependencies([tf.debugging.assert_positive(s, message="left support")]):
            return -0.5 * (tf.identity(s) + 1.0) ** 2

    res = find_map(
        lp_checked, tf.constant(2.0, tf.float64), bijectors=tfb.Softplus(), method="adam",
        num_steps=1500, learning_rate=0.05, progress=False,
    )
    s = float(res.state[0].numpy())
    # 1500 Adam steps of <= 0.05 move u to about -70: softplus(-70) ~ 4e-31 > 0; allow 1e-2
    assert 0.0 < s < 1e-2, s
    with pytest.raises(tf.errors.InvalidArgumentError, match="left support"):
        find_map(lp_checked, tf.constant(2.0, tf.float64), method="adam", num_steps=1500,
                 learning_rate=0.05, progress=False)
