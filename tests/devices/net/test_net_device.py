"""virtio-net device logic, sans-IO: rings written by hand, a capturing peer.

Bad input (issue 3, point 6): malformed TX chains, frames over the MTU or
shorter than the header, receive buffers too small for a frame — each a
counted drop with its reason, and traffic continues afterwards.
"""
from __future__ import annotations

import struct

import pytest

from simvirt.devices.net.device import NetDevice
from simvirt.metrics import QueueStats
from simvirt.net import packets as pk
from simvirt.net import spec as ns
from simvirt.net.checksum import ones_sum, pseudo_header_sum
from simvirt.virtio.spec import VIRTIO_F_VERSION_1, bit
from simvirt_testlib import MiB, RawRing, R, W, bytearray_memory
from simvirt.memory import PageAllocator

GUEST_MAC = pk.parse_mac("52:54:00:12:34:56")
GW_MAC = pk.parse_mac("52:55:0a:00:02:02")
GUEST_IP = pk.ip_bytes("10.0.2.15")
GW_IP = pk.ip_bytes("10.0.2.2")
HDR = ns.VIRTIO_NET_HDR_SIZE


class Capture:
    accepts_offload = False

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frames: list[bytes]) -> None:
        self.frames.extend(frames)


class Rig:
    def __init__(self, features: int = 0, mtu: int = 1500) -> None:
        self.mem = bytearray_memory(4 * MiB)
        self.alloc = PageAllocator(0, 4 * MiB)
        self.dev = NetDevice(mac=GUEST_MAC, mtu=mtu)
        self.dev.mem = self.mem
        self.signals: list[int] = []
        self.dev.signal = self.signals.append
        self.dev.set_features(bit(VIRTIO_F_VERSION_1) | bit(ns.VIRTIO_NET_F_CTRL_VQ) | features)
        self.peer = Capture()
        self.dev.peer = self.peer
        self.rings = [RawRing(self.mem, self.alloc, 64) for _ in range(3)]  # rx, tx, ctrl
        self.queues = [r.device_queue() for r in self.rings]
        self.stats = QueueStats("t", "net", "q")
        self.dev.queue_started(0, self.queues[0])
        self.next_desc = [0, 0, 0]

    def buf(self, data: bytes) -> int:
        gpa = self.alloc.alloc(max(1, len(data)))
        self.mem.write(gpa, data)
        return gpa

    def post(self, ring: int, segs: list[tuple[int, int, int]]) -> int:
        head = self.rings[ring].chain(segs, first=self.next_desc[ring])
        self.next_desc[ring] += len(segs)
        self.rings[ring].push(head)
        return head

    def tx(self, data: bytes) -> None:
        self.post(1, [(self.buf(data), len(data), R)])
        self.dev.process_queue(1, self.queues[1], self.stats)

    def rx_buffer(self, size: int) -> int:
        gpa = self.alloc.alloc(size)
        self.post(0, [(gpa, size, W)])
        return gpa


def hdr(**kw) -> bytes:
    return ns.VirtioNetHdr(**kw).pack()


def arp_request() -> bytes:
    return pk.pad_frame(pk.arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GW_IP))


def test_tx_frame_reaches_peer_unchanged():
    rig = Rig()
    frame = arp_request()
    rig.tx(hdr() + frame)
    assert rig.peer.frames == [frame]
    assert rig.rings[1].pop_used() == [(0, 0)]


def test_tx_partial_checksum_is_completed_for_the_peer():
    rig = Rig(bit(ns.VIRTIO_NET_F_CSUM))
    frame = pk.udp_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 4000, 7, b"x" * 333, checksum="partial")
    csum_start = 14 + 20
    rig.tx(hdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=csum_start, csum_offset=6) + frame)
    (out,) = rig.peer.frames
    udp = out[csum_start:]
    # A correct UDP checksum sums (with the pseudo header) to 0xffff.
    total = ones_sum(udp, pseudo_header_sum(GUEST_IP, GW_IP, 17, len(udp)))
    assert (total % 0xFFFF) == 0 and out[:csum_start] == frame[:csum_start]


