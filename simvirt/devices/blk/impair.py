"""A blk device under impairment: requests held on loop timers, then served.

:class:`~simvirt.impair.blk.BlkLimiter` says when each request may be
served; this module is its I/O edge. While an impairment is set the
device's ``process_queue`` hands every popped head here (instead of its
fast path): each gets an admission time from the limiter and a completion
time ``latency`` later, and waits in its queue's :class:`DelayLine`. When
due, requests are served by the device's general path (or failed with
``VIRTIO_BLK_S_IOERR`` by error injection, storage untouched), returned in
one used-ring update and the driver is interrupted.

Requests are taken off the ring at once rather than left there while
throttled (Firecracker leaves them): the vhost-user server drains a ring
until it is empty, so a request left in it would be a busy loop. Holding
them keeps the loop idle between timers; the guest sees the same thing,
requests in flight that complete at the limiter's pace.

Each queue has its own line and timer; the limiter is shared (a disk's
limits are the device's, as in Firecracker). A queue therefore waits for
another only as much as the shared limiter says.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from simvirt import metrics
from simvirt.devices.blk.spec import OUTHDR
from simvirt.impair.delayline import DelayLine, Timer
from simvirt.impair.settings import BlkSettings
from simvirt.virtio.errors import VirtqueueError
from simvirt.virtio.queue import Queue

if TYPE_CHECKING:
    from simvirt.devices.blk.device import BlkDevice

log = logging.getLogger(__name__)

Clock = Callable[[], float]
TimerFactory = Callable[[], Timer]  # one timer per queue's line (simvirt.impair.timer.new_timer)


def _data_bytes(queue: Queue, head: int) -> int:
    """The request's payload bytes for the bandwidth bucket: the chain minus header and status."""
    try:
        n = sum(length for _, length, _ in queue.walk(head)) - (OUTHDR.size + 1)  # header and status byte
    except VirtqueueError:
        return 0  # served (and refused) later by the general path
    return n if n > 0 else 0


