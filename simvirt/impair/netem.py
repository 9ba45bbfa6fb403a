"""netem-like conditions on one direction of a link: delay, jitter, loss, rate.

Like Linux's ``tc qdisc ... netem delay D jitter J loss L rate R limit N``,
reduced to what a lab needs and made FIFO: a frame is lost with
probability ``loss`` on arrival; otherwise it is due ``delay`` plus a
uniform jitter in [-jitter, +jitter] after arrival (never before arrival),
and, with a rate, after the previous frame has finished serializing plus
its own serialization time (``length * 8 / rate``). Release times never go
backwards, so frames are never reordered (Linux netem reorders with jitter
unless a rate is set; a lab that wants to see latency, not reordering,
prefers this). At most ``limit`` frames wait at once; more are dropped, as
netem's queue limit does.
"""
from __future__ import annotations

import collections
import random
from typing import Optional


class NetEm:
    """Decides, per frame, when it leaves or that it is dropped. Sans-IO: ``now`` is given."""

    def __init__(self, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0, rate: Optional[float] = None,
                 rng: Optional[random.Random] = None, limit: int = 1000) -> None:
        if delay < 0 or jitter < 0:
            raise ValueError(f"delay and jitter must be >= 0 (got delay={delay}, jitter={jitter})")
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be a fraction 0..1, not {loss}")
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 bits/s, not {rate}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1 frame, not {limit}")
        self.delay = float(delay)
        self.jitter = float(jitter)
        self.loss = float(loss)
        self.rate = float(rate) if rate is not None else None
        self.limit = limit
        self.rng = rng if rng is not None else random.Random(1)
        self._last = float("-inf")  # release time of the previous frame (FIFO floor)
        self._queued: collections.deque[float] = collections.deque()  # release times not yet passed
        self.lost = 0        # dropped by ``loss``
        self.overlimit = 0   # dropped because ``limit`` frames were waiting

    @property
    def dropped(self) -> int:
        return self.lost + self.overlimit

    def hold_after(self, t: float) -> None:
        """Frames admitted from now on leave no earlier than ``t`` (frames already on the wire, e.g.
        held under a previous setting, stay ahead of them)."""
        if t > self._last:
            self._last = t

    def admit(self, length: int, now: float) -> Optional[float]:
        """The release time of a ``length``-byte frame arriving at ``now``, or None if it is dropped."""
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return None
        q = self._queued
        while q and q[0] <= now:
            q.popleft()
        if len(q) >= self.limit:
            self.overlimit += 1
            return None
        t = now + self.delay
        if self.jitter:
            t += self.rng.uniform(-self.jitter, self.jitter)
            if t < now:
                t = now
        if t < self._last:
            t = self._last
        if self.rate is not None:
            t += length * 8 / self.rate
        self._last = t
        q.append(t)
        return t