def test_tx_tso_superframe_is_segmented_to_mtu():
    rig = Rig(bit(ns.VIRTIO_NET_F_CSUM) | bit(ns.VIRTIO_NET_F_HOST_TSO4))
    payload = bytes(range(256)) * 64  # 16 KiB
    frame = pk.tcp_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 5000, 80, seq=1000, ack=1, flags=0x18,
                         payload=payload, checksum="partial")
    rig.tx(hdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=ns.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
               gso_size=1448, csum_start=34, csum_offset=16) + frame)
    segs = rig.peer.frames
    assert len(segs) == -(-len(payload) // 1448)
    assert all(len(f) <= 1514 for f in segs)
    assert b"".join(f[54:] for f in segs) == payload


@pytest.mark.parametrize("case,reason", [
    ("short", "tx_short_frame"),
    ("oversize", "tx_oversize"),
    ("writable", "tx_writable_descriptor"),
    ("outside_ram", "bad_address"),
    ("loop", "chain_too_long"),
])
def test_bad_tx_chains_are_counted_drops_and_traffic_continues(case, reason):
    rig = Rig()
    if case == "short":
        rig.tx(hdr() + b"\x01" * 10)
    elif case == "oversize":
        rig.tx(hdr() + arp_request()[:14] + bytes(1600))
    elif case == "writable":
        rig.post(1, [(rig.buf(hdr() + arp_request()), HDR + 60, W)])
        rig.dev.process_queue(1, rig.queues[1], rig.stats)
    elif case == "outside_ram":
        rig.post(1, [(64 * MiB, 100, R)])
        rig.dev.process_queue(1, rig.queues[1], rig.stats)
    elif case == "loop":
        a = rig.buf(hdr() + arp_request())
        r = rig.rings[1]
        r.set_desc(10, a, 10, 1, 11)
        r.set_desc(11, a, 10, 1, 10)
        r.push(10)
        rig.next_desc[1] = 12
        rig.dev.process_queue(1, rig.queues[1], rig.stats)
    assert rig.dev.stats.drops[reason] == 1
    assert rig.peer.frames == []
    assert len(rig.rings[1].pop_used()) == 1  # the bad chain went back to the driver
    frame = arp_request()
    rig.tx(hdr() + frame)
    assert rig.peer.frames == [frame]


def test_rx_waits_for_buffers_then_fills_them_with_header():
    rig = Rig()
    frame = pk.pad_frame(pk.arp_frame(2, GW_MAC, GW_IP, GUEST_MAC, GUEST_IP))
    assert rig.dev.deliver([frame]) == 0  # no buffers yet: backlog
    gpa = rig.rx_buffer(2048)
    rig.dev.process_queue(0, rig.queues[0], rig.stats)  # the driver's kick: buffers arrived
    (head, length), = rig.rings[0].pop_used()
    assert length == HDR + len(frame)
    got = rig.mem.read(gpa, length)
    assert ns.VirtioNetHdr.unpack(got).num_buffers == 1 and got[HDR:] == frame
    assert rig.signals == [0]


def test_rx_buffer_too_small_is_a_counted_drop_and_next_frame_is_fine():
    rig = Rig()
    small = rig.rx_buffer(64)
    big = rig.rx_buffer(2048)
    frame = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, bytes(500))
    assert rig.dev.deliver([frame]) == 0
    assert rig.dev.stats.drops["rx_buffer_too_small"] == 1
    assert rig.dev.deliver([frame]) == 1
    used = rig.rings[0].pop_used()
    assert used[0][1] == 0 and used[1][1] == HDR + len(frame)
    assert rig.mem.read(big + HDR, len(frame)) == frame
    del small


def test_mergeable_rx_spreads_a_frame_over_buffers():
    rig = Rig(bit(ns.VIRTIO_NET_F_MRG_RXBUF))
    bufs = [rig.rx_buffer(1024) for _ in range(3)]
    frame = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, bytes(range(256)) * 8)
    assert rig.dev.deliver([frame]) == 1
    used = rig.rings[0].pop_used()
    assert len(used) == 3 and sum(n for _, n in used) == HDR + len(frame)
    data = b"".join(rig.mem.read(b, n) for b, (_, n) in zip(bufs, used))
    assert ns.VirtioNetHdr.unpack(data).num_buffers == 3
    assert data[HDR:] == frame


