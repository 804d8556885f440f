"""Time one 256x256 lensed image: forward and forward + gradient, XLA on/off, vs lenstronomy.

The forward model is :class:`tfhybrid.physics.lensing.LensingSimulator` with the paper's
settings (256 x 256 at 0.04", SPLE table + external shear, 64 x 64 source by bilinear
interpolation, Gaussian PSF sigma 0.05"). "forward + gradient" is the value of a chi^2-like loss
and its gradient with respect to all 12 parameters AND the 64 x 64 source image, all inside one
``tf.function`` (what a MAP / HMC step runs). lenstronomy's reference is ``ImageModel.image``
with EPL + SHEAR + INTERPOL + GAUSSIAN PSF on the same grid (float64, value only).

Prints milliseconds per call (median of ``--repeats`` after a warm-up call that traces and
compiles) and the ratio to lenstronomy's forward time measured in the same run.
Runtime: ~1-2 min on 2 CPU cores.

Usage::

    nice -n 10 python benchmarks/bench_lensing.py [--repeats 20] [--batch 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def _median_ms(fn, repeats):
    start = time.perf_counter()
    fn()  # warm-up: tracing / XLA compilation
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), first


def _source(n=64):
    yy, xx = np.mgrid[:n, :n]
    img = np.exp(-((xx - 30) ** 2 + (yy - 36) ** 2) / 40.0)
    return img + 0.5 * np.exp(-((xx - 40) ** 2 + (yy - 25) ** 2) / 15.0)


def _tf_rows(tf, lensing, source, batch, repeats, deflection, dtype):
    rows = []
    for jit in (True, False):
        rows += _time_one(tf, lensing, source, batch, repeats, deflection, dtype, jit)
    return rows


def _time_one(tf, lensing, source, batch, repeats, deflection, dtype, jit):
    config = lensing.LensingConfig(deflection=deflection, dtype=dtype, jit_compile=jit)
    sim = lensing.LensingSimulator(config)
    tdt = config.tf_dtype
    src = tf.constant(np.repeat(source[None], batch, 0), tdt)
    params = {k: tf.constant(np.full(batch, v), tdt) for k, v in PARAMS.items()}
    n_terms = None
    if deflection == "epl":
        n_terms = int(lensing.lens_profiles.epl_num_terms(params["q"], tdt))
    data = sim._compiled(src, params, n_terms)
    weights = tf.constant(np.random.default_rng(0).normal(size=data.shape), tdt)

    def forward():
        return sim._compiled(src, params, n_terms).numpy()

    @tf.function(jit_compile=jit, reduce_retracing=False)
    def value_and_grad(src, params):
        with tf.GradientTape() as tape:
            tape.watch([src, params])
            image = sim._forward(src, params, n_terms)
            loss = tf.reduce_sum((image - data - 0.01 * weights) ** 2)
        return loss, tape.gradient(loss, [src, params])

    def grad():
        loss, (g_src, g_par) = value_and_grad(src, params)
        return loss.numpy(), g_src.numpy(), {k: v.numpy() for k, v in g_par.items()}

    label = f"{deflection:5s} {dtype} XLA {'on ' if jit else 'off'}"
    ms_f, first_f = _median_ms(forward, repeats)
    ms_g, first_g = _median_ms(grad, repeats)
    _, _, g_par = grad()
    assert all(np.all(np.isfinite(v)) for v in g_par.values())
    return [
        (f"ours  {label}  forward", ms_f, first_f),
        (f"ours  {label}  forward + gradient (12 params + source)", ms_g, first_g),
    ]


def _lenstronomy_ms(lensing, source, repeats):
    from lenstronomy.Data.pixel_grid import PixelGrid
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    config = lensing.LensingConfig()
    n, pix = config.n_pix, config.pixel_scale_arcsec
    grid = PixelGrid(n, n, np.diag([pix, pix]), -(n - 1) / 2 * pix, -(n - 1) / 2 * pix)
    psf = PSF(
        psf_type="GAUSSIAN", fwhm=0.05 * 2 * np.sqrt(2 * np.log(2)), pixel_size=pix, truncation=5
    )
    model = ImageModel(
        grid,
        psf,
        lens_model_class=LensModel(["EPL", "SHEAR"]),
        source_model_class=LightModel(["INTERPOL"]),
        kwargs_numerics={"supersampling_factor": 1},
    )
    kw = lensing.params_to_lenstronomy(PARAMS, source.shape)[0]
    kw["kwargs_source"][0]["image"] = source

    def forward():
        # INTERPOL keeps its spline of the (fixed) image between calls: the cheapest case
        return model.image(kwargs_lens=kw["kwargs_lens"], kwargs_source=kw["kwargs_source"])

    return _median_ms(forward, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="systems per call")
    parser.add_argument("--epl", action="store_true", help="also time the exact-EPL option")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tfhybrid.physics import lensing

    source = _source()
    rows = []
    rows += _tf_rows(tf, lensing, source, args.batch, args.repeats, "table", "float32")
    if args.epl:
        rows += _tf_rows(tf, lensing, source, args.batch, args.repeats, "epl", "float32")
    ref_ms, ref_first = _lenstronomy_ms(lensing, source, args.repeats)

    print(
        f"\n256 x 256 lensed image, batch {args.batch}, 64 x 64 source; median of "
        f"{args.repeats} calls; {os.cpu_count()} CPU cores visible\n"
    )
    print(f"{'model':78s} {'ms/call':>9s} {'ms/image':>9s} {'/ lenstr.':>9s} {'1st call s':>10s}")
    print("-" * 120)
    for label, ms, first in rows:
        per_image = ms / args.batch
        print(f"{label:78s} {ms:9.2f} {per_image:9.2f} {per_image / ref_ms:9.3f} {first:10.2f}")
    print(
        f"{'lenstronomy ImageModel (EPL + SHEAR + INTERPOL + GAUSSIAN PSF) forward':78s} "
        f"{ref_ms:9.2f} {ref_ms:9.2f} {1.0:9.3f} {ref_first:10.2f}"
    )
    best = min(ms for label, ms, _ in rows if "gradient" in label) / args.batch
    print(f"\nbest forward + gradient / lenstronomy forward = {best / ref_ms:.3f} (goal <= 0.25)")


if __name__ == "__main__":
    main()
