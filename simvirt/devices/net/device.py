"""virtio-net device logic (virtio 1.2, section 5.1), transport-agnostic.

Transmit: each chain is a 12-byte ``virtio_net_hdr`` and a frame, all
device-readable. Offloads the peer can't take are done here: a NEEDS_CSUM
frame gets its checksum completed, a GSO super-frame is segmented. Receive:
frames from the peer fill the guest's posted buffers; with MRG_RXBUF one
frame may span several chains (``num_buffers`` says how many). Malformed
chains, frames over the MTU, frames shorter than the header and receive
buffers too small for a frame are drops counted by reason; the queue goes on.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any, Optional, Protocol

from simvirt import metrics
from simvirt.devices.base import VirtioDevice
from simvirt.devices.net import impair as _impair
from simvirt.impair.settings import NetSettings
from simvirt.impair.timer import Clock, TimerFactory
from simvirt.memory.guest import GuestAddressError
from simvirt.net import spec as ns
from simvirt.net.offload import PartialCsumFrame, complete_checksum, segment
from simvirt.net.pcap import PcapWriter
from simvirt.net.packets import is_broadcast, is_multicast
from simvirt.virtio.errors import VirtqueueError
from simvirt.virtio.queue import Queue
from simvirt.virtio.spec import VIRTIO_ID_NET, bit

log = logging.getLogger(__name__)

HDR = ns.VIRTIO_NET_HDR_SIZE
RX_BACKLOG = 1024
_GSO_FEATURE = {  # which negotiated feature allows the driver to send each GSO type
    ns.VIRTIO_NET_HDR_GSO_TCPV4: ns.VIRTIO_NET_F_HOST_TSO4,
    ns.VIRTIO_NET_HDR_GSO_TCPV6: ns.VIRTIO_NET_F_HOST_TSO6,
    ns.VIRTIO_NET_HDR_GSO_UDP: ns.VIRTIO_NET_F_HOST_UFO,
    ns.VIRTIO_NET_HDR_GSO_UDP_L4: ns.VIRTIO_NET_F_HOST_USO,
}
_RX_HDR1 = ns.VirtioNetHdr(num_buffers=1).pack()  # no offload, one buffer (num_buffers is ignored without MRG_RXBUF)


class NetPeer(Protocol):
    """Where transmitted frames go (responder, switch, tap, stream...).

    A peer with a true ``borrows_frames`` attribute may be handed views of
    the sender's guest RAM, valid only during ``send`` (it must copy what it
    keeps).  A peer with a true ``accepts_partial_csum`` attribute may be handed
    :class:`PartialCsumFrame` items (checksum left to the endpoint, as
    VIRTIO_NET_F_CSUM allows, and the data borrowed from guest RAM for the
    duration of ``send``); every other peer gets wire-ready ``bytes``.
    """

    accepts_offload: bool

    def send(self, frames: list[bytes]) -> None: ...


class NetStats:
    """Plain-int counters read at scrape time (see metrics.OpStats)."""

    def __init__(self, vm: str, label: str) -> None:
        self.tx = metrics.OpStats(vm, label, "tx")
        self.rx = metrics.OpStats(vm, label, "rx")
        self.drops: collections.Counter[str] = collections.Counter()


class NetDevice(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "net"
    max_queue_size = 1024

    def __init__(self, *, mac: bytes, mtu: int = 1500, queue_pairs: int = 1, vm: str = "standalone",
                 label: Optional[str] = None) -> None:
        super().__init__(2 * queue_pairs + 1, vm=vm, device_label=label)
        self.mac = mac
        self.mtu = mtu
        self.pairs = queue_pairs
        self.peer: Optional[NetPeer] = None
        self.promisc = False
        self.allmulti = False
        self.mac_table: set[bytes] = set()
        self.active_pairs = 1
        self.tx_pair = 0  # the queue pair whose transmit batch is being handled
        self._roles: dict[int, tuple[str, int]] = {}
        self.rx_queues: dict[int, Queue] = {}
        self.backlog: collections.deque[bytes] = collections.deque()
        self.stats = NetStats(vm, self.label)
        # Every frame in either direction, as the wire would show it (--pcap).
        self.capture: Optional[PcapWriter] = None
        metrics.declare_errors(vm, self.label, ["tx_short_frame", "tx_oversize", "rx_no_buffer",
                                                "rx_buffer_too_small", "rx_filtered", "bad_address"])
        # Impairment (set_impairment): a lane per impaired direction, None otherwise, so the
        # unimpaired paths pay one attribute check per batch.
        self.impairer: Optional[_impair.NetImpairer] = None
        self._tx_lane: Optional[_impair.Lane] = None
        self._rx_lane: Optional[_impair.Lane] = None
        self.impair_stats = metrics.ImpairStats(vm, self.label)
        self.impair_counts = {d: {"delayed": 0, "dropped": 0} for d in ("tx", "rx")}

    # -- negotiation and config ------------------------------------------
    def device_features(self) -> int:
        f = super().device_features()
        for b in (ns.VIRTIO_NET_F_MAC, ns.VIRTIO_NET_F_STATUS, ns.VIRTIO_NET_F_MTU, ns.VIRTIO_NET_F_MRG_RXBUF,
                  ns.VIRTIO_NET_F_CSUM, ns.VIRTIO_NET_F_GUEST_CSUM, ns.VIRTIO_NET_F_HOST_TSO4,
                  ns.VIRTIO_NET_F_HOST_TSO6, ns.VIRTIO_NET_F_GUEST_TSO4, ns.VIRTIO_NET_F_GUEST_TSO6,
                  ns.VIRTIO_NET_F_CTRL_VQ, ns.VIRTIO_NET_F_CTRL_RX, ns.VIRTIO_NET_F_CTRL_MAC_ADDR):
            f |= bit(b)
        if self.pairs > 1:
            f |= bit(ns.VIRTIO_NET_F_MQ)
        return f

    def config(self) -> bytes:
        return ns.NetConfig(mac=self.mac, status=ns.VIRTIO_NET_S_LINK_UP, max_virtqueue_pairs=self.pairs,
                            mtu=self.mtu).pack()

    def reset(self) -> None:
        super().reset()
        self.promisc = self.allmulti = False
        self.mac_table.clear()
        self.active_pairs = 1
        self._roles.clear()
        self.rx_queues.clear()
        self.backlog.clear()
        if self._rx_lane is not None:
            self._rx_lane.drop_held()  # for a guest that is gone; held tx frames are on the wire and go on

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self._roles.clear()

    def _role(self, index: int) -> tuple[str, int]:
        # Hot: every kick asks.  Cached per negotiated feature set.
        role = self._roles.get(index)
        if role is None:
            role = self._roles[index] = self._compute_role(index)
        return role

    def _compute_role(self, index: int) -> tuple[str, int]:
        ctrl = self.has_feature(ns.VIRTIO_NET_F_CTRL_VQ)
        pairs = self.pairs if self.has_feature(ns.VIRTIO_NET_F_MQ) else 1
        try:
            return ns.queue_role(index, pairs, ctrl)
        except ValueError:
            return ("none", 0)

    def passive_ring(self, index: int) -> bool:
        return self._role(index)[0] == "rx"

    def recover_inflight(self, index: int, queue: Queue, heads: list[int]) -> list[int]:
        """At most once: a frame the dead process took may already be on the wire (transmit)
        or half written (receive), so each such chain goes back empty and counts as a drop
        instead of being sent or filled twice."""
        role, _ = self._role(index)
        if heads:
            # The driver hears of them when the ring goes live (the session interrupts a resumed ring once).
            queue.add_used_many([(h, 0) for h in heads])
            self._drop(f"{role}_lost_in_restart", len(heads))
        return []

    def passive_wants_kick(self, index: int) -> bool:
        # Receive buffers are looked for when a frame arrives; kicks matter only
        # while frames wait in the backlog (deliver() re-arms them then).
        return bool(self.backlog)

    def queue_started(self, index: int, queue: Queue) -> None:
        role, pair = self._role(index)
        if role == "rx":
            self.rx_queues[pair] = queue

    def queue_stopped(self, index: int) -> None:
        role, pair = self._role(index)
        if role == "rx":
            self.rx_queues.pop(pair, None)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.stats.drops[reason] += n
        metrics.count_error(self.vm, self.label, reason, n)

    # -- queues -----------------------------------------------------------
    def process_queue(self, index: int, queue: Queue, stats: metrics.QueueStats) -> None:
        role, pair = self._role(index)
        if role == "tx":
            # Replies the peer makes while handling this batch go back on the same pair
            # (symmetric flow steering, as a Linux guest expects with MQ).
            self.tx_pair = pair
            try:
                self._tx(queue, stats)
            finally:
                self.tx_pair = 0
        elif role == "rx":
            # New receive buffers: drain what waited for them.
            self.rx_queues[pair] = queue
            if self.backlog:
                self.deliver([], pair)
        elif role == "ctrl":
            self._ctrl(queue, stats)

    def _tx(self, queue: Queue, stats: metrics.QueueStats) -> None:
        if queue._avail[1] == queue.next_avail:  # noqa: SLF001 - nothing new: the common poll result
            return
        t0 = time.perf_counter()
        heads = queue.pop_heads(256)
        stats.chains += len(heads)
        frames: list[bytes] = []
        translate = queue.mem.translate
        max_frame = self.mtu + 14 + 4
        nbytes = 0
        used = []
        table = queue._desc
        qsize = queue.size
        partial_ok = self.peer is not None and getattr(self.peer, "accepts_partial_csum", False)
        borrow = self.peer is not None and getattr(self.peer, "borrows_frames", False)
        lane = self._tx_lane
        if lane is not None:
            # Held frames outlive their descriptors: copy them out, wire-ready.
            partial_ok = borrow = False
        for head in heads:
            used.append((head, 0))
            # Fast path: one readable descriptor holding header + frame (our driver, DPDK).
            w = table[2 * head + 1] if head < qsize else 0
            if head < qsize and not (w >> 32) & 0xFFFF:
                try:
                    data: bytes | memoryview = translate(table[2 * head], w & 0xFFFFFFFF)
                except GuestAddressError:
                    self._drop("bad_address")
                    continue
                stats.descriptors += 1
            else:
                try:
                    descs = queue.walk(head)
                    stats.descriptors += len(descs)
                    parts = []
                    for addr, length, flags in descs:
                        if flags & 2:
                            raise ValueError("device-writable descriptor in a transmit chain")
                        parts.append(translate(addr, length))
                except VirtqueueError as e:
                    self._drop(e.reason)
                    continue
                except GuestAddressError:
                    self._drop("bad_address")
                    continue
                except ValueError:
                    self._drop("tx_writable_descriptor")
                    continue
                data = b"".join(parts)
            if len(data) < HDR + 14:
                self._drop("tx_short_frame")
                continue
            hflags = data[0]
            gso = data[1] & ~ns.VIRTIO_NET_HDR_GSO_ECN
            if not gso and not hflags & ns.VIRTIO_NET_HDR_F_NEEDS_CSUM:
                if len(data) - HDR > max_frame:
                    self._drop("tx_oversize")
                    continue
                # Borrowing peers (the switch) get a view of the sender's RAM and write it
                # straight into the receiver's; the others get the one copy out of guest RAM.
                frames.append(data[HDR:] if borrow and type(data) is memoryview else bytes(data[HDR:]))
                nbytes += len(data) - HDR
                continue
            hdr = ns.VirtioNetHdr.unpack(data)
            frame = data[HDR:]
            try:
                if gso != ns.VIRTIO_NET_HDR_GSO_NONE:
                    needs = _GSO_FEATURE.get(gso)
                    if needs is None or not self.has_feature(needs):
                        self._drop("tx_bad_offload")  # a GSO type the driver was never offered
                        continue
                    segs = segment(frame, hdr)
                    lens = [len(x) for x in segs]  # once, for the MTU check and the byte count
                    if max(lens, default=0) > max_frame:
                        # gso_size is the guest's: segments must still fit the link's MTU.
                        self._drop("tx_oversize")
                        continue
                    frames.extend(segs)
                    nbytes += sum(lens)
                    continue
                if len(frame) > max_frame:
                    self._drop("tx_oversize")
                    continue
                if partial_ok:
                    # Borrowed: a view of guest RAM, valid until add_used below.
                    frame = PartialCsumFrame(frame, hdr.csum_start, hdr.csum_offset)
                else:
                    frame = complete_checksum(frame, hdr.csum_start, hdr.csum_offset)
            except ValueError as e:
                log.debug("tx offload failed: %s", e)
                self._drop("tx_bad_offload")
                continue
            frames.append(frame)
            nbytes += len(frame)
        self.stats.tx.requests += len(frames)
        self.stats.tx.bytes += nbytes
        if heads:
            self.stats.tx.service.observe((time.perf_counter() - t0) / len(heads), len(heads))
        if frames:
            if lane is not None:
                lane.push(frames, self.tx_pair)
            else:
                self._send(frames)
        # Only now: frames handed over as views of guest RAM (PartialCsumFrame) are done with.
        queue.add_used_many(used)

    def _send(self, frames: list) -> None:
        """Frames onto the wire: the capture, then the peer."""
        if self.capture is not None:
            self.capture.write_many([f.completed() if isinstance(f, PartialCsumFrame) else f for f in frames])
            self.capture.flush()
        if self.peer is None:
            self._drop("no_peer", len(frames))
        else:
            self.peer.send(frames)

    def _send_later(self, frames: list[bytes], pair: int) -> None:
        """Transmitted frames an impairment held, now due: replies go back on their queue pair."""
        saved = self.tx_pair
        self.tx_pair = pair
        try:
            self._send(frames)
        finally:
            self.tx_pair = saved

    # -- impairment (simvirt.impair; the control socket's "impair" command) --------------------
    def set_impairment(self, settings: Optional[NetSettings], *, clock: Optional[Clock] = None,
                       timers: Optional[TimerFactory] = None) -> None:
        """Replace the impairment; None or all-default settings clear it (held frames go at once)."""
        sinks = {"tx": self._send_later, "rx": self._place}
        self.impairer = _impair.replace(self.impairer, settings, sinks, self.impair_counts, self.impair_stats,
                                        clock=clock, timers=timers)
        self._tx_lane = self.impairer.lane("tx") if self.impairer is not None else None
        self._rx_lane = self.impairer.lane("rx") if self.impairer is not None else None
        self.impair_stats.holder = self.impairer  # the held count is read from the lanes

    def rx_held(self) -> int:
        """Frames toward the guest an impairment holds (a streaming source counts them as in flight)."""
        return len(self._rx_lane) if self._rx_lane is not None else 0

    def impair_info(self) -> dict[str, Any]:
        imp = self.impairer
        out: dict[str, Any] = {"impair": imp.settings.as_dict() if imp is not None else {}}
        for d in ("tx", "rx"):
            lane = imp.lane(d) if imp is not None else None
            out[d] = dict(self.impair_counts[d], held=len(lane) if lane is not None else 0)
        return out

    # -- receive ----------------------------------------------------------
    def accepts(self, frame: bytes) -> bool:
        """The receive filter (CTRL_RX / MAC table semantics)."""
        if self.promisc:
            return True
        dst = bytes(frame[:6])
        if dst == self.mac or is_broadcast(dst):
            return True
        if is_multicast(dst):
            return self.allmulti or dst in self.mac_table
        return dst in self.mac_table

    def deliver(self, frames: list[bytes], pair: int = 0) -> int:
        """Frames from the peer toward the guest; returns how many were placed."""
        lane = self._rx_lane
        if lane is not None and frames:
            # Held past this call: frames lent by the sender (views of its RAM) are copied.
            lane.push([bytes(f) if type(f) is memoryview else f for f in frames], pair)
            return 0
        return self._place(frames, pair)

    def _place(self, frames: list[bytes], pair: int = 0) -> int:
        """Frames into the guest's receive buffers now (what is left waits in the backlog)."""
        if frames and self.capture is not None:
            self.capture.write_many(frames)
            self.capture.flush()
        queue = self.rx_queues.get(pair)
        if queue is None and pair:
            queue = self.rx_queues.get(0)  # that pair is not running: any receive queue will do
            pair = 0
        backlog = self.backlog
        borrowed = False
        for f in frames:
            if self.accepts(f):
                backlog.append(f)
                borrowed = borrowed or type(f) is memoryview
            else:
                self._drop("rx_filtered")
        if len(backlog) > RX_BACKLOG:
            n = len(backlog) - RX_BACKLOG
            for _ in range(n):
                backlog.popleft()
            self._drop("rx_no_buffer", n)
        if queue is None or not backlog:
            self._own_backlog(borrowed)
            return 0
        placed = 0
        t0 = time.perf_counter()
        before = queue.next_used
        mrg = self.has_feature(ns.VIRTIO_NET_F_MRG_RXBUF)
        translate = queue.mem.translate
        nbytes = 0
        table = queue._desc  # noqa: SLF001 - the one-descriptor fast path reads it directly
        avail = queue._avail  # noqa: SLF001
        mask = queue.size - 1
        try:
            while backlog:
                frame = backlog[0]
                if queue.pending() == 0:
                    break
                # Fast path: the next chain is one device-writable descriptor that holds the
                # whole frame (what our driver and Linux post): header and frame in one go.
                head = avail[2 + (queue.next_avail & mask)]
                need = HDR + len(frame)
                w = table[2 * head + 1] if head <= mask else 0
                if (w >> 32) & 0xFFFF == 2 and w & 0xFFFFFFFF >= need:
                    try:
                        view = translate(table[2 * head], need)
                    except GuestAddressError:
                        view = None
                    if view is not None:
                        queue.next_avail = (queue.next_avail + 1) & 0xFFFF
                        view[:HDR] = _RX_HDR1
                        view[HDR:] = frame
                        queue.add_used(head, need)
                        backlog.popleft()
                        placed += 1
                        nbytes += len(frame)
                        continue
                if mrg:
                    ok = self._rx_mergeable(queue, frame, translate)
                else:
                    ok = self._rx_single(queue, frame, translate)
                if ok is None:
                    break  # ran out of buffers mid-frame: retry when more are posted
                backlog.popleft()
                if ok:
                    placed += 1
                    nbytes += len(frame)
        except VirtqueueError as e:
            self._drop(e.reason)
        self.stats.rx.requests += placed
        self.stats.rx.bytes += nbytes
        if placed:
            self.stats.rx.service.observe((time.perf_counter() - t0) / placed, placed)
        self._own_backlog(borrowed)
        if backlog:
            # Frames are waiting for buffers: make sure the driver's next refill kicks us
            # (with EVENT_IDX it only kicks past avail_event, which must follow what we took).
            queue.enable_notification()
        if queue.next_used != before:
            self.signal(ns.rx_queue_index(pair))
        return placed

    def deliver_stream(self, stream, limit: int, pair: int = 0) -> int:
        """Frames from a generator (``UdpStream``) written straight into receive buffers.

        The rx-throughput source: each frame is produced in place in guest
        RAM (one copy, no intermediate ``bytes``) while the next chain is one
        device-writable descriptor big enough for it; otherwise the frames
        take the general :meth:`deliver` path.  Returns frames placed.
        """
        queue = self.rx_queues.get(pair)
        if queue is None or self.backlog or self.capture is not None or self._rx_lane is not None:
            return self.deliver(stream.take(limit), pair) if queue is not None else 0
        size = stream.size
        need = HDR + size
        table = queue._desc  # noqa: SLF001
        avail = queue._avail  # noqa: SLF001
        mask = queue.size - 1
        translate = queue.mem.translate
        advance = stream._advance  # noqa: SLF001 - the next frame, patched in place (see UdpStream)
        n = min(limit, queue.pending())
        placed = 0
        t0 = time.perf_counter()
        used = []
        start = queue.next_avail
        for k in range(n):
            head = avail[2 + ((start + k) & mask)]
            w = table[2 * head + 1] if head <= mask else 0
            if (w >> 32) & 0xFFFF != 2 or w & 0xFFFFFFFF < need:
                break
            try:
                view = translate(table[2 * head], need)
            except GuestAddressError:
                break
            view[:HDR] = _RX_HDR1
            view[HDR:] = advance()
            used.append((head, need))
        placed = len(used)
        queue.next_avail = (start + placed) & 0xFFFF
        if used:
            queue.add_used_many(used)
            self.stats.rx.requests += placed
            self.stats.rx.bytes += placed * size
            self.stats.rx.service.observe((time.perf_counter() - t0) / placed, placed)
            self.signal(ns.rx_queue_index(pair))
        if placed < n:
            # The next buffer can't take a whole frame (e.g. page-sized mergeable buffers):
            # hand over only as many frames as the posted buffers can hold.
            head = avail[2 + (queue.next_avail & mask)]
            per = (table[2 * head + 1] & 0xFFFFFFFF) if head <= mask else 0
            frames = max(1, (n - placed) // max(1, -(-need // max(per, 1))))
            placed += self.deliver(stream.take(frames), pair)
        return placed

    def _own_backlog(self, borrowed: bool) -> None:
        """Frames lent by the sender (views of its RAM) that must wait get copied now:
        the sender's buffer goes back to its driver when the transmit batch ends."""
        if borrowed and self.backlog:
            owned = [bytes(f) if type(f) is memoryview else f for f in self.backlog]
            self.backlog.clear()
            self.backlog.extend(owned)

    def _writable(self, queue: Queue, head: int, translate) -> Optional[list[memoryview]]:
        try:
            descs = queue.walk(head)
            views = []
            for addr, length, flags in descs:
                if not flags & 2:
                    raise ValueError("device-readable descriptor in a receive chain")
                views.append(translate(addr, length))
            return views
        except (VirtqueueError, GuestAddressError, ValueError):
            self._drop("rx_bad_chain")
            queue.add_used(head, 0)
            return None

    def _rx_single(self, queue: Queue, frame: bytes, translate) -> Optional[bool]:
        head = queue.pop_heads(1)[0]
        views = self._writable(queue, head, translate)
        if views is None:
            return False
        need = HDR + len(frame)
        if sum(len(v) for v in views) < need:
            self._drop("rx_buffer_too_small")
            queue.add_used(head, 0)
            return False
        _scatter(views, ns.VirtioNetHdr(num_buffers=1).pack() + frame)
        queue.add_used(head, need)
        return True

    def _rx_mergeable(self, queue: Queue, frame: bytes, translate) -> Optional[bool]:
        data = _RX_HDR1 + frame
        total = len(data)
        # Look before taking: a frame goes in only once the ring holds all the buffers
        # it needs, so a refill that arrives in pieces delays it instead of dropping it.
        pending = queue.pending()  # read once: the driver may refill while we look
        if self._mergeable_room(queue, total, pending) is None:
            if pending >= queue.size:
                # A full ring of buffers cannot hold it: it never will.
                self._drop("rx_buffer_too_small")
                return False
            return None
        used: list[tuple[int, int]] = []
        off = 0
        header_views: list[memoryview] = []  # the pieces holding the 12-byte header (any framing)
        while off < total:
            if queue.pending() == 0:
                if used:
                    # Out of buffers mid-frame: hand back what we took, drop the frame.
                    for h, _ in used:
                        queue.add_used(h, 0)
                    self._drop("rx_no_buffer")
                    return False
                return None
            head = queue.pop_heads(1)[0]
            views = self._writable(queue, head, translate)
            if views is None:
                continue
            n = 0
            for v in views:
                take = min(len(v), total - off)
                v[:take] = data[off:off + take]
                if off < HDR and take:
                    header_views.append(v[:min(take, HDR - off)])
                off += take
                n += take
                if off == total:
                    break
            used.append((head, n))
        # num_buffers (header bytes 10..11) is known only now; the header may span descriptors.
        _write_across(header_views, 10, len(used).to_bytes(2, "little"))
        queue.add_used_many(used)
        return True

    @staticmethod
    def _mergeable_room(queue: Queue, total: int, pending: int) -> Optional[int]:
        """How many available chains hold ``total`` bytes, or None if those available don't.

        Peeks at the avail ring without consuming; a malformed chain counts as
        room (taking it will drop it with a reason, as before).
        """
        avail = queue._avail  # noqa: SLF001
        mask = queue.size - 1
        start = queue.next_avail
        have = 0
        for k in range(pending):
            try:
                have += sum(n for _, n, f in queue.walk(avail[2 + ((start + k) & mask)]) if f & 2)
            except VirtqueueError:
                return k + 1
            if have >= total:
                return k + 1
        return None

    # -- control queue ----------------------------------------------------
    def _ctrl(self, queue: Queue, stats: metrics.QueueStats) -> None:
        translate = queue.mem.translate
        for head in queue.pop_heads():
            stats.chains += 1
            try:
                descs = queue.walk(head)
                rd = [translate(a, n) for a, n, f in descs if not f & 2]
                wr = [translate(a, n) for a, n, f in descs if f & 2]
            except (VirtqueueError, GuestAddressError):
                self._drop("ctrl_bad_chain")
                queue.add_used(head, 0)
                continue
            if not wr or not len(wr[-1]):
                self._drop("ctrl_no_ack")
                queue.add_used(head, 0)
                continue
            data = b"".join(rd)
            ack = ns.VIRTIO_NET_OK if self._ctrl_command(data) else ns.VIRTIO_NET_ERR
            wr[-1][-1] = ack
            queue.add_used(head, 1)

    def _ctrl_command(self, data: bytes) -> bool:
        if len(data) < 2:
            return False
        cls, cmd, payload = data[0], data[1], data[2:]
        if cls == ns.VIRTIO_NET_CTRL_RX and len(payload) >= 1:
            on = bool(payload[0])
            if cmd == ns.VIRTIO_NET_CTRL_RX_PROMISC:
                self.promisc = on
                return True
            if cmd == ns.VIRTIO_NET_CTRL_RX_ALLMULTI:
                self.allmulti = on
                return True
            return False
        if cls == ns.VIRTIO_NET_CTRL_MAC:
            if cmd == ns.VIRTIO_NET_CTRL_MAC_ADDR_SET and len(payload) == 6:
                self.mac = bytes(payload)
                return True
            if cmd == ns.VIRTIO_NET_CTRL_MAC_TABLE_SET:
                table: set[bytes] = set()
                off = 0
                for _ in range(2):  # unicast table, then multicast table
                    if off + 4 > len(payload):
                        return False
                    n = int.from_bytes(payload[off:off + 4], "little")
                    off += 4
                    if off + 6 * n > len(payload):
                        return False
                    table.update(payload[off + 6 * i:off + 6 * i + 6] for i in range(n))
                    off += 6 * n
                self.mac_table = table
                return True
            return False
        if cls == ns.VIRTIO_NET_CTRL_MQ and cmd == ns.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and len(payload) >= 2:
            n = int.from_bytes(payload[:2], "little")
            if 1 <= n <= self.pairs:
                self.active_pairs = n
                return True
            return False
        return False


def _write_across(views: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the byte string the ``views`` form end to end."""
    for v in views:
        if offset >= len(v):
            offset -= len(v)
            continue
        take = min(len(v) - offset, len(data))
        v[offset:offset + take] = data[:take]
        data = data[take:]
        offset = 0
        if not data:
            return


def _scatter(views: list[memoryview], data: bytes) -> None:
    off = 0
    for v in views:
        take = min(len(v), len(data) - off)
        if take <= 0:
            break
        v[:take] = data[off:off + take]
        off += take
