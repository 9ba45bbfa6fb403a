"""Latency summaries for benchmark reports."""
from __future__ import annotations

from typing import Sequence


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in microseconds (nearest-rank)."""
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
