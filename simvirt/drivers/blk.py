"""Guest virtio-blk driver.

Two layers: :meth:`VirtioBlkDriver.submit` is the raw, callback-based path
the benchmark uses (caller-owned buffers in guest RAM, no allocation per
request); ``read``/``write``/``flush``/``discard``/``write_zeroes``/``get_id``
are the awaitable API on top, with as many requests in flight as the queues
hold. Chains are published once per event-loop turn (like a block-layer
plug), so a burst of submissions costs one avail-idx store and at most one
kick per queue.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from simvirt import metrics
from simvirt.devices.blk import spec as s
from simvirt.drivers.transport import DeviceError, DriverQueueHandle, VhostUserTransport
from simvirt.memory.alloc import PAGE_SIZE
from simvirt.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, bit

Buffer = tuple[int, int]
Callback = Callable[[int, int], None]  # (status, used_len)

WANTED_FEATURES = (
    bit(s.VIRTIO_BLK_F_SIZE_MAX) | bit(s.VIRTIO_BLK_F_SEG_MAX) | bit(s.VIRTIO_BLK_F_BLK_SIZE)
    | bit(s.VIRTIO_BLK_F_TOPOLOGY) | bit(s.VIRTIO_BLK_F_RO) | bit(s.VIRTIO_BLK_F_FLUSH)
    | bit(s.VIRTIO_BLK_F_CONFIG_WCE) | bit(s.VIRTIO_BLK_F_MQ) | bit(s.VIRTIO_BLK_F_DISCARD)
    | bit(s.VIRTIO_BLK_F_WRITE_ZEROES) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
)

_SLOT = 32  # per-request scratch: 16-byte header, status byte at 16
_PACK_HDR = s.OUTHDR.pack_into


class BlkError(IOError):
    def __init__(self, op: str, status: int) -> None:
        name = {s.VIRTIO_BLK_S_IOERR: "IOERR", s.VIRTIO_BLK_S_UNSUPP: "UNSUPP"}.get(status, str(status))
        super().__init__(f"virtio-blk {op} failed with status {name}")
        self.op = op
        self.status = status


@dataclass
class BlkConfig:
    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    physical_block_exp: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int

    @classmethod
    def parse(cls, raw: bytes) -> "BlkConfig":
        f = s.CONFIG.unpack(raw[: s.CONFIG.size].ljust(s.CONFIG.size, b"\0"))
        return cls(capacity=f[0], size_max=f[1], seg_max=f[2], blk_size=f[6], physical_block_exp=f[7],
                   writeback=f[11], num_queues=f[13], max_discard_sectors=f[14], max_discard_seg=f[15],
                   discard_sector_alignment=f[16], max_write_zeroes_sectors=f[17], max_write_zeroes_seg=f[18],
                   write_zeroes_may_unmap=f[19])


class _BlkQueue:
    """One request queue: ring, scratch slots and completion bookkeeping."""

    def __init__(self, driver: "VirtioBlkDriver", handle: DriverQueueHandle) -> None:
        self.driver = driver
        self.h = handle
        self.q = handle.queue
        n = self.q.size
        self.scratch_gpa = driver.transport.alloc.alloc(_SLOT * n)
        self.scratch = driver.transport.mem.translate(self.scratch_gpa, _SLOT * n)
        self.free_slots = list(range(n))
        self.callbacks: list[Optional[Callback]] = [None] * n
        self.fixed: list[bool] = [False] * n  # slot owned by a FixedRequest
        self.publish_pending = False
        self.space = asyncio.Event()
        self.space.set()


class FixedRequest:
    """A persistent request chain (see :meth:`VirtioBlkDriver.fixed_request`)."""

    __slots__ = ("drv", "bq", "slot", "head", "rtype", "_hdr_off")

    def __init__(self, drv: "VirtioBlkDriver", bq: "_BlkQueue", slot: int, head: int, rtype: int) -> None:
        self.drv = drv
        self.bq = bq
        self.slot = slot
        self.head = head
        self.rtype = rtype
        self._hdr_off = slot * _SLOT

    def submit(self, sector: int, callback: Callback) -> None:
        bq = self.bq
        off = self._hdr_off
        _PACK_HDR(bq.scratch, off, self.rtype, 0, sector)
        bq.scratch[off + 16] = 0xFF
        bq.callbacks[self.slot] = callback
        bq.q.post(self.head, self.slot)
        if not bq.publish_pending:
            bq.publish_pending = True
            self.drv.loop.call_soon(self.drv._publish, bq)  # type: ignore[union-attr]


class VirtioBlkDriver:
    def __init__(self, transport: VhostUserTransport, *, num_queues: int = 1, queue_size: int = 256,
                 features: int = WANTED_FEATURES, poll_us: float = 0.0) -> None:
        self.transport = transport
        self.poll_ns = int(poll_us * 1000)
        self.want_queues = num_queues
        self.queue_size = queue_size
        self.wanted_features = features
        self.config: Optional[BlkConfig] = None
        self.queues: list[_BlkQueue] = []
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._rr = 0
        vm, dev = transport.vm, transport.label
        self.latency = {k: metrics.LatencyStats(vm, dev, name) for k, name in s.OP_NAMES.items()}
        self._req = {k: metrics.DRIVER_REQUESTS.labels(vm, dev, name) for k, name in s.OP_NAMES.items()}

    # -- probe ------------------------------------------------------------
    def probe(self, loop: asyncio.AbstractEventLoop) -> BlkConfig:
        """Status handshake, feature negotiation, config read, queue set-up, DRIVER_OK."""
        t = self.transport
        self.loop = loop
        t.start()
        t.negotiate(self.wanted_features)
        self.config = BlkConfig.parse(t.read_config(0, s.CONFIG_DRIVER_READ))
        nq = 1
        if t.has(s.VIRTIO_BLK_F_MQ):
            nq = max(1, min(self.want_queues, self.config.num_queues or 1, t.max_queues))
        indirect_max = min(self.config.seg_max + 2, 64) if t.has(s.VIRTIO_BLK_F_SEG_MAX) else 16
        for i in range(nq):
            h = t.setup_queue(i, self.queue_size, indirect_max=indirect_max)
            bq = _BlkQueue(self, h)
            self.queues.append(bq)
        t.driver_ok()
        for bq in self.queues:
            t.watch_interrupts(loop, bq.h.index, lambda bq=bq: self._complete(bq))
        return self.config

    def close(self) -> None:
        self.transport.stop()

    def reconnect(self, retry_for: float = 10.0) -> None:
        """The device process was replaced: drive the new one from where the old one stopped.

        Requests in flight stay in flight: with INFLIGHT_SHMFD the new backend
        resubmits the ones the old one had taken, and the rest were never taken.
        """
        self.transport.reconnect(retry_for)

    @property
    def readonly(self) -> bool:
        return self.transport.has(s.VIRTIO_BLK_F_RO)

    @property
    def capacity_bytes(self) -> int:
        assert self.config is not None
        return self.config.capacity * s.SECTOR_SIZE

    # -- raw path ---------------------------------------------------------
    def pick_queue(self) -> _BlkQueue:
        qs = self.queues
        if len(qs) == 1:
            return qs[0]
        self._rr = (self._rr + 1) % len(qs)
        return qs[self._rr]

    def can_submit(self, bq: _BlkQueue, ndata: int) -> bool:
        q = bq.q
        if not bq.free_slots or not q.num_free:
            return False
        return q.num_free >= ndata + 2 or (q.indirect and ndata + 2 <= q.indirect_max)

    def submit(self, bq: _BlkQueue, rtype: int, sector: int, data: Sequence[Buffer], callback: Callback) -> None:
        """Queue one request; ``callback(status, used_len)`` runs on completion.

        ``data`` buffers are device-writable for IN and GET_ID, device-readable
        otherwise (OUT data, discard/write-zeroes segments).
        """
        slot = bq.free_slots.pop()
        base = slot * _SLOT
        scratch = bq.scratch
        _PACK_HDR(scratch, base, rtype, 0, sector)
        scratch[base + 16] = 0xFF
        hdr = (bq.scratch_gpa + base, 16)
        status = (bq.scratch_gpa + base + 16, 1)
        if rtype == s.VIRTIO_BLK_T_IN or rtype == s.VIRTIO_BLK_T_GET_ID:
            out: list[Buffer] = [hdr]
            inb: list[Buffer] = [*data, status]
        else:
            out = [hdr, *data]
            inb = [status]
        bq.callbacks[slot] = callback
        bq.q.add(out, inb, slot)
        if not bq.publish_pending:
            bq.publish_pending = True
            assert self.loop is not None
            self.loop.call_soon(self._publish, bq)

    def fixed_request(self, bq: _BlkQueue, rtype: int, data: Sequence[Buffer]) -> "FixedRequest":
        """Reserve a scratch slot and build a persistent chain for repeated I/O.

        Each :meth:`FixedRequest.submit` then costs a header store and one
        avail-ring entry: the fixed-buffer fast path for benchmarks and other
        workloads that reuse their buffers (like io_uring registered buffers).
        """
        slot = bq.free_slots.pop()
        bq.fixed[slot] = True
        base = slot * _SLOT
        hdr = (bq.scratch_gpa + base, 16)
        status = (bq.scratch_gpa + base + 16, 1)
        if rtype == s.VIRTIO_BLK_T_IN or rtype == s.VIRTIO_BLK_T_GET_ID:
            head = bq.q.add_persistent([hdr], [*data, status])
        else:
            head = bq.q.add_persistent([hdr, *data], [status])
        return FixedRequest(self, bq, slot, head, rtype)

    def release_fixed(self, req: "FixedRequest") -> None:
        """Undo :meth:`fixed_request` (the request must not be in flight)."""
        bq = req.bq
        bq.q.release_persistent(req.head)
        bq.fixed[req.slot] = False
        bq.free_slots.append(req.slot)

    def _publish(self, bq: _BlkQueue) -> None:
        bq.publish_pending = False
        bq.h.publish()

    def _complete(self, bq: _BlkQueue) -> None:
        """Interrupt handler: reap used chains, run callbacks, maybe poll for more.

        With ``poll_us`` the driver publishes resubmissions at once and spins
        on the used index before re-arming the interrupt (NAPI-style), so a
        busy queue runs without any eventfd traffic.
        """
        q = bq.q
        scratch = bq.scratch
        cbs = bq.callbacks
        fixed = bq.fixed
        poll_ns = self.poll_ns
        while True:
            for slot, length in q.pop_used():
                cb = cbs[slot]
                cbs[slot] = None
                status = scratch[slot * _SLOT + 16]
                if not fixed[slot]:
                    bq.free_slots.append(slot)
                if cb is not None:
                    cb(status, length)
            if poll_ns and q.in_flight:
                if bq.publish_pending:
                    self._publish(bq)
                if _spin(q.has_used, poll_ns):
                    continue
            if not q.enable_interrupts():
                break
        bq.space.set()
        bq.h.flush_metrics()

    # -- awaitable API ----------------------------------------------------
    async def _request(self, rtype: int, sector: int, data: Sequence[Buffer]) -> int:
        assert self.loop is not None
        bq = self.pick_queue()
        while not self.can_submit(bq, len(data)):
            bq.space.clear()
            await bq.space.wait()
        fut = self.loop.create_future()
        t0 = time.perf_counter()

        def done(status: int, length: int) -> None:
            if not fut.done():
                fut.set_result((status, length))

        self.submit(bq, rtype, sector, data, done)
        status, length = await fut
        self.latency[rtype].observe(time.perf_counter() - t0)
        self._req[rtype].inc()
        if status != s.VIRTIO_BLK_S_OK:
            raise BlkError(s.OP_NAMES.get(rtype, str(rtype)), status)
        return length

    def _segments(self, gpa: int, nbytes: int) -> list[Buffer]:
        """Split a buffer so no segment exceeds size_max."""
        assert self.config is not None
        limit = self.config.size_max if self.transport.has(s.VIRTIO_BLK_F_SIZE_MAX) and self.config.size_max else nbytes
        return [(gpa + off, min(limit, nbytes - off)) for off in range(0, nbytes, limit)]

    def max_request_bytes(self) -> int:
        """Largest read/write one chain can carry: seg_max segments of size_max, within the ring."""
        assert self.config is not None and self.queues
        cfg = self.config
        seg_size = cfg.size_max if self.transport.has(s.VIRTIO_BLK_F_SIZE_MAX) and cfg.size_max else 1 << 20
        q = self.queues[0].q
        max_chain = max(q.indirect_max if q.indirect else 0, q.size)
        segs = max_chain - 2
        if self.transport.has(s.VIRTIO_BLK_F_SEG_MAX) and cfg.seg_max:
            segs = min(segs, cfg.seg_max)
        return max(1, segs) * seg_size // s.SECTOR_SIZE * s.SECTOR_SIZE

    def _pieces(self, sector: int, nbytes: int) -> list[tuple[int, int, int]]:
        """(sector, byte offset, length) pieces that each fit one chain."""
        step = self.max_request_bytes()
        return [(sector + off // s.SECTOR_SIZE, off, min(step, nbytes - off)) for off in range(0, nbytes, step)]

    def _check(self, sector: int, nbytes: int) -> None:
        if nbytes <= 0 or nbytes % s.SECTOR_SIZE:
            raise ValueError(f"length {nbytes} is not a positive multiple of {s.SECTOR_SIZE}")
        if sector < 0 or sector * s.SECTOR_SIZE + nbytes > self.capacity_bytes:
            raise ValueError(f"range sector {sector} + {nbytes} bytes is beyond the disk")

    async def read(self, sector: int, nbytes: int) -> bytes:
        self._check(sector, nbytes)
        alloc = self.transport.alloc
        gpa = alloc.alloc(nbytes)
        try:
            await asyncio.gather(*(self._request(s.VIRTIO_BLK_T_IN, sec, self._segments(gpa + off, n))
                                   for sec, off, n in self._pieces(sector, nbytes)))
            return self.transport.mem.read(gpa, nbytes)
        finally:
            alloc.free_range(gpa, -(-nbytes // PAGE_SIZE))

    async def write(self, sector: int, data: bytes) -> None:
        self._check(sector, len(data))
        alloc = self.transport.alloc
        gpa = alloc.alloc(len(data))
        try:
            self.transport.mem.write(gpa, data)
            await asyncio.gather(*(self._request(s.VIRTIO_BLK_T_OUT, sec, self._segments(gpa + off, n))
                                   for sec, off, n in self._pieces(sector, len(data))))
        finally:
            alloc.free_range(gpa, -(-len(data) // PAGE_SIZE))

    async def flush(self) -> None:
        await self._request(s.VIRTIO_BLK_T_FLUSH, 0, [])

    async def get_id(self) -> str:
        alloc = self.transport.alloc
        gpa = alloc.alloc(s.VIRTIO_BLK_ID_BYTES)
        try:
            await self._request(s.VIRTIO_BLK_T_GET_ID, 0, [(gpa, s.VIRTIO_BLK_ID_BYTES)])
            return self.transport.mem.read(gpa, s.VIRTIO_BLK_ID_BYTES).rstrip(b"\0").decode(errors="replace")
        finally:
            alloc.free_range(gpa, 1)

    async def _segment_request(self, rtype: int, ranges: Sequence[tuple[int, int]], flags: int) -> None:
        payload = b"".join(s.DISCARD_SEG.pack(sector, num, flags) for sector, num in ranges)
        if not payload:
            raise ValueError("no ranges")
        alloc = self.transport.alloc
        gpa = alloc.alloc(len(payload))
        try:
            self.transport.mem.write(gpa, payload)
            await self._request(rtype, 0, [(gpa, len(payload))])
        finally:
            alloc.free_range(gpa, -(-len(payload) // PAGE_SIZE))

    async def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Discard ``(sector, num_sectors)`` ranges (at most max_discard_seg at once)."""
        if not self.transport.has(s.VIRTIO_BLK_F_DISCARD):
            raise DeviceError("device does not support discard")
        await self._segment_request(s.VIRTIO_BLK_T_DISCARD, ranges, 0)

    async def write_zeroes(self, ranges: Sequence[tuple[int, int]], unmap: bool = False) -> None:
        if not self.transport.has(s.VIRTIO_BLK_F_WRITE_ZEROES):
            raise DeviceError("device does not support write zeroes")
        await self._segment_request(s.VIRTIO_BLK_T_WRITE_ZEROES, ranges,
                                    s.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0)

    async def set_writeback(self, on: bool) -> None:
        if not self.transport.has(s.VIRTIO_BLK_F_CONFIG_WCE):
            raise DeviceError("device has no writable cache mode")
        self.transport.write_config(s.CONFIG_WRITEBACK_OFFSET, bytes([1 if on else 0]))


def _spin(ready: Callable[[], bool], budget_ns: int) -> bool:
    now = time.perf_counter_ns
    deadline = now() + budget_ns
    yield_cpu = os.sched_yield
    while now() < deadline:
        if ready():
            return True
        yield_cpu()  # a device sharing our CPU gets to run
    return False
