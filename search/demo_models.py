"""Moved to demos.models; this alias keeps `from search.demo_models import ...` (benchmarks/) working."""

from demos.models import *  # noqa: F403
from demos.models import build_demo_models  # noqa: F401  (named for readers and linters)
