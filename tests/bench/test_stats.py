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


def _hist(samples) -> LatencyHistogram:
    h = LatencyHistogram()
    for x in samples:
        h.append(x)
    return h


def _pairwise(a: LatencyHistogram, b: LatencyHistogram) -> LatencyHistogram:
    """The merge as it was written before ``merge``: a dict copy per pair (the reference)."""
    a.summary()
    b.summary()
    out = LatencyHistogram()
    out.counts = dict(a.counts)
    for k, c in b.counts.items():
        out.counts[k] = out.counts.get(k, 0) + c
    out.n, out.total, out.max = a.n + b.n, a.total + b.total, max(a.max, b.max)
    return out


_LATS = st.lists(st.integers(0, 10**10), max_size=300)


@settings(max_examples=60, deadline=None)
@given(st.lists(_LATS, max_size=5))
def test_merge_equals_pairwise_merge(groups):
    hists = [_hist(g) for g in groups]
    want = LatencyHistogram()
    for h in hists:
        want = _pairwise(want, h)
    got = LatencyHistogram.merge(*hists)
    assert got.counts == want.counts
    assert got.summary() == want.summary()
    flat = [x for g in groups for x in g]
    assert got.summary() == (len(flat), sum(flat), max(flat, default=0))
    assert percentiles_us(got) == percentiles_us(want)
    assert LatencyHistogram.max_of(*hists) == got.max
    if len(hists) == 2:
        assert hists[0].merged(hists[1]).counts == got.counts


def test_merge_of_nothing_and_of_empties_is_empty():
    for got in (LatencyHistogram.merge(), LatencyHistogram.merge(LatencyHistogram(), LatencyHistogram())):
        assert len(got) == 0 and got.counts == {} and got.summary() == (0, 0, 0)
        assert got.quantile(0.99) == 0
        assert percentiles_us(got) == percentiles_us([])
    assert LatencyHistogram.max_of() == 0
    assert LatencyHistogram.max_of(LatencyHistogram(), _hist([5, 3])) == 5


def test_merge_folds_unfolded_samples_and_leaves_inputs_alone():
    a, b = _hist([10, 20, 30]), _hist([1000, 2])     # still in the batch buffers, not the buckets
    got = LatencyHistogram.merge(a, b)
    assert got.summary() == (5, 1062, 1000)
    assert (got.max, min(got.counts)) == (1000, 2)
    assert a.summary() == (3, 60, 30) and b.summary() == (2, 1002, 1000)
    got.append(7)                                     # the result is a histogram of its own
    assert len(got) == 6 and len(a) == 3 and len(b) == 2


@settings(max_examples=60, deadline=None)
@given(_LATS, st.sampled_from([0.0, 0.001, 0.5, 0.9, 0.99, 0.999, 1.0]))
def test_quantile_agrees_with_quantile_since_the_start(samples, q):
    h = LatencyHistogram()
    start = h.snapshot()
    for x in samples:
        h.append(x)
    since_start, since_empty = h.quantile_since(start, q), h.quantile_since(({}, 0), q)
    assert since_start == since_empty
    if samples:
        assert h.quantile(q) == since_start
        assert min(samples) <= h.quantile(q) <= max(samples)
    else:
        assert since_start is None and h.quantile(q) == 0     # quantile stays an int
    assert h.quantile_since(h.snapshot(), q) is None            # nothing since a fresh snapshot
