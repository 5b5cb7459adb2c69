"""Benchmarks for meshnode (run as modules: ``python -m benchmarks.bench_link``)."""
