"""Support code for the tests and the benchmarks: real servers and renderers, no fixtures."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository's root