class BlkImpairer:
    """Holds one device's requests until the limiter and the added latency let them through."""

    def __init__(self, device: "BlkDevice", settings: BlkSettings, stats: metrics.ImpairStats, *,
                 clock: Clock, timers: TimerFactory) -> None:
        self.device = device
        self.settings = settings
        self.limiter = settings.limiter()
        self.stats = stats
        self.clock = clock
        self.timers = timers
        self._lines: dict[int, DelayLine[int]] = {}
        self._queues: dict[int, tuple[Queue, metrics.QueueStats]] = {}

    # -- taking requests ---------------------------------------------------
    def process(self, index: int, queue: Queue, qstats: metrics.QueueStats) -> None:
        """``process_queue`` while impaired: take every available request and schedule it."""
        heads = queue.pop_heads()
        if heads:
            self.admit(index, queue, qstats, heads, self.clock())

    def admit(self, index: int, queue: Queue, qstats: metrics.QueueStats, heads: list[int], now: float) -> bool:
        """Schedule ``heads`` (in ring order); True if some were due at once and completed here."""
        self._queues[index] = (queue, qstats)
        line = self._lines.get(index)
        if line is None:
            line = self._lines[index] = DelayLine(lambda due, i=index: self._release(i, due), self.clock,
                                                  self.timers())
        lim = self.limiter
        latency = lim.latency
        sized = lim.bw is not None      # only the bandwidth bucket needs the payload size (a chain walk)
        st = self.stats
        ready: list[int] = []  # due already and nothing held ahead of them: served in this batch
        for head in heads:
            t = lim.admit(_data_bytes(queue, head) if sized else 0, now)
            if t > now:
                st.throttled += 1
            if latency:
                st.delayed += 1
            done = t + latency
            if done <= now and not len(line):
                ready.append(head)
            else:
                line.push(done, head)
                st.held += 1
        if ready:
            # From process(), inside the server's run_queue: counting the chains makes it interrupt the driver.
            self._complete(queue, qstats, ready, inject=True)
            return True
        return False

    # -- completing them ---------------------------------------------------
    def _release(self, index: int, heads: list[int]) -> None:
        """Timer: these requests are due."""
        self.stats.held -= len(heads)
        q = self._queues.get(index)
        if q is None:  # the ring went away; queue_stopped already completed what it held
            return
        self._complete(q[0], q[1], heads, inject=True)
        self.device.signal(index)

    def _complete(self, queue: Queue, qstats: metrics.QueueStats, heads: list[int], *, inject: bool) -> None:
        t0 = time.perf_counter()
        dev = self.device
        lim = self.limiter
        used = []
        ndesc = 0
        for head in heads:
            if inject and lim.fail():
                self.stats.failed += 1
                used.append((head, dev._fail_unwalkable(queue, head)))  # IOERR in the status byte; no I/O
                continue
            n, d = dev.serve_one(queue, head)
            used.append((head, n))
            ndesc += d
        queue.add_used_many(used)
        qstats.chains += len(heads)
        qstats.descriptors += ndesc
        if dev.count_metrics:
            dev._flush_op_stats(time.perf_counter() - t0, len(heads))

    # -- lifecycle -----------------------------------------------------------
    def queue_stopped(self, index: int) -> None:
        """The ring stops (GET_VRING_BASE, disable, remap, disconnect): complete what it holds now.

        The Queue is still valid here and the frontend reads the used index
        after the stop, so nothing is lost or left half done.
        """
        line = self._lines.pop(index, None)
        q = self._queues.pop(index, None)
        if line is None or q is None:
            return
        held = [head for _, head in line.take()]
        line.close()
        if held:
            self.stats.held -= len(held)
            self._complete(q[0], q[1], held, inject=True)
            self.device.signal(index)

    def take_held(self) -> list[tuple[float, int, Queue, metrics.QueueStats, int]]:
        """Remove everything held: (due time, queue index, queue, stats, head), in due-time order."""
        out = []
        for index, line in self._lines.items():
            queue, qstats = self._queues[index]
            out.extend((t, index, queue, qstats, head) for t, head in line.take())
        self.stats.held -= len(out)
        out.sort(key=lambda x: x[0])  # stable: each queue's order is kept
        return out

    def release_all(self) -> None:
        """The impairment is cleared: serve everything held now, as an unimpaired device would."""
        by_queue: dict[int, list] = {}
        for _, index, queue, qstats, head in self.take_held():
            by_queue.setdefault(index, [queue, qstats, []])[2].append(head)
        self.close()
        for index, (queue, qstats, heads) in by_queue.items():
            self._complete(queue, qstats, heads, inject=False)
            self.device.signal(index)

    def adopt(self, old: "BlkImpairer") -> None:
        """Take over what a replaced impairment held: re-admitted, in order, under the new limits."""
        now = self.clock()
        completed = set()
        held = old.take_held()
        old.close()
        for _, index, queue, qstats, head in held:
            if self.admit(index, queue, qstats, [head], now):
                completed.add(index)
        for index in completed:
            self.device.signal(index)

    def forget(self) -> None:
        """Device reset: every ring has stopped already; drop anything left."""
        for line in self._lines.values():
            self.stats.held -= len(line)
        self.close()
        self._queues.clear()

    def close(self) -> None:
        """Free the lines' timers (what they hold is dropped: take or release it first)."""
        for line in self._lines.values():
            line.close()
        self._lines.clear()

    def held(self) -> int:
        return sum(len(line) for line in self._lines.values())


def make_impairer(device: "BlkDevice", settings: Optional[BlkSettings], stats: metrics.ImpairStats, *,
                  clock: Optional[Clock] = None, timers: Optional[TimerFactory] = None) -> Optional[BlkImpairer]:
    """An impairer for ``settings``, or None if they impair nothing (the device's fast path then).

    Default: ``time.monotonic`` and timerfds on the running loop.
    """
    if settings is None or not settings.active:
        return None
    if timers is None:
        import asyncio

        from simvirt.impair.timer import new_timer
        loop = asyncio.get_running_loop()
        timers = lambda: new_timer(loop)  # noqa: E731
    return BlkImpairer(device, settings, stats, clock=clock or time.monotonic, timers=timers)
