"""Guest virtio-balloon driver.

Follows the host's target (``num_pages``) in batches of up to 256 PFNs per
buffer, several buffers in flight; takes the pages out of the guest page
allocator before telling the host (inflate) and, with MUST_TELL_HOST, tells
the host before giving them back (deflate). Keeps exactly one statistics
buffer lent to the device and refills it from the allocator's real state
each time the device returns it. With DEFLATE_ON_OOM it hooks the guest
allocator's OOM path; with PAGE_REPORTING it isolates free 2 MiB blocks,
reports them, and puts them back once the device has used the report.
"""
from __future__ import annotations

import array
import asyncio
import logging
import time
from typing import Optional

from simvirt.devices.balloon import spec as s
from simvirt.drivers.transport import DriverQueueHandle, VhostUserTransport
from simvirt.memory.alloc import OutOfGuestMemory, PageAllocator
from simvirt.virtio.spec import VIRTIO_F_EVENT_IDX, bit

log = logging.getLogger(__name__)

WANTED_FEATURES = (
    bit(s.VIRTIO_BALLOON_F_MUST_TELL_HOST) | bit(s.VIRTIO_BALLOON_F_STATS_VQ) | bit(s.VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    | bit(s.VIRTIO_BALLOON_F_PAGE_REPORTING) | bit(VIRTIO_F_EVENT_IDX)
)
PFNS = s.VIRTIO_BALLOON_ARRAY_PFNS_MAX
REPORT_ORDER_PAGES = 512  # 2 MiB blocks, Linux's pageblock order on x86-64
STAT_TAGS = (s.VIRTIO_BALLOON_S_SWAP_IN, s.VIRTIO_BALLOON_S_SWAP_OUT, s.VIRTIO_BALLOON_S_MAJFLT,
             s.VIRTIO_BALLOON_S_MINFLT, s.VIRTIO_BALLOON_S_MEMFREE, s.VIRTIO_BALLOON_S_MEMTOT,
             s.VIRTIO_BALLOON_S_AVAIL, s.VIRTIO_BALLOON_S_CACHES)


class _Queue:
    """A balloon virtqueue plus a pool of one-page scratch buffers and completion futures."""

    def __init__(self, drv: "VirtioBalloonDriver", h: DriverQueueHandle, nbufs: int) -> None:
        self.h = h
        self.q = h.queue
        alloc = drv.alloc
        self.bufs = [alloc.alloc_pages(1) for _ in range(nbufs)]
        self.free_bufs = list(self.bufs)
        self.waiters: dict[int, asyncio.Future] = {}
        self.space = asyncio.Event()
        self.space.set()


class VirtioBalloonDriver:
    def __init__(self, transport: VhostUserTransport, *, features: int = WANTED_FEATURES, in_flight: int = 32,
                 report_interval: float = 2.0) -> None:
        self.transport = transport
        self.mem = transport.mem
        self.alloc: PageAllocator = transport.alloc
        self.wanted = features
        self.in_flight = in_flight
        self.report_interval = report_interval
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.queues: dict[str, _Queue] = {}
        self.extents: list[tuple[int, int]] = []  # pages in the balloon as (gpa, npages)
        self.actual = 0
        self.target = 0
        self.stats_buf = 0
        self.stats_sent = 0
        self._changed = asyncio.Event()
        self._hold = False
        self._tasks: list[asyncio.Task] = []
        self._reported = bytearray()  # per 2 MiB block: 1 if reported and untouched since
        self.reported_pages = 0
        self.oom_deflations = 0
        self.errors = 0

    # -- probe ------------------------------------------------------------
    def has(self, f: int) -> bool:
        return self.transport.has(f)

    def probe(self, loop: asyncio.AbstractEventLoop) -> None:
        t = self.transport
        self.loop = loop
        t.start()
        t.negotiate(self.wanted)
        for index, role in enumerate(s.queue_roles(t.features)):
            size = 256 if role != "reporting_vq" else max(64, s.PAGE_REPORTING_CAPACITY)
            h = t.setup_queue(index, size, indirect_max=0)
            nbufs = self.in_flight if role in ("inflateq", "deflateq") else 1
            self.queues[role] = _Queue(self, h, nbufs)
        t.driver_ok()
        for role, bq in self.queues.items():
            t.watch_interrupts(loop, bq.h.index, lambda bq=bq, role=role: self._complete(bq, role))
        if not t.watch_config_changes(loop, self._changed.set):
            log.warning("backend has no config-change channel; polling the balloon target")
        self.target = self._read_target()
        if self.has(s.VIRTIO_BALLOON_F_STATS_VQ):
            self.stats_buf = self.alloc.alloc_pages(1)
            self._post_stats()
        if self.has(s.VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
            self.alloc.oom_handlers.append(self._on_oom)
        if self.has(s.VIRTIO_BALLOON_F_PAGE_REPORTING):
            self._reported = bytearray(self.alloc.total_pages // REPORT_ORDER_PAGES + 1)
            self.alloc.alloc_listeners.append(self._on_alloc)

    def start(self) -> None:
        """Run the target-following loop (and free page reporting) in the background."""
        assert self.loop is not None
        self._tasks.append(self.loop.create_task(self._follow()))
        if self.has(s.VIRTIO_BALLOON_F_PAGE_REPORTING) and self.report_interval > 0:
            self._tasks.append(self.loop.create_task(self._report_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._on_oom in self.alloc.oom_handlers:
            self.alloc.oom_handlers.remove(self._on_oom)
        if self._on_alloc in self.alloc.alloc_listeners:
            self.alloc.alloc_listeners.remove(self._on_alloc)
        self.transport.stop()

    # -- completions ------------------------------------------------------
    def _complete(self, bq: _Queue, role: str) -> None:
        q = bq.q
        while True:
            for token, _len in q.pop_used():
                if role == "statsq":
                    self._post_stats()
                    continue
                fut = bq.waiters.pop(token, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            if not q.enable_interrupts():
                break
        bq.h.flush_metrics()

    def _submit(self, bq: _Queue, buf: int, nbytes: int, writable: bool = False) -> asyncio.Future:
        assert self.loop is not None
        fut = self.loop.create_future()
        if writable:
            head = bq.q.add([], [(buf, nbytes)], buf)
        else:
            head = bq.q.add([(buf, nbytes)], [], buf)
        del head
        bq.waiters[buf] = fut
        bq.h.publish()
        return fut

    def reconnect(self, retry_for: float = 5.0) -> None:
        """The device process was replaced: reconnect and tell it where the balloon stands.

        ``actual`` lived in the dead process's config space; the pages it
        counts are still out of the guest (and out of the host's segment).
        """
        self._hold = True  # the new device's target is 0 until the host sets it again: don't follow that
        self.transport.reconnect(retry_for)
        self._write_actual()

    def resume(self) -> None:
        """Follow the device's target again (after :meth:`reconnect` and the host's new target)."""
        self._hold = False
        self._changed.set()

    # -- target following -------------------------------------------------
    def _read_target(self) -> int:
        return int.from_bytes(self.transport.read_config(0, 4), "little")

    def _write_actual(self) -> None:
        self.transport.write_config(s.CONFIG_ACTUAL_OFFSET, self.actual.to_bytes(4, "little"))

    async def _follow(self) -> None:
        while True:
            if self._hold:
                await self._wait_change(1.0)
                continue
            self.target = self._read_target()
            if self.actual < self.target:
                done = await self.inflate(self.target - self.actual)
                if done == 0:  # the guest has nothing left to give: wait for a change
                    await self._wait_change(1.0)
            elif self.actual > self.target:
                await self.deflate(self.actual - self.target)
            else:
                await self._wait_change(1.0)

    async def _wait_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self._changed.clear()

    def _take_pages(self, want: int) -> list[tuple[int, int]]:
        """Up to ``want`` pages from the allocator, as big runs as it has."""
        got: list[tuple[int, int]] = []
        chunk = min(want, PFNS)
        remaining = want
        oom = self.alloc.oom_handlers
        self.alloc.oom_handlers = []  # inflating must not trigger our own deflate-on-OOM
        try:
            while remaining > 0 and chunk > 0:
                n = min(chunk, remaining)
                try:
                    gpa = self.alloc.alloc_pages(n)
                except OutOfGuestMemory:
                    chunk //= 2
                    continue
                got.append((gpa, n))
                remaining -= n
        finally:
            self.alloc.oom_handlers = oom
        return got

    async def inflate(self, pages: int) -> int:
        """Move up to ``pages`` pages into the balloon; returns how many moved."""
        bq = self.queues["inflateq"]
        moved = 0
        pending: list[asyncio.Future] = []
        while moved < pages:
            runs = self._take_pages(min(PFNS, pages - moved))
            if not runs:
                break
            n = sum(r[1] for r in runs)
            pending = await _wait_for_buffer(bq, pending)
            buf = bq.free_bufs.pop()
            nbytes = self._write_pfns(buf, runs)
            fut = self._submit(bq, buf, nbytes)
            fut.add_done_callback(lambda _f, buf=buf, runs=runs, n=n: self._inflated(bq, buf, runs, n))
            pending.append(fut)
            moved += n
        if pending:
            await asyncio.gather(*pending)
        if moved:
            self._write_actual()
        return moved

    def _write_pfns(self, buf: int, runs: list[tuple[int, int]]) -> int:
        """Write the runs' PFNs (le32, 4 KiB units) into ``buf``; returns the byte count."""
        pfns = array.array("I")
        for gpa, cnt in runs:
            first = gpa >> s.VIRTIO_BALLOON_PFN_SHIFT
            pfns.extend(range(first, first + cnt))
        data = pfns.tobytes()
        self.mem.write(buf, data)
        return len(data)

    def _inflated(self, bq: _Queue, buf: int, runs: list[tuple[int, int]], n: int) -> None:
        bq.free_bufs.append(buf)
        self.extents.extend(runs)
        self.actual += n

    def _give_back(self, pages: int) -> list[tuple[int, int]]:
        out = []
        while pages > 0 and self.extents:
            gpa, n = self.extents.pop()
            if n > pages:
                self.extents.append((gpa, n - pages))
                out.append((gpa + (n - pages) * s.PAGE, pages))
                break
            out.append((gpa, n))
            pages -= n
        return out

    async def deflate(self, pages: int) -> int:
        """Take up to ``pages`` pages out of the balloon and return them to the allocator."""
        bq = self.queues["deflateq"]
        tell_first = self.has(s.VIRTIO_BALLOON_F_MUST_TELL_HOST)
        moved = 0
        pending: list[asyncio.Future] = []
        while moved < pages and self.extents:
            runs = self._give_back(min(PFNS, pages - moved))
            n = sum(r[1] for r in runs)
            pending = await _wait_for_buffer(bq, pending)
            buf = bq.free_bufs.pop()
            nbytes = self._write_pfns(buf, runs)
            self.actual -= n
            if not tell_first:
                self._release(runs)
            fut = self._submit(bq, buf, nbytes)
            fut.add_done_callback(lambda _f, buf=buf, runs=runs: self._deflated(bq, buf, runs, tell_first))
            pending.append(fut)
            moved += n
        if pending:
            await asyncio.gather(*pending)
        if moved:
            self._write_actual()
        return moved

    def _deflated(self, bq: _Queue, buf: int, runs: list[tuple[int, int]], tell_first: bool) -> None:
        bq.free_bufs.append(buf)
        if tell_first:
            self._release(runs)

    def _release(self, runs: list[tuple[int, int]]) -> None:
        for gpa, n in runs:
            self.alloc.free_range(gpa, n)

    # -- deflate on OOM ---------------------------------------------------
    def _on_oom(self, npages: int) -> bool:
        """The guest allocator ran dry: shrink the balloon synchronously (bounded wait)."""
        if not self.extents:
            return False
        bq = self.queues["deflateq"]
        if not bq.free_bufs:
            return False  # every deflate buffer is in flight: we cannot tell the host now
        # One buffer holds at most a page of PFNs; larger needs take several OOM rounds.
        runs = self._give_back(min(max(npages, PFNS), s.PAGE // 4))
        n = sum(r[1] for r in runs)
        self.actual -= n
        self.oom_deflations += 1
        buf = bq.free_bufs.pop()
        nbytes = self._write_pfns(buf, runs)
        q = bq.q
        q.add([(buf, nbytes)], [], ("oom", buf))
        bq.h.publish()
        deadline = time.monotonic() + 1.0
        ok = False
        while time.monotonic() < deadline:
            if q.has_used():
                for token, _ in q.pop_used():
                    if token == ("oom", buf):
                        ok = True
                    else:
                        fut = bq.waiters.pop(token, None)
                        if fut is not None and not fut.done():
                            fut.set_result(None)
                if ok:
                    break
        bq.free_bufs.append(buf)
        self._release(runs)
        if not ok:
            log.warning("deflate-on-OOM: host did not acknowledge within 1 s")
        self._write_actual()
        return True

    # -- statistics -------------------------------------------------------
    def current_stats(self) -> dict[int, int]:
        a = self.alloc
        free = a.free_pages * a.page_size
        return {
            s.VIRTIO_BALLOON_S_SWAP_IN: 0,
            s.VIRTIO_BALLOON_S_SWAP_OUT: 0,
            s.VIRTIO_BALLOON_S_MAJFLT: 0,
            s.VIRTIO_BALLOON_S_MINFLT: 0,
            s.VIRTIO_BALLOON_S_MEMFREE: free,
            s.VIRTIO_BALLOON_S_MEMTOT: a.total_pages * a.page_size,
            s.VIRTIO_BALLOON_S_AVAIL: free,
            s.VIRTIO_BALLOON_S_CACHES: 0,
        }

    def _post_stats(self) -> None:
        """Fill the single stats buffer and lend it to the device again."""
        bq = self.queues["statsq"]
        st = self.current_stats()
        data = b"".join(s.STAT.pack(tag, st[tag]) for tag in STAT_TAGS)
        self.mem.write(self.stats_buf, data)
        bq.q.add([(self.stats_buf, len(data))], [], "stats")
        bq.h.publish()
        self.stats_sent += 1

    # -- free page reporting ----------------------------------------------
    def _on_alloc(self, gpa: int, npages: int) -> None:
        first = (gpa - self.alloc.base_gpa) // (REPORT_ORDER_PAGES * s.PAGE)
        last = (gpa - self.alloc.base_gpa + npages * s.PAGE - 1) // (REPORT_ORDER_PAGES * s.PAGE)
        self._reported[first:last + 1] = bytes(last - first + 1)

    def _report_candidates(self) -> list[tuple[int, int]]:
        """Free, 2 MiB-aligned blocks not reported since they were last allocated."""
        out = []
        block = REPORT_ORDER_PAGES * s.PAGE
        base = self.alloc.base_gpa
        for gpa, n in self.alloc.extents():
            start = -(-(gpa - base) // block) * block + base
            end = gpa + n * s.PAGE
            b = start
            while b + block <= end:
                idx = (b - base) // block
                if not self._reported[idx]:
                    out.append((b, REPORT_ORDER_PAGES))
                    if len(out) == s.PAGE_REPORTING_CAPACITY:
                        return out
                b += block
        return out

    async def report_free_pages(self) -> int:
        """One reporting pass; returns pages reported."""
        bq = self.queues.get("reporting_vq")
        if bq is None:
            return 0
        total = 0
        while True:
            blocks = self._report_candidates()
            if not blocks:
                return total
            for gpa, n in blocks:
                self.alloc.alloc_range(gpa, n)  # isolate: nobody may use them while reported
            assert self.loop is not None
            fut = self.loop.create_future()
            token = ("report", blocks[0][0])
            bq.q.add([], [(gpa, n * s.PAGE) for gpa, n in blocks], token)
            bq.waiters[token] = fut  # type: ignore[index]
            bq.h.publish()
            try:
                await fut
            finally:
                base = self.alloc.base_gpa
                for gpa, n in blocks:
                    self.alloc.free_range(gpa, n)
                    self._reported[(gpa - base) // (REPORT_ORDER_PAGES * s.PAGE)] = 1
            total += sum(n for _, n in blocks)
            self.reported_pages += sum(n for _, n in blocks)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval)
            await self.report_free_pages()


async def _wait_for_buffer(bq: _Queue, pending: list[asyncio.Future]) -> list[asyncio.Future]:
    """Wait until a PFN buffer is free again; returns the still-pending futures."""
    while not bq.free_bufs:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending = [f for f in pending if not f.done()]
    return pending
