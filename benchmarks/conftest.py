"""Benchmarks are run explicitly (``pytest benchmarks/ --benchmark-only``); pyproject's testpaths keep
them out of the normal test suite. This makes ``workloads.py`` beside this file importable."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
