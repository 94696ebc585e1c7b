"""The `streamspec` command line (`cli.py`, one module per command in `commands/`),
benchmarks (`bench.py`, `bench_attention.py`) and the profiler (`profiler/`)."""