def test_rx_filter_and_promiscuous_mode_via_control_queue():
    rig = Rig(bit(ns.VIRTIO_NET_F_CTRL_RX))
    rig.rx_buffer(2048)
    other = pk.udp_frame(GW_MAC, pk.parse_mac("52:54:00:99:99:99"), GW_IP, GUEST_IP, 9, 5001, b"x" * 20)
    assert rig.dev.deliver([other]) == 0
    assert rig.dev.stats.drops["rx_filtered"] == 1
    cmd = rig.buf(bytes([ns.VIRTIO_NET_CTRL_RX, ns.VIRTIO_NET_CTRL_RX_PROMISC, 1]))
    ack = rig.buf(b"\xff")
    rig.post(2, [(cmd, 3, R), (ack, 1, W)])
    rig.dev.process_queue(2, rig.queues[2], rig.stats)
    assert rig.mem.read(ack, 1) == bytes([ns.VIRTIO_NET_OK])
    assert rig.dev.deliver([other]) == 1
    bad = rig.buf(bytes([77, 0, 1]))
    ack2 = rig.buf(b"\xff")
    rig.post(2, [(bad, 3, R), (ack2, 1, W)])
    rig.dev.process_queue(2, rig.queues[2], rig.stats)
    assert rig.mem.read(ack2, 1) == bytes([ns.VIRTIO_NET_ERR])


def test_config_space_layout():
    dev = NetDevice(mac=GUEST_MAC, mtu=9000, queue_pairs=4)
    cfg = dev.read_config(0, 12)
    assert cfg[:6] == GUEST_MAC
    assert struct.unpack_from("<HHH", cfg, 6) == (ns.VIRTIO_NET_S_LINK_UP, 4, 9000)
    assert dev.device_features() & bit(ns.VIRTIO_NET_F_MQ)
    assert dev.num_queues == 9


def test_backlog_rearms_the_kick_so_a_refill_reaches_the_device():
    """With EVENT_IDX the driver kicks only past avail_event: leftover frames must move it."""
    from simvirt.virtio.spec import VIRTIO_F_EVENT_IDX
    rig = Rig(bit(ns.VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_F_EVENT_IDX))
    rig.queues[0] = rig.rings[0].device_queue(event_idx=True)
    rig.dev.queue_started(0, rig.queues[0])
    for _ in range(2):
        rig.rx_buffer(2048)
    frame = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, bytes(1000))
    assert rig.dev.deliver([frame] * 5) == 2
    assert len(rig.dev.backlog) == 3
    avail_event = struct.unpack("<H", rig.mem.read(rig.rings[0].used_gpa + 4 + 8 * 64, 2))[0]
    assert avail_event == rig.queues[0].next_avail == 2


class PartialPeer:
    """A local endpoint that takes checksum-offloaded frames (like the responder)."""

    accepts_offload = False
    accepts_partial_csum = True

    def __init__(self, rig: "Rig") -> None:
        self.rig = rig
        self.items: list[tuple[str, bytes]] = []
        self.used_at_send: list[int] = []

    def send(self, frames) -> None:
        from simvirt.net.offload import PartialCsumFrame
        # The borrowed views must still be the driver's: nothing returned to it yet.
        self.used_at_send.append(self.rig.queues[1].next_used)
        for f in frames:
            if isinstance(f, PartialCsumFrame):
                self.items.append(("partial", f.completed()))
            else:
                self.items.append(("plain", f))


def test_partial_checksum_goes_to_a_local_endpoint_borrowed_and_is_completed_for_the_wire():
    rig = Rig(bit(ns.VIRTIO_NET_F_CSUM))
    rig.dev.peer = peer = PartialPeer(rig)
    frame = pk.udp_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 4000, 9, b"y" * 777, checksum="partial")
    wire = pk.udp_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 4000, 9, b"y" * 777)
    rig.tx(hdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6) + frame)
    rig.tx(hdr() + wire)
    assert peer.items == [("partial", wire), ("plain", wire)]
    assert peer.used_at_send == [0, 1]                  # a chain's used entry comes after the peer is done
    assert len(rig.rings[1].pop_used()) == 2


