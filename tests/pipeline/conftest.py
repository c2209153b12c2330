"""Fixtures for the pipeline tests; the helpers live in pipeline_harness.py
(a unique module name: several test folders have a conftest.py)."""

from pipeline_harness import *  # noqa: F403 - fixtures must be visible here
