"""A blk device under impairment: requests held on loop timers, then served.

:class:`~simvirt.impair.blk.BlkLimiter` says when each request may be
served; this module is its I/O edge. While an impairment is set the
device's ``process_queue`` hands every popped head here (instead of its
fast path): each gets an admission time from the limiter and a completion
time ``latency`` later, and waits in its queue's :class:`DelayLine`. When
due, requests are served as one batch by the device's ``serve_heads`` (the
tail of its unimpaired path; error injection first answers some with
``VIRTIO_BLK_S_IOERR``, storage untouched), returned in one used-ring update
and the driver is interrupted.

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

from typing import TYPE_CHECKING, Optional

from simvirt import metrics
from simvirt.devices.blk.spec import OUTHDR
from simvirt.impair.delayline import DelayLine
from simvirt.impair.settings import BlkSettings
from simvirt.impair.timer import Clock, TimerFactory, clock_and_timers
from simvirt.virtio.errors import VirtqueueError
from simvirt.virtio.queue import Queue

if TYPE_CHECKING:
    from simvirt.devices.blk.device import BlkDevice


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
        self.timers = timers  # one timer per queue's line
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
        ready = self._schedule(index, queue, qstats, heads, now)
        if ready:
            # From process(), inside the server's run_queue: counting the chains makes it interrupt the driver.
            self._complete(queue, qstats, ready, inject=True)
            return True
        return False

    def _schedule(self, index: int, queue: Queue, qstats: metrics.QueueStats, heads: list[int],
                  now: float) -> list[int]:
        """Give ``heads`` (in ring order) their completion times: hold them, or return those due already.

        A request is due at once only if nothing is held ahead of it on its
        queue (the line is FIFO, and so is the limiter's admission order).
        """
        self._queues[index] = (queue, qstats)
        line = self._lines.get(index)
        if line is None:
            line = self._lines[index] = DelayLine(lambda due, i=index: self._release(i, due), self.clock,
                                                  self.timers())
        lim = self.limiter
        latency = lim.latency
        sized = lim.bw is not None      # only the bandwidth bucket needs the payload size (a chain walk)
        ready: list[int] = []
        throttled = 0
        for head in heads:
            t = lim.admit(_data_bytes(queue, head) if sized else 0, now)
            if t > now:
                throttled += 1
            done = t + latency
            if done <= now and not len(line):
                ready.append(head)
            else:
                line.push(done, head)
        st = self.stats
        st.throttled += throttled
        if latency:
            st.delayed += len(heads)
        return ready

    # -- completing them ---------------------------------------------------
    def _release(self, index: int, heads: list[int]) -> None:
        """Timer: these requests are due."""
        q = self._queues.get(index)
        if q is None:  # the ring went away; queue_stopped already completed what it held
            return
        self._complete(q[0], q[1], heads, inject=True)
        self.device.signal(index)

    def _complete(self, queue: Queue, qstats: metrics.QueueStats, heads: list[int], *, inject: bool) -> None:
        """Serve ``heads`` as one device batch; with ``inject``, error injection fails some first.

        A failed request gets IOERR in its status byte and no I/O; it goes
        back in the same used-ring update as the served ones, ahead of them
        (the device may use buffers in any order: VIRTIO_F_IN_ORDER is not offered).
        """
        failed: list[tuple[int, int]] = []
        lim = self.limiter
        if inject and lim.error_rate:
            fail = lim.fail
            answer = self.device._fail_unwalkable  # noqa: SLF001 - IOERR in the status byte, if there is one
            served = []
            for head in heads:
                if fail():
                    failed.append((head, answer(queue, head)))
                else:
                    served.append(head)
            heads = served
            self.stats.failed += len(failed)
        self.device.serve_heads(queue, qstats, heads, failed)

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
            self._complete(q[0], q[1], held, inject=True)
            self.device.signal(index)

    def take_held(self) -> list[tuple[float, int, Queue, metrics.QueueStats, int]]:
        """Remove everything held: (due time, queue index, queue, stats, head), in due-time order."""
        out = []
        for index, line in self._lines.items():
            queue, qstats = self._queues[index]
            out.extend((t, index, queue, qstats, head) for t, head in line.take())
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
        """Take over what a replaced impairment held: re-admitted, in order, under the new limits.

        Admission follows the old due times across queues (the limiter is
        shared); what is due at once is served per queue, one batch each.
        """
        now = self.clock()
        held = old.take_held()
        old.close()
        ready: dict[int, list[int]] = {}
        for _, index, queue, qstats, head in held:
            if self._schedule(index, queue, qstats, [head], now):
                ready.setdefault(index, []).append(head)
        for index, heads in ready.items():
            queue, qstats = self._queues[index]
            self._complete(queue, qstats, heads, inject=True)
            self.device.signal(index)

    def forget(self) -> None:
        """Device reset: every ring has stopped already; drop anything left."""
        self.close()
        self._queues.clear()

    def close(self) -> None:
        """Free the lines' timers (what they hold is dropped: take or release it first)."""
        for line in self._lines.values():
            line.close()
        self._lines.clear()

    def held(self) -> int:
        """Requests held right now: what the lines hold (``ImpairStats.held`` reads this)."""
        return sum(len(line) for line in self._lines.values())


def make_impairer(device: "BlkDevice", settings: Optional[BlkSettings], stats: metrics.ImpairStats, *,
                  clock: Optional[Clock] = None, timers: Optional[TimerFactory] = None) -> Optional[BlkImpairer]:
    """An impairer for ``settings``, or None if they impair nothing (the device's fast path then).

    Default: ``time.monotonic`` and timerfds on the running loop.
    """
    if settings is None or not settings.active:
        return None
    clock, timers = clock_and_timers(clock, timers)
    return BlkImpairer(device, settings, stats, clock=clock, timers=timers)
