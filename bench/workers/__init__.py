"""One module per contender. Each runs as its own process (`python -m bench.workers.<name>`)
and imports only its own library, so no two OpenMP runtimes share a process."""
