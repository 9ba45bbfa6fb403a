"""Latency summaries for benchmark reports."""
from __future__ import annotations

from typing import Sequence, Union

SUB_BITS = 7  # 128 sub-buckets per power of two: every percentile within 0.8 % of the true sample


class LatencyHistogram:
    """Fixed-memory latency record (log-linear buckets, like HdrHistogram or fio's).

    A benchmark or soak that runs for hours records billions of latencies;
    a list of them is the memory leak.  Values up to 2**SUB_BITS ns are kept
    exactly; above, each power of two splits into 2**SUB_BITS buckets, so a
    percentile is off by less than one part in 2**SUB_BITS.  Mean and max
    are exact.  ``append`` is the list method's name on purpose.
    """

    __slots__ = ("counts", "n", "total", "max")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0
        self.max = 0

    def append(self, ns: int) -> None:
        v = ns if ns > 0 else 0
        shift = v.bit_length() - SUB_BITS - 1
        key = v if shift <= 0 else ((shift + 1) << SUB_BITS) | (v >> shift) - (1 << SUB_BITS)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.n += 1
        self.total += v
        if v > self.max:
            self.max = v

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _value(key: int) -> int:
        """The upper edge of a bucket (what nearest-rank reports, never optimistic)."""
        if key < (1 << (SUB_BITS + 1)):
            return key
        shift = (key >> SUB_BITS) - 1
        mant = (key & ((1 << SUB_BITS) - 1)) + (1 << SUB_BITS)
        return ((mant + 1) << shift) - 1

    def quantile(self, q: float) -> int:
        want = min(self.n, max(1, int(q * self.n + 0.5)))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= want:
                return min(self._value(key), self.max)
        return self.max


def percentiles_us(samples_ns: Union[Sequence[int], LatencyHistogram]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in microseconds (nearest-rank)."""
    if isinstance(samples_ns, LatencyHistogram):
        h = samples_ns
        if not h.n:
            return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
        return {"mean": round(h.total / h.n / 1000.0, 2), "p50": round(h.quantile(0.50) / 1000.0, 2),
                "p90": round(h.quantile(0.90) / 1000.0, 2), "p99": round(h.quantile(0.99) / 1000.0, 2),
                "p999": round(h.quantile(0.999) / 1000.0, 2), "max": round(h.max / 1000.0, 2)}
    if not samples_ns:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    xs = sorted(samples_ns)
    n = len(xs)

    def rank(q: float) -> float:
        return xs[min(n - 1, max(0, int(q * n + 0.5) - 1))] / 1000.0

    return {
        "mean": round(sum(xs) / n / 1000.0, 2),
        "p50": round(rank(0.50), 2),
        "p90": round(rank(0.90), 2),
        "p99": round(rank(0.99), 2),
        "p999": round(rank(0.999), 2),
        "max": round(xs[-1] / 1000.0, 2),
    }
