"""loupe's benchmarks: `python benchmarks/bench.py` (on demand; never part of the test command)."""
