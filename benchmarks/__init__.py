"""Benchmarks of loupe's stages: throughput, peak memory and the projected cost of a full
build. Run on demand with `python benchmarks/run.py`; never part of the test command."""
