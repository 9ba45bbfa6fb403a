"""Guest virtio-net driver.

Receive buffers are persistent chains (one page each with MRG_RXBUF, else
one max-frame buffer) re-posted as soon as their frame is copied out;
transmit slots are persistent chains too, so sending a frame is one copy
into guest RAM, one avail entry and (if the device wants it) one kick.
Frames go up to a callback (the small IPv4 stack in ``netstack``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, Optional

from simvirt.drivers.transport import DeviceError, DriverQueueHandle, VhostUserTransport
from simvirt.net import spec as ns
from simvirt.virtio.spec import VIRTIO_F_EVENT_IDX, bit

log = logging.getLogger(__name__)

WANTED_FEATURES = (
    bit(ns.VIRTIO_NET_F_MAC) | bit(ns.VIRTIO_NET_F_STATUS) | bit(ns.VIRTIO_NET_F_MTU)
    | bit(ns.VIRTIO_NET_F_MRG_RXBUF) | bit(ns.VIRTIO_NET_F_CSUM) | bit(ns.VIRTIO_NET_F_GUEST_CSUM)
    | bit(ns.VIRTIO_NET_F_CTRL_VQ) | bit(ns.VIRTIO_NET_F_CTRL_RX) | bit(ns.VIRTIO_NET_F_CTRL_MAC_ADDR)
    | bit(VIRTIO_F_EVENT_IDX)
)
HDR = ns.VIRTIO_NET_HDR_SIZE
PAGE = 4096
_PLAIN_HDR = ns.VirtioNetHdr().pack()  # no offload requested
_SPIN_ALONE_NS = 40_000  # busy-poll this long before yielding the CPU on each turn


class VirtioNetDriver:
    def __init__(self, transport: VhostUserTransport, *, queue_size: int = 256, features: int = WANTED_FEATURES,
                 poll_us: float = 0.0, tx_buf: int = 2048, rx_buf: int = 0) -> None:
        self.transport = transport
        self.mem = transport.mem
        self.alloc = transport.alloc
        self.queue_size = queue_size
        self.wanted = features
        self.poll_ns = int(poll_us * 1000)
        self.tx_buf = tx_buf
        # Receive buffer size: 0 = a page with MRG_RXBUF (Linux's choice), else one
        # MTU-sized frame.  Bigger mergeable buffers (e.g. 64 KiB for TSO-sized
        # frames) mean one used entry per frame instead of one per page.
        self.rx_buf = rx_buf
        self.mac = b"\0" * 6
        self.mtu = 1500
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.on_frame: Callable[[bytes], None] = lambda frame: None
        # Optional zero-copy consumer: gets single-buffer frames as views of guest
        # RAM, valid only during the call (the buffer is re-posted right after).
        self.on_frame_view: Optional[Callable[[memoryview], None]] = None
        self.rx: Optional[DriverQueueHandle] = None
        self.tx: Optional[DriverQueueHandle] = None
        self.ctrl: Optional[DriverQueueHandle] = None
        self.rx_bufs: list[tuple[int, memoryview, int]] = []  # (gpa, view, head)
        self.tx_slots: list[tuple[int, memoryview, int]] = []
        self.tx_free: list[int] = []
        self.rx_frames = self.tx_frames = self.rx_bytes = self.tx_bytes = 0
        self.rx_errors = 0
        self._mrg = False
        self._tx_waiters: list[asyncio.Future] = []
        self._ctrl_fut: Optional[asyncio.Future] = None

    def probe(self, loop: asyncio.AbstractEventLoop) -> None:
        t = self.transport
        self.loop = loop
        t.start()
        t.negotiate(self.wanted)
        try:
            cfg = ns.NetConfig.unpack(t.read_config(0, ns.VIRTIO_NET_CONFIG_SIZE))
        except DeviceError:
            # Backends without VHOST_USER_PROTOCOL_F_CONFIG (DPDK's vhost): no config space to read.
            cfg = ns.NetConfig()
            t.features &= ~(bit(ns.VIRTIO_NET_F_MAC) | bit(ns.VIRTIO_NET_F_MTU))
        if t.has(ns.VIRTIO_NET_F_MAC):
            self.mac = bytes(cfg.mac)
        else:
            self.mac = bytes([0x52, 0x54, 0x00]) + os.urandom(3)
        if t.has(ns.VIRTIO_NET_F_MTU):
            self.mtu = cfg.mtu
        self.rx = t.setup_queue(0, self.queue_size)
        self.tx = t.setup_queue(1, self.queue_size)
        if t.has(ns.VIRTIO_NET_F_CTRL_VQ):
            self.ctrl = t.setup_queue(2, 64)
        mrg = self._mrg = t.has(ns.VIRTIO_NET_F_MRG_RXBUF)
        rx_size = max(2048, HDR + self.mtu + 18) if not mrg else (self.rx_buf or PAGE)
        q = self.rx.queue
        for slot in range(self.queue_size):
            gpa = self.alloc.alloc(rx_size)
            head = q.add_persistent([], [(gpa, rx_size)])
            self.rx_bufs.append((gpa, self.mem.translate(gpa, rx_size), head))
            q.post(head, slot)
        # Transmit slots: half the ring, each a single-descriptor persistent chain.
        for slot in range(self.queue_size // 2):
            gpa = self.alloc.alloc(self.tx_buf)
            head = self.tx.queue.add_persistent([(gpa, self.tx_buf)], [])
            self.tx_slots.append((gpa, self.mem.translate(gpa, self.tx_buf), head))
            self.tx_free.append(slot)
        t.driver_ok()
        self.rx.queue.publish()
        os.eventfd_write(self.rx.kick_fd, 1)
        self.tx.queue.disable_interrupts()  # see send()
        t.watch_interrupts(loop, 0, self._rx_complete)
        t.watch_interrupts(loop, 1, self._tx_complete)
        if self.ctrl is not None:
            t.watch_interrupts(loop, 2, self._ctrl_complete)

    def close(self) -> None:
        self.transport.stop()

    # -- transmit ---------------------------------------------------------
    def _reclaim_tx(self) -> None:
        assert self.tx is not None
        for slot, _ in self.tx.queue.pop_used():
            self.tx_free.append(slot)
        if self._tx_waiters and self.tx_free:
            for f in self._tx_waiters:
                if not f.done():
                    f.set_result(None)
            self._tx_waiters.clear()

    def _tx_complete(self) -> None:
        assert self.tx is not None
        q = self.tx.queue
        while True:
            self._reclaim_tx()
            if not self._tx_waiters:
                q.disable_interrupts()  # nobody waits for a slot: back to reclaim-on-send
                break
            if not q.enable_interrupts(delayed=True):
                break
        self.tx.flush_metrics()

    def try_send(self, frame: bytes, hdr: ns.VirtioNetHdr | bytes | None = None, publish: bool = True) -> bool:
        """Queue one frame; False if no transmit slot is free (after reclaiming).

        ``hdr`` may be a packed 12-byte header (senders of many alike frames pack it once).
        """
        assert self.tx is not None
        if not self.tx_free:
            self._reclaim_tx()
            if not self.tx_free:
                return False
        n = HDR + len(frame)
        if n > self.tx_buf:
            raise ValueError(f"frame of {len(frame)} bytes exceeds the {self.tx_buf - HDR}-byte transmit buffer")
        slot = self.tx_free.pop()
        gpa, view, head = self.tx_slots[slot]
        view[:HDR] = _PLAIN_HDR if hdr is None else hdr if isinstance(hdr, bytes) else hdr.pack()
        view[HDR:n] = frame
        q = self.tx.queue
        # The persistent chain's length is the buffer size; say how much is frame.
        q._desc[2 * head + 1] = n  # noqa: SLF001 - one descriptor, flags 0, next 0
        q.post(head, slot)
        self.tx_frames += 1
        self.tx_bytes += len(frame)
        if publish:
            self.tx.publish()
        return True

    async def send(self, frame: bytes, hdr: ns.VirtioNetHdr | bytes | None = None) -> None:
        """Queue one frame, waiting for a transmit slot if the ring is full.

        Transmit interrupts are off while slots are free (``try_send`` reclaims
        completed ones, as Linux's virtio-net does without napi_tx): a frame
        costs the device no interrupt and us no wake-up.  Only a sender that
        has to wait turns them on, delayed until ~3/4 of the ring completed.
        """
        assert self.tx is not None
        while not self.try_send(frame, hdr):
            assert self.loop is not None
            fut = self.loop.create_future()
            self._tx_waiters.append(fut)
            if self.tx.queue.enable_interrupts(delayed=True):
                self._reclaim_tx()  # completions arrived meanwhile: no interrupt will say so
            await fut

    # -- receive ----------------------------------------------------------
    def _rx_complete(self) -> None:
        assert self.rx is not None
        q = self.rx.queue
        while True:
            self._rx_drain()
            if self.poll_ns and _spin(q.has_used, self.poll_ns):
                continue
            if not q.enable_interrupts():
                break
        self.rx.flush_metrics()
        if self.tx is not None:
            self.tx.flush_metrics()

    def quiet_rx(self) -> None:
        """About to busy-poll: the device need not interrupt for what arrives.

        Saves it an eventfd write per frame and us the wake-up and read that
        would follow (NAPI busy polling keeps the interrupt off the same way).
        ``end_busy_poll`` turns it back on.
        """
        assert self.rx is not None
        self.rx.queue.disable_interrupts()

    def end_busy_poll(self) -> None:
        """Interrupts back on; what arrived while they were off is delivered now."""
        assert self.rx is not None
        q = self.rx.queue
        while q.enable_interrupts():
            self._rx_drain()

    def busy_poll_rx(self, budget_ns: int) -> bool:
        """Spin on the receive ring for up to ``budget_ns``; deliver what arrived.

        Like Linux's ``SO_BUSY_POLL``: a caller waiting for one reply (ping)
        watches the used ring itself instead of sleeping until the
        interrupt's eventfd wakes the event loop, which is the floor of any
        notification round trip.  Returns True if frames were delivered.
        """
        assert self.rx is not None
        has_used = self.rx.queue.has_used
        now = time.perf_counter_ns
        t = now()
        deadline = t + budget_ns
        polite = t + _SPIN_ALONE_NS
        yield_cpu = os.sched_yield
        while not has_used():
            t = now()
            if t >= deadline:
                return False
            if t >= polite:
                # The device we kicked may have been woken on our CPU (wake-affine):
                # spinning on without yielding would hold its reply back for the whole budget.
                yield_cpu()
        self._rx_drain()
        return True

    def _rx_drain(self) -> None:
        assert self.rx is not None
        q = self.rx.queue
        used = q.pop_used()
        i = 0
        mrg = self._mrg
        frames = []
        on_view = self.on_frame_view
        post = q.post
        nviews = vbytes = 0
        while i < len(used):
            slot, length = used[i]
            _, view, head = self.rx_bufs[slot]
            nbuf = int.from_bytes(view[10:12], "little") if mrg else 1
            if length < HDR or nbuf < 1:
                self.rx_errors += 1
                q.post(head, slot)
                i += 1
                continue
            if nbuf == 1 and on_view is not None:
                on_view(view[HDR:length])
                nviews += 1
                vbytes += length
                post(head, slot)
                i += 1
                continue
            parts = [bytes(view[HDR:length])]
            q.post(head, slot)
            for k in range(1, nbuf):
                if i + k >= len(used):
                    break
                s2, l2 = used[i + k]
                _, v2, h2 = self.rx_bufs[s2]
                parts.append(bytes(v2[:l2]))
                q.post(h2, s2)
            i += nbuf
            frame = parts[0] if len(parts) == 1 else b"".join(parts)
            self.rx_frames += 1
            self.rx_bytes += len(frame)
            frames.append(frame)
        self.rx_frames += nviews
        self.rx_bytes += vbytes - nviews * HDR
        # Frames go up before the refill is published: a refill may cost a kick
        # (an eventfd write), which has no business in a reply's latency.
        for f in frames:
            self.on_frame(f)
        if used:
            self.rx.publish()

    # -- control queue ----------------------------------------------------
    def _ctrl_complete(self) -> None:
        assert self.ctrl is not None
        for token, _ in self.ctrl.queue.pop_used():
            if self._ctrl_fut is not None and not self._ctrl_fut.done():
                self._ctrl_fut.set_result(token)
        self.ctrl.queue.enable_interrupts()

    async def control(self, cls: int, cmd: int, data: bytes) -> bool:
        """Send one control command; True if the device acked VIRTIO_NET_OK."""
        if self.ctrl is None:
            raise DeviceError("no control queue negotiated")
        assert self.loop is not None
        gpa = self.alloc.alloc(2 + len(data) + 1)
        try:
            self.mem.write(gpa, bytes([cls, cmd]) + data + b"\xff")
            self._ctrl_fut = self.loop.create_future()
            self.ctrl.queue.add([(gpa, 2 + len(data))], [(gpa + 2 + len(data), 1)], "ctrl")
            self.ctrl.publish()
            await asyncio.wait_for(self._ctrl_fut, 5.0)
            return self.mem.read(gpa + 2 + len(data), 1)[0] == ns.VIRTIO_NET_OK
        finally:
            self.alloc.free_range(gpa, 1)

    async def set_promisc(self, on: bool) -> bool:
        return await self.control(ns.VIRTIO_NET_CTRL_RX, ns.VIRTIO_NET_CTRL_RX_PROMISC, bytes([int(on)]))


def _spin(ready: Callable[[], bool], budget_ns: int) -> bool:
    now = time.perf_counter_ns
    deadline = now() + budget_ns
    while now() < deadline:
        if ready():
            return True
        os.sched_yield()
    return False
