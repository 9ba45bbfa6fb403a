"""Firecracker's token bucket, in simulated time.

Firecracker's rate limiter (``RateLimiter``, one bucket for ops and one for
bytes) is configured per bucket with ``size`` (capacity in tokens),
``one_time_burst`` (extra tokens granted once, spent before the regular
budget and never refilled) and ``refill_time`` (milliseconds to refill
``size`` tokens from empty: the rate is ``size / refill_time``). The bucket
starts full. Refill is linear and passive: it is computed from the elapsed
time whenever the bucket is used.

Requests bigger than the bucket: Firecracker lets such a request through at
once, empties the bucket and blocks the limiter for as long as the excess
takes to refill (``BucketReduction::OverConsumption``). We keep the same
long-run cost but make it a debt the caller can schedule around: a request
of ``n > size`` tokens waits until the bucket is *full*, then takes all of
it and leaves the budget at ``size - n`` (negative); refill pays the debt
back at the normal rate before anything else gets through. So an oversized
request is never admitted earlier than a request of exactly ``size`` tokens
would be, and ``n`` tokens always cost ``n / rate`` seconds of bucket time.

Tokens are floats (bytes per second can refill a fraction of a token per
call); comparisons allow a relative epsilon so that a request asked for at
exactly :meth:`TokenBucket.time_until` succeeds despite rounding.
"""
from __future__ import annotations

from typing import Optional


class TokenBucket:
    """A bucket of ``size`` tokens refilled over ``refill_time`` ms, plus a one-time burst.

    Every method takes ``now`` in seconds; time that goes backwards is
    ignored (no refill, no error), so callers may pass a virtual time that
    runs ahead of the clock (see :class:`~simvirt.impair.blk.BlkLimiter`).
    """

    __slots__ = ("size", "refill_time", "rate", "budget", "one_time_burst", "initial_burst", "_last", "_eps")

    def __init__(self, size: float, one_time_burst: float = 0, refill_time: float = 1000.0) -> None:
        if not size > 0:
            raise ValueError(f"token bucket size must be > 0, not {size}")
        if not refill_time > 0:
            raise ValueError(f"token bucket refill_time must be > 0 ms, not {refill_time}")
        if one_time_burst < 0:
            raise ValueError(f"token bucket one_time_burst must be >= 0, not {one_time_burst}")
        self.size = float(size)
        self.refill_time = float(refill_time)
        self.rate = self.size / (self.refill_time / 1000.0)  # tokens per second
        self.budget = self.size  # starts full, as Firecracker's
        self.one_time_burst = float(one_time_burst)
        self.initial_burst = float(one_time_burst)
        self._last: Optional[float] = None  # the first use sets the time origin
        self._eps = 1e-9 * self.size + 1e-9

    def _refill(self, now: float) -> None:
        last = self._last
        if last is None:
            self._last = now
            return
        if now > last:
            b = self.budget + (now - last) * self.rate
            self.budget = b if b < self.size else self.size
            self._last = now

    def available(self, now: float) -> float:
        """Tokens that could be taken at ``now`` (burst plus budget; negative while in debt)."""
        self._refill(now)
        return self.one_time_burst + self.budget

    def _need(self, n: float) -> float:
        """Budget required for ``n`` tokens once the burst is spent (capped at ``size``: see the module doc)."""
        rest = n - self.one_time_burst
        if rest <= 0:
            return 0.0
        return rest if rest < self.size else self.size

    def time_until(self, n: float, now: float) -> float:
        """Seconds from ``now`` until :meth:`reduce` of ``n`` tokens would succeed (0: now)."""
        self._refill(now)
        if n <= self.one_time_burst:
            return 0.0
        short = self._need(n) - self.budget
        if short <= self._eps:
            return 0.0
        return short / self.rate

    def reduce(self, n: float, now: float) -> bool:
        """Take ``n`` tokens if available at ``now``: the one-time burst first, then the budget.

        Either all ``n`` are taken or nothing is (unlike Firecracker, a
        failed request does not spend what was left of the burst).
        """
        if n <= 0:
            return True
        self._refill(now)
        burst = self.one_time_burst
        if n <= burst:
            self.one_time_burst = burst - n
            return True
        if self.budget + self._eps < self._need(n):
            return False
        self.one_time_burst = 0.0
        self.budget -= n - burst
        return True

    def __repr__(self) -> str:
        return (f"TokenBucket(size={self.size:g}, one_time_burst={self.one_time_burst:g}/{self.initial_burst:g}, "
                f"refill_time={self.refill_time:g}ms, budget={self.budget:g})")
