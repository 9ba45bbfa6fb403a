"""virtio-balloon device logic (virtio 1.2, section 5.5).

Memory really moves: inflated and reported pages are punched out of the
guest-RAM file the frontend shared with us (``GuestMemory.discard``), so the
host's resident memory drops for every process mapping it, and a deflated
page reads back as zeros. PFNs are validated against guest RAM; a bad one is
counted and skipped without failing the rest of the buffer.
"""
from __future__ import annotations

import array
import asyncio
import logging
import time
from typing import Optional

from prometheus_client import Gauge

from simvirt import metrics
from simvirt.devices.balloon import spec as s
from simvirt.devices.base import VirtioDevice
from simvirt.memory.guest import GuestAddressError, GuestMemory
from simvirt.virtio.errors import VirtqueueError
from simvirt.virtio.queue import Queue
from simvirt.virtio.spec import VIRTIO_ID_BALLOON, bit

log = logging.getLogger(__name__)

_BALLOON = Gauge("simvirt_balloon_pages", "Balloon size in 4 KiB pages: target (num_pages) and actual", ["vm", "device", "kind"],
                 registry=metrics.REGISTRY)
_GUEST_STATS = Gauge("simvirt_balloon_guest_stat", "Guest memory statistics reported over the stats queue", ["vm", "device", "stat"],
                     registry=metrics.REGISTRY)
_RESIDENT = Gauge("simvirt_guest_ram_resident_bytes", "Guest RAM the host really holds (allocated blocks of the shared segment)",
                  ["vm", "device"], registry=metrics.REGISTRY)
_MOVED = Gauge("simvirt_balloon_moved_pages", "Pages inflated, deflated and reported since start", ["vm", "device", "kind"],
               registry=metrics.REGISTRY)


