"""lmforge's benchmark suite: `python -m bench [group] [--quick]`. See bench/README.md.

The package itself imports no torch: it orchestrates worker processes (bench.workers), one
per contender, each importing only its own library."""
