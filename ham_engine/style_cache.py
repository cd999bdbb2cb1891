"""The feature cache's former module name, kept so that code written against it still imports.

New code imports :mod:`ham_engine.feature_cache`; this alias can go once no branch uses it.
"""

from ham_engine.feature_cache import ContentKey, ContentTrajectory, QkvStats, StyleFeatures, StyleKey

__all__ = ["ContentKey", "ContentTrajectory", "QkvStats", "StyleFeatures", "StyleKey"]
