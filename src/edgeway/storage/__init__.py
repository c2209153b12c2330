"""Shared storage helpers (see :mod:`edgeway.storage.sqlite`)."""
