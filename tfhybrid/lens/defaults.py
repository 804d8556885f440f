"""Defaults of the lensing MAP pipeline, in one place and free of TensorFlow imports.

Shared by :func:`tfhybrid.lens.fit.fit_map` and :func:`tfhybrid.lens.fit.newton_polish`, the
``tfhybrid lens fit`` and ``tfhybrid demo`` commands (whose ``--help`` must not import
TensorFlow), ``scripts/lens_mock_study.py`` and ``benchmarks/bench_lens_fit.py``, so that the
study's accuracy and the benchmark's wall time describe one pipeline.
"""

#: global search: starts per system on the 4x coarser grid
DEFAULT_COARSE_STARTS = 16
#: global search: Adam steps of each coarse start
DEFAULT_COARSE_STEPS = 500
#: full-resolution starts per system (the best of the coarse search)
DEFAULT_NUM_STARTS = 2
#: full-resolution Adam steps (the Newton + L-BFGS polish converges what they leave). 1000
#: instead of 1 500 on the seed-1 study (10 systems batched): MAP 635 s instead of 696 s, log p
#: -10 to +20 nats per system (-7 in all), r_Ein and γ both within 1 % in 6/10 either way,
#: median errors r_Ein 0.54 % / 0.50 %, γ 0.35 % / 0.46 %
DEFAULT_MAP_STEPS = 1000
#: full-resolution Adam: from this step on, only the leading start of each system goes on, once
#: it leads the other by DEFAULT_PRUNE_MARGIN nats in every system (checked every chunk). On the
#: seed-0 and seed-1 study mocks (20 systems, 2 starts each; find_map's traces) the start
#: leading at step 200 ended ahead in 18; the two that did not led by 16.8 and 1.3 nats at step
#: 200 (the winners by 11.4 to 1 977, all but one by more than 20). Pruning at step 200 without
#: the margin cost the seed-1 study 29.9 nats in one system after the polish (the others within
#: 0.2 nats)
DEFAULT_PRUNE_AFTER = 200
#: the lead (nats) the leading start needs for the pruning (see DEFAULT_PRUNE_AFTER)
DEFAULT_PRUNE_MARGIN = 20.0
#: where the source-scale jumps run: "coarse" (on the coarse grid, competing for the
#: full-resolution starts) or "full" (after the full-resolution optimiser, num_steps // 2 steps)
DEFAULT_JUMP_STAGE = "coarse"
#: damped Newton iterations of the polish
DEFAULT_NEWTON_ITER = 3
#: whitened L-BFGS iterations per polish run
DEFAULT_LBFGS_ITER = 200
#: at most this many re-whitened L-BFGS runs (until a run gains < 1 nat in every system)
DEFAULT_LBFGS_CYCLES = 3
#: side of the source-plane residual grid integrated out after the MAP by ``tfhybrid lens fit``
#: and the study (0: the paper's white likelihood; see tfhybrid.physics.source_residual). On
#: the 10-mock study (v13 against v12) it raised r_Ein and γ both within 1 % from 4 to 5–6
#: systems and the 68 % coverage of r_Ein, θ_E, γ, φ, q from 3, 5, 6, 6, 3 to 4, 6, 8, 5, 6;
#: over 30 mocks (three sets of 10, end to end) r_Ein and γ within 1 % in 17, coverage 13,
#: 16, 16, 15, 13 of 30 (20.4 ± 2.6 expected)
DEFAULT_SOURCE_RESIDUAL_GRID = 24
#: rounds of (σ_δ by the evidence, then the polish with that residual): the second re-chooses
#: σ_δ (~10 % larger) where the first moved the lens, with L-BFGS only, whitened by the first
#: round's Hessian (DEFAULT_RESIDUAL_LATER_CYCLES runs). Over the 30 study mocks, one round
#: kept r_Ein and γ both within 1 % in 17/30 but lowered the 68 % coverage of q from 17 to
#: 15/30 (p = 0.048) and of r_Ein from 18 to 17; the L-BFGS-only second round (up to 3 runs):
#: 17/30, coverage 18 and 16 (the full round's: 17/30, 18 and 17) at 26–64 s instead of
#: 72–111 s per 10 systems
DEFAULT_RESIDUAL_ROUNDS = 2
#: L-BFGS runs of each residual round after the first (at most; the first round makes up to
#: DEFAULT_LBFGS_CYCLES). Measured with 3 (the rows above): on the 30 study mocks 1 gave the
#: same MAPs to the bit in 27 and 0.7–2.1 nats lower in 3, with the same scores (see
#: tfhybrid.lens.fit.polish_with_source_residual)
DEFAULT_RESIDUAL_LATER_CYCLES = 1
#: node spacing of that grid in source-stamp pixels
DEFAULT_RESIDUAL_PIXEL_FACTOR = 1.0
#: side (image pixels) of the sliding windows of the model-robust (sandwich) intervals at the
#: MAP (tfhybrid.lens.robust; 0 in the CLI: none): larger than the source misfit's
#: correlation length in the image (the PSF, σ = 1.25 pixels, and the lensed source's
#: features), small enough for ~(256 / 16)² independent windows
DEFAULT_ROBUST_BLOCK = 16
#: step, in Laplace-whitened units, of the opt-in HMC whitening at the posterior's scale
#: (tfhybrid.lens.fit.posterior_scale_whitening; ``tfhybrid lens sample --whitening-step``)
DEFAULT_WHITENING_STEP = 1.0
#: floor of the curvatures that whitening measures (Laplace-whitened units: a direction at the
#: floor gets a width of 1 / sqrt(floor) ≈ 22 Laplace widths)
DEFAULT_WHITENING_FLOOR = 2e-3
