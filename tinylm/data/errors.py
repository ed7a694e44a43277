"""The one exception type for data problems a user can cause and fix."""

from __future__ import annotations


class DataError(ValueError):
    """A data source, prepared dataset or split is unusable; the message says why and what to do."""
