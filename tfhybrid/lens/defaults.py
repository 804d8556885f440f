"""Defaults of the lensing MAP pipeline, in one place and free of TensorFlow imports.

Shared by :func:`tfhybrid.lens.fit.fit_map`, the ``tfhybrid lens fit`` and ``tfhybrid demo``
commands (whose ``--help`` must not import TensorFlow), ``scripts/lens_mock_study.py`` and
``benchmarks/bench_lens_fit.py``, so that the study's accuracy and the benchmark's wall time
describe one pipeline.
"""

#: full-resolution starts per system (the best of the coarse search)
DEFAULT_NUM_STARTS = 2
#: full-resolution Adam steps (the source-scale jumps run half as many)
DEFAULT_MAP_STEPS = 1500
