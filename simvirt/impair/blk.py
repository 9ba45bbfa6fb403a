"""Disk conditions: Firecracker's two token buckets, added latency, injected errors.

A request costs one token of the ops bucket and ``nbytes`` tokens of the
bandwidth bucket, both taken at the same instant, as Firecracker's block
device does (it consumes ops then bytes and gives the ops token back if the
bytes are short). Requests are admitted in arrival order: while one waits
for tokens, the ones behind it wait too (Firecracker stops taking requests
off a throttled queue). The model keeps that order in virtual time: each
admission happens no earlier than the previous one, so the caller can hand
out serve times for a whole batch at once and schedule them on timers.

Latency is added after admission and does not serialize: 16 requests in
flight with 2 ms latency complete 2 ms after their admissions, together.
"""
from __future__ import annotations

import random
from typing import Optional

from simvirt.impair.bucket import TokenBucket


class BlkLimiter:
    """Serve times for disk requests under ops/bandwidth limits; seeded error injection.

    ``iops`` / ``bandwidth`` are refills per second (buckets of one second's
    worth, refill_time 1000 ms); ``iops_burst`` / ``bandwidth_burst`` are the
    buckets' one-time bursts. None means unlimited.
    """

    def __init__(self, latency: float = 0.0, iops: Optional[float] = None, iops_burst: Optional[float] = None,
                 bandwidth: Optional[float] = None, bandwidth_burst: Optional[float] = None, error_rate: float = 0.0,
                 rng: Optional[random.Random] = None) -> None:
        if latency < 0:
            raise ValueError(f"latency must be >= 0 s, not {latency}")
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be a fraction 0..1, not {error_rate}")
        if iops_burst is not None and iops is None:
            raise ValueError("iops_burst needs iops")
        if bandwidth_burst is not None and bandwidth is None:
            raise ValueError("bandwidth_burst needs bandwidth")
        self.latency = float(latency)
        self.error_rate = float(error_rate)
        self.ops = TokenBucket(iops, iops_burst or 0, 1000.0) if iops is not None else None
        self.bw = TokenBucket(bandwidth, bandwidth_burst or 0, 1000.0) if bandwidth is not None else None
        self.rng = rng if rng is not None else random.Random(1)
        self._last = float("-inf")  # admission time of the previous request (in-order floor)

    @property
    def limits(self) -> bool:
        """True if a bucket can delay requests (else :meth:`admit` always answers ``now``)."""
        return self.ops is not None or self.bw is not None

    def admit(self, nbytes: int, now: float) -> float:
        """When the request of ``nbytes`` arriving at ``now`` may be served (>= ``now``).

        The tokens are taken at that time; call in arrival order. The
        completion time is this plus :attr:`latency`.
        """
        t = now if now > self._last else self._last
        ops, bw = self.ops, self.bw
        wait = 0.0
        if ops is not None:
            wait = ops.time_until(1, t)
        if bw is not None and nbytes > 0:
            w = bw.time_until(nbytes, t)
            if w > wait:
                wait = w
        t += wait
        # Both buckets only refill between now and t, so both succeed at t.
        if ops is not None:
            ok = ops.reduce(1, t)
            assert ok, (ops, t)
        if bw is not None and nbytes > 0:
            ok = bw.reduce(nbytes, t)
            assert ok, (bw, nbytes, t)
        self._last = t
        return t

    def completion(self, nbytes: int, now: float) -> tuple[float, float]:
        """(serve time, completion time) for a request arriving at ``now``."""
        t = self.admit(nbytes, now)
        return t, t + self.latency

    def fail(self) -> bool:
        """Should this request fail with an I/O error? (seeded; consumes randomness only when 0 < rate < 1)."""
        r = self.error_rate
        if r <= 0.0:
            return False
        if r >= 1.0:
            return True
        return self.rng.random() < r