def test_responder_discards_trusted_partial_frames_and_completes_those_it_answers():
    from simvirt.devices.net.peers import ResponderPeer
    from simvirt.net.offload import PartialCsumFrame
    rig = Rig(bit(ns.VIRTIO_NET_F_CSUM))
    peer = ResponderPeer(rig.dev, None)
    r = peer.responder
    junk = bytearray(pk.udp_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 4000, 9, b"d" * 100, checksum="partial"))
    junk[40:42] = b"\x12\x34"     # partial: the field is the guest's business, not summed
    for _ in range(3):            # the second and third hit the one-flow memo
        assert r.receive(PartialCsumFrame(memoryview(bytes(junk)), 34, 6)) == []
    assert r.counters["udp_discard"] == 3 and r.counters["udp_discard_bytes"] == 300
    # Same headers, different length: validated again, not matched.
    longer = pk.udp_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 4000, 9, b"d" * 101, checksum="partial")
    assert r.receive(PartialCsumFrame(longer, 34, 6)) == [] and r.counters["udp_discard_bytes"] == 401
    # A bad IP header is never trusted.
    bad = bytearray(junk)
    bad[22] ^= 1
    assert r.receive(PartialCsumFrame(bytes(bad), 34, 6)) == [] and r.dropped["ipv4_bad_checksum"] == 1
    # UDP echo (port 7) gets an answer with a real checksum.
    echo = pk.udp_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 4000, 7, b"hello", checksum="partial")
    (reply,) = r.receive(PartialCsumFrame(echo, 34, 6))
    udp = reply[34:]
    assert udp[8:] == b"hello" and ones_sum(udp, pseudo_header_sum(GW_IP, GUEST_IP, 17, len(udp))) == 0xFFFF


@pytest.mark.parametrize("bufsize, mrg, frames", [(2048, False, 12), (4096, True, 12), (512, True, 4)])
def test_rx_stream_frames_land_in_guest_buffers_byte_exact(bufsize, mrg, frames):
    """Written in place when a buffer holds a frame; else as many as the posted buffers hold."""
    from simvirt.net.responder import UdpStream
    rig = Rig(bit(ns.VIRTIO_NET_F_MRG_RXBUF) if mrg else 0)
    bufs = [rig.rx_buffer(bufsize) for _ in range(12)]
    expected = UdpStream(1514, dst_mac=GUEST_MAC).take(frames)
    assert rig.dev.deliver_stream(UdpStream(1514, dst_mac=GUEST_MAC), 12) == frames
    used = rig.rings[0].pop_used()
    got = []
    i = 0
    while i < len(used):
        first = rig.mem.read(bufs[used[i][0]], used[i][1])
        nb = ns.VirtioNetHdr.unpack(first).num_buffers
        data = first + b"".join(rig.mem.read(bufs[h], n) for h, n in used[i + 1:i + nb])
        got.append(data[HDR:])
        i += nb
    assert got == expected
    assert rig.dev.stats.drops == {} and rig.dev.stats.rx.requests == frames
    assert rig.signals and rig.signals[-1] == 0


def test_passive_rx_ring_asks_for_kicks_only_while_frames_wait():
    rig = Rig()
    assert not rig.dev.passive_wants_kick(0)
    frame = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, bytes(100))
    assert rig.dev.deliver([frame]) == 0
    assert rig.dev.passive_wants_kick(0)
    rig.rx_buffer(2048)
    rig.dev.process_queue(0, rig.queues[0], rig.stats)
    assert not rig.dev.passive_wants_kick(0)


def test_mergeable_frame_waits_for_enough_buffers_instead_of_dropping():
    rig = Rig(bit(ns.VIRTIO_NET_F_MRG_RXBUF))
    frame = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, bytes(range(256)) * 12)  # 3 KiB
    first = rig.rx_buffer(1024)
    assert rig.dev.deliver([frame]) == 0            # one 1 KiB buffer: too few, nothing taken
    assert rig.rings[0].pop_used() == [] and rig.dev.stats.drops == {}
    more = [rig.rx_buffer(1024) for _ in range(3)]
    rig.dev.process_queue(0, rig.queues[0], rig.stats)   # the refill's kick
    used = rig.rings[0].pop_used()
    assert len(used) == 4 and not rig.dev.backlog
    data = b"".join(rig.mem.read(g, n) for g, (_, n) in zip([first, *more], used))
    assert ns.VirtioNetHdr.unpack(data).num_buffers == 4 and data[HDR:] == frame


