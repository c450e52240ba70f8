"""Moved to `pipeline.dataset.reader`; `pipeline.reader` keeps working for consumers (the very same module object)."""

import sys

from pipeline.dataset import reader as _moved

sys.modules[__name__] = _moved
