"""Items held until their release time, released in order by one timer.

The edge between the sans-IO models (which answer "release at t") and an
event loop: the caller injects ``clock`` and ``call_later`` (in a device
process ``time.monotonic`` and ``loop.call_later``; in tests a fake). One
timer is armed, at the head item's time, whatever the number of items, and
everything due is released in one call, so a burst of frames costs one
timer and one release, not one each.

Why ``clock`` is not the loop's: uvloop's ``loop.time()`` and timers have
millisecond resolution, and a timer may fire up to a millisecond early. The
line checks due times against ``clock`` (sub-microsecond) and re-arms for
what is left, so nothing is ever released before its time; lateness is
whatever the loop adds.
"""
from __future__ import annotations

import collections
import logging
from typing import Callable, Generic, Optional, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Handle(Protocol):
    def cancel(self) -> None: ...


class DelayLine(Generic[T]):
    """A FIFO of (release time, item); ``release(items)`` gets the due ones, in order."""

    def __init__(self, release: Callable[[list[T]], None], clock: Callable[[], float],
                 call_later: Callable[[float, Callable[[], None]], _Handle]) -> None:
        self._release = release
        self._clock = clock
        self._call_later = call_later
        self._items: collections.deque[tuple[float, T]] = collections.deque()
        self._timer: Optional[_Handle] = None
        self._last = float("-inf")

    def __len__(self) -> int:
        return len(self._items)

    @property
    def next_time(self) -> Optional[float]:
        return self._items[0][0] if self._items else None

    def push(self, t: float, item: T) -> None:
        """Hold ``item`` until ``t``; a time earlier than the last pushed one is raised to it (FIFO)."""
        if t < self._last:
            t = self._last
        self._last = t
        self._items.append((t, item))
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        delay = self._items[0][0] - self._clock()
        self._timer = self._call_later(delay if delay > 0 else 0.0, self._fire)

    def _fire(self) -> None:
        self._timer = None
        items = self._items
        now = self._clock()
        due = []
        while items and items[0][0] <= now:
            due.append(items.popleft()[1])
        if items:
            self._arm()  # before releasing: a failing release must not stall the line
        if due:
            self._release(due)

    def take(self) -> list[tuple[float, T]]:
        """Remove and return everything held (with release times), without releasing it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        out = list(self._items)
        self._items.clear()
        self._last = float("-inf")
        return out

    def flush(self) -> None:
        """Release everything held now, whatever its time."""
        items = [item for _, item in self.take()]
        if items:
            self._release(items)
