"""The `streamspec` command line (`cli.py`, one module per command in `commands/`),
benchmarks (`bench*.py`, `tune.py`) on one measuring harness (`harness.py`) and the
profiler (`profiler/`)."""
