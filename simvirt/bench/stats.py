"""Latency summaries for benchmark reports."""
from __future__ import annotations

from bisect import bisect_right
from typing import Callable, Optional, Sequence, Union

SUB_BITS = 7  # 128 sub-buckets per power of two: every percentile within 0.8 % of the true sample


class LatencyHistogram:
    """Fixed-memory latency record (log-linear buckets, like HdrHistogram or fio's).

    A benchmark or soak that runs for hours records billions of latencies;
    a list of them is the memory leak.  Values up to 2**(SUB_BITS+1) ns are
    kept exactly; above, each power of two splits into 2**SUB_BITS buckets,
    so a percentile is off by less than one part in 2**SUB_BITS.  Mean and
    max are exact.  ``append`` is the list method's name on purpose, and it
    is cheap: samples gather in a small list that is folded into the buckets
    every ``BATCH`` samples by sorting it (in C) and counting per bucket with
    bisection, so the per-sample Python work is one list append.
    """

    BATCH = 1 << 15
    __slots__ = ("counts", "n", "total", "max", "_buf")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0
        self.max = 0
        self._buf: list[int] = []

    def append(self, ns: int) -> None:
        buf = self._buf
        buf.append(ns)
        if len(buf) >= self.BATCH:
            self._fold()

    def _fold(self) -> None:
        buf = self._buf
        if not buf:
            return
        buf.sort()
        if buf[0] < 0:
            buf[:bisect_right(buf, -1)] = [0] * bisect_right(buf, -1)
        self.n += len(buf)
        self.total += sum(buf)
        if buf[-1] > self.max:
            self.max = buf[-1]
        counts = self.counts
        i, n = 0, len(buf)
        while i < n:
            key = _key(buf[i])
            j = bisect_right(buf, self._value(key), i)
            counts[key] = counts.get(key, 0) + (j - i)
            i = j
        buf.clear()

    def __len__(self) -> int:
        return self.n + len(self._buf)

    @staticmethod
    def _value(key: int) -> int:
        """The upper edge of a bucket (what nearest-rank reports, never optimistic)."""
        if key < (1 << (SUB_BITS + 1)):
            return key
        shift = (key >> SUB_BITS) - 1
        mant = (key & ((1 << SUB_BITS) - 1)) + (1 << SUB_BITS)
        return ((mant + 1) << shift) - 1

    def quantile(self, q: float) -> int:
        """A quantile of every sample so far: :meth:`quantile_since` from an empty snapshot, 0 (not None) if none."""
        v = self.quantile_since(({}, 0), q)
        return self.max if v is None else v

    def snapshot(self) -> tuple[dict[int, int], int]:
        """The bucket counts so far, for :meth:`quantile_since` (one dict copy, not per sample)."""
        self._fold()
        return dict(self.counts), self.n

    def quantile_since(self, snap: tuple[dict[int, int], int], q: float) -> Optional[int]:
        """A quantile of only the samples recorded after ``snap`` (per-second timelines), None if none."""
        self._fold()
        old, n0 = snap
        n = self.n - n0
        if n <= 0:
            return None
        want = min(n, max(1, int(q * n + 0.5)))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key] - old.get(key, 0)
            if seen >= want:
                return min(self._value(key), self.max)
        return self.max

    @classmethod
    def merge(cls, *hists: "LatencyHistogram") -> "LatencyHistogram":
        """A new histogram holding the samples of all ``hists`` (jobs or directions reported together).

        One pass into one dict: merging pairwise would copy the growing bucket
        dict once per input.  Every input is folded first (a side effect on the inputs).
        """
        out = cls()
        counts = out.counts
        for h in hists:
            h._fold()
            for k, c in h.counts.items():
                counts[k] = counts.get(k, 0) + c
            out.n += h.n
            out.total += h.total
            if h.max > out.max:
                out.max = h.max
        return out

    @staticmethod
    def max_of(*hists: "LatencyHistogram") -> int:
        """The largest sample of all ``hists`` (0 if none), without building the merged histogram."""
        return max((h.summary()[2] for h in hists), default=0)

    def merged(self, other: "LatencyHistogram") -> "LatencyHistogram":
        """A new histogram holding the samples of both (reads and writes reported together)."""
        return self.merge(self, other)

    def summary(self) -> tuple[int, int, int]:
        """(count, sum, max) with every sample folded in."""
        self._fold()
        return self.n, self.total, self.max


def _key(v: int) -> int:
    shift = v.bit_length() - SUB_BITS - 1
    return v if shift <= 0 else ((shift + 1) << SUB_BITS) | ((v >> shift) - (1 << SUB_BITS))


_QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))


def percentiles_us(samples_ns: Union[Sequence[int], LatencyHistogram]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in microseconds (nearest-rank)."""
    rank: Callable[[float], float]
    if isinstance(samples_ns, LatencyHistogram):
        n, total, top = samples_ns.summary()
        rank = samples_ns.quantile
    else:
        xs = sorted(samples_ns)
        n = len(xs)
        total = sum(xs)
        top = xs[-1] if xs else 0

        def nearest_rank(q: float) -> float:
            return xs[min(n - 1, max(0, int(q * n + 0.5) - 1))]

        rank = nearest_rank
    if not n:
        return dict.fromkeys(("mean", *(k for k, _ in _QUANTILES), "max"), 0.0)
    out = {"mean": round(total / n / 1000.0, 2)}
    for k, q in _QUANTILES:
        out[k] = round(rank(q) / 1000.0, 2)
    out["max"] = round(top / 1000.0, 2)
    return out
