"""tfhybrid: hybrid physical / deep-learning inference for astronomical images.

Layers (lower never imports higher):
``data`` → ``physics`` / ``priors`` / ``inference`` → ``lens`` / ``deblend``
→ ``cli``, ``plotting``.
"""

__version__ = "0.1.0"
