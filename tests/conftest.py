"""Test-session settings.

The ``tfhybrid`` command keeps XLA's compiled programs in ``~/.cache/tfhybrid/xla`` by
default; tests that call it (in this process or in subprocesses) use no cache unless they
ask for one, so a test run never writes outside its temporary directories.
"""

import os

os.environ.setdefault("TFHYBRID_COMPILE_CACHE", "off")
