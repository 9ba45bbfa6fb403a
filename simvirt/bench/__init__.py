"""Benchmarks: each prints one JSON object with --json."""
