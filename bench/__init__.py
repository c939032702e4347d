"""The relay's benchmarks: `python -m bench ingest|forward|burst|ready|all` (see __main__)."""