class BalloonDevice(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    name = "balloon"
    max_queue_size = 256

    def __init__(self, *, vm: str = "standalone", label: Optional[str] = None, stats_interval: float = 0.0) -> None:
        # inflateq, deflateq, statsq, reporting_vq: the most rings our feature set can need.
        super().__init__(4, vm=vm, device_label=label)
        self.stats_interval = stats_interval
        self.mem: GuestMemory = GuestMemory()
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self.roles = s.queue_roles(0)
        self.inflated: bytearray = bytearray()
        self.inflated_pages = 0
        self.counts = {"inflated": 0, "deflated": 0, "reported": 0}
        self.guest_stats: dict[str, int] = {}
        self.stats_updated: Optional[float] = None
        self.stats_updates = 0
        self._stats_held: Optional[tuple[Optional[Queue], int, int]] = None  # (queue or None if stopped, ring index, head)
        self._stats_timer: Optional[asyncio.TimerHandle] = None
        self._stats_waiters: list[asyncio.Future] = []
        lbl = self.label
        metrics.declare_errors(vm, lbl, ["bad_pfn", "bad_stats", "stats_buffer_overrun", "bad_report"])
        _BALLOON.labels(vm, lbl, "target").set_function(lambda: self.num_pages)
        _BALLOON.labels(vm, lbl, "actual").set_function(lambda: self.actual)
        _RESIDENT.labels(vm, lbl).set_function(self._resident_or_zero)
        for kind in self.counts:
            _MOVED.labels(vm, lbl, kind).set_function(lambda k=kind: self.counts[k])

    # -- negotiation and config ------------------------------------------
    def device_features(self) -> int:
        return (super().device_features() | bit(s.VIRTIO_BALLOON_F_MUST_TELL_HOST) | bit(s.VIRTIO_BALLOON_F_STATS_VQ)
                | bit(s.VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | bit(s.VIRTIO_BALLOON_F_PAGE_POISON)
                | bit(s.VIRTIO_BALLOON_F_PAGE_REPORTING))

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.roles = s.queue_roles(features)

    def config(self) -> bytes:
        return s.CONFIG.pack(self.num_pages, self.actual, 0, self.poison_val)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == s.CONFIG_ACTUAL_OFFSET and len(data) == 4:
            self.actual = int.from_bytes(data, "little")
            return
        if offset == 12 and len(data) == 4 and self.has_feature(s.VIRTIO_BALLOON_F_PAGE_POISON):
            self.poison_val = int.from_bytes(data, "little")
            return
        raise ValueError(f"balloon config write at {offset} (+{len(data)}): only actual (4) and poison_val (12) are writable")

    def reset(self) -> None:
        """A new frontend starts with an empty balloon and no statistics."""
        super().reset()
        self.roles = s.queue_roles(0)
        self.actual = 0
        self.poison_val = 0
        self.inflated = bytearray()
        self.inflated_pages = 0
        self.guest_stats = {}
        self.stats_updated = None
        self._stats_held = None
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None

    # -- host side --------------------------------------------------------
    @property
    def ram_size(self) -> int:
        return self.mem.size

    def _resident_or_zero(self) -> int:
        try:
            return self.mem.resident_bytes()
        except OSError:
            return 0

    def set_target_pages(self, pages: int) -> None:
        """Set num_pages and raise a config-change interrupt."""
        if pages < 0 or pages > 0xFFFFFFFF:
            raise ValueError(f"balloon target of {pages} pages is out of range")
        if self.ram_size and pages * s.PAGE > self.ram_size:
            raise ValueError(f"balloon target {pages * s.PAGE} bytes exceeds guest RAM {self.ram_size}")
        self.num_pages = pages
        self.config_changed()

    def set_guest_memory(self, size: int) -> None:
        """QEMU's `balloon SIZE`: the guest should be left with SIZE bytes."""
        ram = self.ram_size
        if not ram:
            raise ValueError("no guest connected: guest RAM size unknown")
        if size <= 0 or size > ram:
            raise ValueError(f"target guest memory {size} must be in (0, {ram}]")
        self.set_target_pages((ram - size) // s.PAGE)

    def info(self) -> dict:
        return {
            "ram_bytes": self.ram_size,
            "target_pages": self.num_pages,
            "actual_pages": self.actual,
            "guest_memory_bytes": self.ram_size - self.actual * s.PAGE if self.ram_size else None,
            "inflated_pages": self.inflated_pages,
            "resident_bytes": self._resident_or_zero(),
            "moved_pages": dict(self.counts),
            "features": [n for n in ("MUST_TELL_HOST", "STATS_VQ", "DEFLATE_ON_OOM", "FREE_PAGE_HINT", "PAGE_POISON",
                                     "PAGE_REPORTING") if self.has_feature(getattr(s, "VIRTIO_BALLOON_F_" + n))],
            "stats": dict(self.guest_stats),
            "stats_age_s": round(time.monotonic() - self.stats_updated, 3) if self.stats_updated else None,
        }

    def request_stats(self) -> bool:
        """Ask the guest for fresh statistics by giving back the buffer it lent us."""
        held = self._stats_held
        if held is None:
            return False
        queue, index, head = held
        if queue is None:
            return False  # its ring is stopped
        self._stats_held = None
        queue.add_used(head, 0)
        self.signal(index)
        return True

    async def fresh_stats(self, timeout: float = 2.0) -> dict:
        """Request statistics and wait (bounded) for the guest's answer."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._stats_waiters.append(fut)
        if self.request_stats():
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
        if fut in self._stats_waiters:
            self._stats_waiters.remove(fut)
        return self.info()

    # -- queues -----------------------------------------------------------
    def queue_started(self, index: int, queue: Queue) -> None:
        held = self._stats_held
        if held is not None and held[0] is None and held[1] == index:
            # The ring was rebuilt (a memory-table change): the held buffer is still the driver's.
            self._stats_held = (queue, index, held[2])
        if self._role(index) == "statsq" and self.stats_interval > 0 and self._stats_timer is None:
            self._schedule_stats()

    def _ram_base_max(self) -> int:
        return max((r.gpa + r.size for r in self.mem.regions), default=0)

    def _schedule_stats(self) -> None:
        loop = asyncio.get_event_loop()

        def tick() -> None:
            self.request_stats()
            self._stats_timer = loop.call_later(self.stats_interval, tick)

        self._stats_timer = loop.call_later(self.stats_interval, tick)

    def queue_stopped(self, index: int) -> None:
        held = self._stats_held
        if held is not None and held[1] == index:
            # Forget the old Queue object (its views are about to be released) but not the head:
            # if the same ring starts again without a reset, the buffer is still outstanding.
            self._stats_held = (None, index, held[2])

    def _role(self, index: int) -> str:
        return self.roles[index] if index < len(self.roles) else "unused"

    def process_queue(self, index: int, queue: Queue, stats: metrics.QueueStats) -> None:
        role = self._role(index)
        heads = queue.pop_heads()
        stats.chains += len(heads)
        for head in heads:
            try:
                descs = queue.walk(head)
            except VirtqueueError as e:
                self._error(e.reason, f"{role}: chain {head}: {e}")
                queue.add_used(head, 0)
                continue
            stats.descriptors += len(descs)
            try:
                if role == "inflateq":
                    self._pfns(descs, inflate=True)
                elif role == "deflateq":
                    self._pfns(descs, inflate=False)
                elif role == "statsq":
                    self._stats(descs)
                    if self._stats_held is not None and self._stats_held[0] is not None:
                        # A driver must keep at most one outstanding (one held across a stop is forgotten).
                        self._error("stats_buffer_overrun", "statsq: a second stats buffer while one is held")
                        old_q, _, old_head = self._stats_held
                        old_q.add_used(old_head, 0)
                    self._stats_held = (queue, index, head)
                    continue
                elif role == "reporting_vq":
                    self._report(descs)
                else:
                    self._error("unexpected_queue", f"chain on ring {index}, which has no role with the negotiated features")
            except GuestAddressError as e:
                self._error("bad_address", f"{role}: {e}")
            queue.add_used(head, 0)

    def _readable(self, descs: list[tuple[int, int, int]]) -> bytes:
        parts = []
        for addr, length, flags in descs:
            if flags & 2:
                raise GuestAddressError(addr, length, "writable buffer where a readable one belongs")
            parts.append(self.mem.translate(addr, length))
        return b"".join(parts)

    def _pfns(self, descs: list[tuple[int, int, int]], inflate: bool) -> None:
        data = self._readable(descs)
        if len(data) % 4:
            self._error("bad_pfn_array", f"PFN array of {len(data)} bytes is not a multiple of 4")
            data = data[: len(data) - len(data) % 4]
        pfns = array.array("I")
        pfns.frombytes(data)
        need = self._ram_base_max() >> s.VIRTIO_BALLOON_PFN_SHIFT
        if len(self.inflated) < need:
            self.inflated.extend(bytes(need - len(self.inflated)))
        ranges = [(r.gpa >> 12, (r.gpa + r.size) >> 12) for r in self.mem.regions]
        if len(ranges) == 1:
            lo, hi = ranges[0]
            good = [p for p in pfns if lo <= p < hi]
        else:
            good = [p for p in pfns if any(lo <= p < hi for lo, hi in ranges)]
        bad = len(pfns) - len(good)
        if bad:
            self._error("bad_pfn", f"{bad} PFNs outside guest RAM", n=bad)
        if inflate:
            for start, n in _runs(sorted(good)):
                self.mem.discard(start << s.VIRTIO_BALLOON_PFN_SHIFT, n << s.VIRTIO_BALLOON_PFN_SHIFT)
            inflated = self.inflated
            fresh = 0
            for pfn in good:
                if not inflated[pfn]:
                    inflated[pfn] = 1
                    fresh += 1
            self.inflated_pages += fresh
            self.counts["inflated"] += len(good)
        else:
            inflated = self.inflated
            gone = 0
            for pfn in good:
                if inflated[pfn]:
                    inflated[pfn] = 0
                    gone += 1
            self.inflated_pages -= gone
            self.counts["deflated"] += len(good)

    def _stats(self, descs: list[tuple[int, int, int]]) -> None:
        data = self._readable(descs)
        n = len(data) // s.STAT.size
        if len(data) % s.STAT.size:
            self._error("bad_stats", f"stats buffer of {len(data)} bytes is not a multiple of {s.STAT.size}")
        for i in range(n):
            tag, val = s.STAT.unpack_from(data, i * s.STAT.size)
            name = s.STAT_NAMES.get(tag)
            if name is None:
                continue  # the device must ignore tags it does not know
            self.guest_stats[name] = val
            _GUEST_STATS.labels(self.vm, self.label, name).set(val)
        self.stats_updated = time.monotonic()
        self.stats_updates += 1
        for fut in self._stats_waiters:
            if not fut.done():
                fut.set_result(None)
        self._stats_waiters.clear()

    def _report(self, descs: list[tuple[int, int, int]]) -> None:
        for addr, length, flags in descs:
            if not flags & 2:
                raise GuestAddressError(addr, length, "readable buffer in a page report")
            self.mem.translate(addr, length)  # bounds check
            if addr % s.PAGE or length % s.PAGE:
                self._error("bad_report", f"reported block {addr:#x}+{length:#x} is not page aligned")
                continue
            if self.poison_val:
                continue  # the pages must keep reading as poison: leave them be
            self.mem.discard(addr, length)
            self.counts["reported"] += length // s.PAGE

    def _error(self, reason: str, message: str, n: int = 1) -> None:
        log.warning("%s: %s", self.label, message)
        metrics.count_error(self.vm, self.label, reason, n)


def _runs(sorted_pfns: list[int]) -> list[tuple[int, int]]:
    """Coalesce sorted PFNs into (start, count) runs: one punch-hole per run."""
    runs: list[tuple[int, int]] = []
    start = prev = -2
    for p in sorted_pfns:
        if p == prev + 1:
            prev = p
            continue
        if prev >= 0:
            runs.append((start, prev - start + 1))
        start = prev = p
    if prev >= 0:
        runs.append((start, prev - start + 1))
    return runs
