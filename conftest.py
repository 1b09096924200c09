"""Root test setup, shared by tests/ and the notebooks that nbmake executes.

``JAXDIFF_FAST=1`` (unless set otherwise) makes notebooks and the demo run in their small mode;
the kernels nbmake starts inherit it.
"""

import os

os.environ.setdefault("JAXDIFF_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
