"""Benchmarks run by `shardwire bench` (figures are printed, never asserted)."""
