"""Moved to `pipeline.cache.feature_cache`; `from pipeline.feature_cache import FeatureCache` keeps working (the
very same module object)."""

import sys

from pipeline.cache import feature_cache as _moved

sys.modules[__name__] = _moved
