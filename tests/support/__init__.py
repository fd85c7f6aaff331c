"""Support code for the tests and the benchmarks: real servers and renderers, no fixtures."""
