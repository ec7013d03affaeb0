"""Benchmark suite of deberta_fast (``pytest benchmarks/``); see benchmarks/README.md."""