def test_frame_larger_than_a_full_ring_of_buffers_is_dropped_not_stuck():
    rig = Rig(bit(ns.VIRTIO_NET_F_MRG_RXBUF), mtu=9000)
    for _ in range(64):
        rig.rx_buffer(64)                            # 64 x 64 B: the ring is full and holds 4 KiB
    frame = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, bytes(8000))
    assert rig.dev.deliver([frame]) == 0
    assert rig.dev.stats.drops["rx_buffer_too_small"] == 1 and not rig.dev.backlog


def test_borrowing_peer_gets_views_of_sender_ram_and_a_receiver_keeps_a_copy_only_when_it_must_wait():
    """The switch path: one copy from the sender's RAM into the receiver's buffers."""
    sender, receiver = Rig(), Rig()
    got: list = []

    class Lender:
        accepts_offload = False
        borrows_frames = True

        def send(self, frames):
            got.extend(type(f) for f in frames)
            receiver.dev.deliver(frames)

    sender.dev.peer = Lender()
    receiver.dev.promisc = True
    buf = receiver.rx_buffer(2048)
    first = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, b"A" * 300)
    second = pk.udp_frame(GW_MAC, GUEST_MAC, GW_IP, GUEST_IP, 9, 5001, b"B" * 300)
    gpa = sender.buf(hdr() + first)
    sender.post(1, [(gpa, HDR + len(first), R)])
    sender.dev.process_queue(1, sender.queues[1], sender.stats)
    assert got == [memoryview]
    assert receiver.mem.read(buf + HDR, len(first)) == first
    # No receive buffer now: the frame waits, as a copy of its own.
    sender.mem.write(gpa, hdr() + second)
    sender.post(1, [(gpa, HDR + len(second), R)])
    sender.dev.process_queue(1, sender.queues[1], sender.stats)
    assert [type(f) for f in receiver.dev.backlog] == [bytes]
    sender.mem.write(gpa, bytes(HDR + len(second)))  # the sender reuses its buffer
    buf2 = receiver.rx_buffer(2048)
    receiver.dev.process_queue(0, receiver.queues[0], receiver.stats)
    assert receiver.mem.read(buf2 + HDR, len(second)) == second


def test_multiqueue_reply_comes_back_on_the_pair_the_request_went_out_on():
    from simvirt.devices.net.peers import ResponderPeer
    rig = Rig(bit(ns.VIRTIO_NET_F_MQ) | bit(ns.VIRTIO_NET_F_MRG_RXBUF))
    dev = NetDevice(mac=GUEST_MAC, queue_pairs=2)
    dev.mem = rig.mem
    signals: list[int] = []
    dev.signal = signals.append
    dev.set_features(bit(VIRTIO_F_VERSION_1) | bit(ns.VIRTIO_NET_F_CTRL_VQ) | bit(ns.VIRTIO_NET_F_MQ))
    dev.peer = ResponderPeer(dev, None)
    rings = [RawRing(rig.mem, rig.alloc, 64) for _ in range(5)]   # rx0 tx0 rx1 tx1 ctrl
    queues = [r.device_queue() for r in rings]
    for i in (0, 2):
        dev.queue_started(i, queues[i])
    bufs = {}
    for i in (0, 2):
        gpa = rig.alloc.alloc(2048)
        rings[i].push(rings[i].chain([(gpa, 2048, W)], first=0))
        bufs[i] = gpa
    req = hdr() + arp_request()
    src = rig.alloc.alloc(len(req))
    rig.mem.write(src, req)
    rings[3].push(rings[3].chain([(src, len(req), R)], first=0))
    dev.process_queue(3, queues[3], QueueStats("t", "net", "q"))
    assert rings[0].pop_used() == []
    (head, n), = rings[2].pop_used()
    reply = rig.mem.read(bufs[2] + HDR, n - HDR)
    assert reply[12:14] == b"\x08\x06" and reply[:6] == GUEST_MAC
    assert signals == [2]
