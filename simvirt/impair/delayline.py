"""Items held until their release time, released in order by one timer.

The edge between the sans-IO models (which answer "release at t") and an
event loop: the caller injects ``clock`` and a :class:`Timer` (in a device
process ``time.monotonic`` and a timerfd, see :mod:`simvirt.impair.timer`;
in tests a fake). One timer is armed, at the head item's time, whatever the
number of items, and everything due is released in one call, so a burst of
frames costs one timer and one release, not one each.

Due times are checked against ``clock``, never the loop's time (uvloop's
has millisecond resolution), and the line re-arms for what is left when a
timer fires early, so nothing is ever released before its time; lateness
is the timer's. A timer with coarse delays (uvloop's ``call_later`` rounds
to whole milliseconds) says so with ``spin_below``: a residue shorter than
that is waited out by re-checking on each loop iteration (a zero delay)
rather than rounded up to a millisecond.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Generic, Optional, Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    """One pending callback at a time (what a line needs); see :mod:`simvirt.impair.timer`."""

    spin_below: float

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        """Run ``callback`` in ``delay`` seconds; returns a handle with ``cancel()``."""

    def close(self) -> None: ...


class DelayLine(Generic[T]):
    """A FIFO of (release time, item); ``release(items)`` gets the due ones, in order."""

    def __init__(self, release: Callable[[list[T]], None], clock: Callable[[], float], timer: Timer) -> None:
        self._release = release
        self._clock = clock
        self._timer = timer
        self._items: collections.deque[tuple[float, T]] = collections.deque()
        self._handle: Optional[Any] = None
        self._last = float("-inf")

    def __len__(self) -> int:
        return len(self._items)

    def push(self, t: float, item: T) -> None:
        """Hold ``item`` until ``t``; a time earlier than the last pushed one is raised to it (FIFO)."""
        if t < self._last:
            t = self._last
        self._last = t
        self._items.append((t, item))
        if self._handle is None:
            self._arm(False)

    def _arm(self, woke_early: bool) -> None:
        delay = self._items[0][0] - self._clock()
        if delay <= 0 or (woke_early and delay < self._timer.spin_below):
            delay = 0.0
        self._handle = self._timer.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        items = self._items
        now = self._clock()
        due = []
        while items and items[0][0] <= now:
            due.append(items.popleft()[1])
        if items:
            self._arm(not due)  # before releasing: a failing release must not stall the line
        if due:
            self._release(due)

    def take(self) -> list[tuple[float, T]]:
        """Remove and return everything held (with release times), without releasing it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        out = list(self._items)
        self._items.clear()
        self._last = float("-inf")
        return out

    def flush(self) -> None:
        """Release everything held now, whatever its time."""
        items = [item for _, item in self.take()]
        if items:
            self._release(items)

    def close(self) -> None:
        """Drop what is held (see :meth:`take` to keep it) and free the timer."""
        self.take()
        self._timer.close()
