"""Moved to `pipeline.dataset.reader`; this name stays importable (the very same module object, so attributes set
on one are seen through the other)."""

import sys

from pipeline.dataset import reader as _moved

sys.modules[__name__] = _moved
