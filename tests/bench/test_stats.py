"""Latency summaries: the fixed-memory histogram agrees with exact nearest-rank percentiles."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from simvirt.bench.stats import SUB_BITS, LatencyHistogram, percentiles_us


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**10), min_size=1, max_size=3000))
def test_histogram_percentiles_within_one_bucket_of_exact(samples):
    h = LatencyHistogram()
    for x in samples:
        h.append(x)
    exact = percentiles_us(samples)
    approx = percentiles_us(h)
    assert approx["max"] == exact["max"] and abs(approx["mean"] - exact["mean"]) <= 0.01
    for k in ("p50", "p90", "p99", "p999"):
        # Never below the true sample, above it by at most one bucket (plus rounding to 0.01 us).
        assert exact[k] - 0.01 <= approx[k] <= exact[k] * (1 + 2.0 / (1 << SUB_BITS)) + 0.011, k


def test_histogram_memory_is_bounded():
    h = LatencyHistogram()
    rng = random.Random(1)
    for _ in range(200_000):
        h.append(int(rng.lognormvariate(11, 1.5)))
    assert len(h) == 200_000 and len(h.counts) < 64 * (1 << SUB_BITS)
    small = LatencyHistogram()
    for x in range(100):
        small.append(x)
    assert percentiles_us(small) == percentiles_us(list(range(100)))   # small values are exact
