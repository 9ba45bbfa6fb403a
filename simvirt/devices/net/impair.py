"""A net device under netem-like impairment: frames held on loop timers per direction.

:class:`~simvirt.impair.netem.NetEm` says when each frame leaves (or that it
is lost); this module is its I/O edge. Direction ``tx`` sits between the
guest's transmit ring and the peer: the device copies each frame out of
guest RAM (no borrowed views, no partial checksums: the descriptor goes back
to the driver long before the frame leaves) and hands it to its lane here;
``rx`` sits between the peer and the guest's receive ring. A frame that is
due at once and has nothing held ahead of it goes straight through, so
loss-only impairments add no timer hop.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from simvirt import metrics
from simvirt.impair.delayline import DelayLine, Timer
from simvirt.impair.netem import NetEm
from simvirt.impair.settings import NetSettings
from simvirt.impair.timer import Clock, TimerFactory, clock_and_timers

Sink = Callable[[list[bytes], int], Any]  # (frames, queue pair)


class Lane:
    """One direction: the model, the frames it holds, and where they go when due."""

    def __init__(self, netem: NetEm, sink: Sink, counts: dict[str, int], stats: metrics.ImpairStats, *,
                 clock: Clock, timer: Timer) -> None:
        self.netem = netem
        self.sink = sink
        self.counts = counts  # this direction's running totals (kept by the device across settings)
        self.stats = stats
        self.clock = clock
        self.line: DelayLine[tuple[bytes, int]] = DelayLine(self._release, clock, timer)

    def __len__(self) -> int:
        return len(self.line)

    def push(self, frames: list[bytes], pair: int) -> None:
        """Frames (owned, not views of guest RAM) entering this direction now."""
        now = self.clock()
        admit = self.netem.admit
        line = self.line
        through: list[bytes] = []
        dropped = delayed = 0
        for f in frames:
            t = admit(len(f), now)
            if t is None:
                dropped += 1
                continue
            if t <= now and not len(line):
                through.append(f)
                continue
            delayed += 1
            line.push(t, (f, pair))
        counts, st = self.counts, self.stats
        if dropped:
            counts["dropped"] += dropped
            st.dropped += dropped
        if delayed:
            counts["delayed"] += delayed
            st.delayed += delayed
        if through:
            self.sink(through, pair)

    def _release(self, items: list[tuple[bytes, int]]) -> None:
        # One sink call per run of frames for the same queue pair.
        run: list[bytes] = []
        pair = items[0][1]
        for f, p in items:
            if p != pair:
                self.sink(run, pair)
                run, pair = [], p
            run.append(f)
        self.sink(run, pair)

    def take(self) -> list[tuple[float, tuple[bytes, int]]]:
        """Remove what is held, with release times, without sending it."""
        return self.line.take()

    def flush(self) -> None:
        """Everything held goes now."""
        self.line.flush()

    def drop_held(self) -> int:
        """Forget what is held (the receiving guest went away); returns how many."""
        return len(self.line.take())

    def close(self) -> None:
        """Free the timer (take or flush what is held first)."""
        self.line.close()

    def adopt(self, held: list[tuple[float, tuple[bytes, int]]]) -> None:
        """Frames a replaced impairment held keep their release times (they are on the wire);
        new frames queue behind them."""
        for t, item in held:
            self.line.push(t, item)
        if held:
            self.netem.hold_after(held[-1][0])


class NetImpairer:
    """The lanes of one device's impairment (``tx``, ``rx``, or both)."""

    def __init__(self, settings: NetSettings, sinks: dict[str, Sink], counts: dict[str, dict[str, int]],
                 stats: metrics.ImpairStats, *, clock: Clock, timers: TimerFactory) -> None:
        self.settings = settings
        self.lanes: dict[str, Lane] = {}
        for d in ("tx", "rx"):
            if settings.applies(d):
                self.lanes[d] = Lane(settings.netem(d), sinks[d], counts[d], stats, clock=clock, timer=timers())

    def lane(self, direction: str) -> Optional[Lane]:
        return self.lanes.get(direction)

    def held(self) -> int:
        """Frames held right now in either direction (``ImpairStats.held`` reads this)."""
        return sum(len(lane) for lane in self.lanes.values())


def replace(old: Optional[NetImpairer], settings: Optional[NetSettings], sinks: dict[str, Sink],
            counts: dict[str, dict[str, int]], stats: metrics.ImpairStats, *, clock: Optional[Clock] = None,
            timers: Optional[TimerFactory] = None) -> Optional[NetImpairer]:
    """The impairer for ``settings`` (None if they impair nothing), taking over what ``old`` held.

    A direction that stays impaired keeps its held frames on their schedule;
    one that no longer is releases them at once. Default clock and timers:
    ``time.monotonic`` and timerfds on the running loop.
    """
    new = None
    if settings is not None and settings.active:
        clock, timers = clock_and_timers(clock, timers)
        new = NetImpairer(settings, sinks, counts, stats, clock=clock, timers=timers)
    if old is not None:
        for d, lane in old.lanes.items():
            keep = new.lane(d) if new is not None else None
            if keep is None:
                lane.flush()
            else:
                keep.adopt(lane.take())
            lane.close()
    return new
