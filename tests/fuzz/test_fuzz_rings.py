"""Hypothesis fuzzers for split-ring contents on the device side (issue: "fuzzers for ring contents").

Guest-controlled ring memory is generated at random -- descriptor tables with
addresses inside, across and outside guest RAM (including a hole between two
regions), lengths from 0 to 4 GiB, every NEXT/WRITE/INDIRECT combination and
unknown flag bits, next indices in and out of range and loops, indirect
tables of random content and length, avail rings with random heads and
random avail/used indices around the 16-bit wrap -- and fed to:

* the low-level walker (``simvirt.virtio.queue.Queue``): ``walk`` agrees with
  an independent model of the spec plus simvirt's documented guards, only
  typed errors (``VirtqueueError`` subclasses, ``GuestAddressError``) escape,
  ``pop_heads``/``pop_chains``/``pending`` follow the avail index exactly,
  ``add_used``/``needs_notification`` follow the spec and write nothing but
  the used ring;
* ``BlkDevice.process_queue`` and ``NetDevice.process_queue`` (transmit,
  receive with a backlog, control) plus ``NetDevice.deliver``, with and
  without vhost-user inflight tracking (INFLIGHT_SHMFD) on the queue: they
  never raise on guest input (a bogus avail index may break the queue, but
  only as a typed ``AvailIndexError`` before anything is popped), every
  popped chain comes back exactly once on the used ring with a length no
  larger than its device-writable capacity (and, with inflight tracking,
  nothing is left marked inflight), transmitted frames fit the MTU, and no
  byte changes anywhere except in device-writable buffers of popped chains
  and the used ring. Guest RAM is cut out of one bytearray with poisoned
  guard bytes around and between the regions, and the whole backing store
  is compared before/after.

Every finding is kept as a ``test_regression_*`` test: the property that found
it, with the minimal failing example pinned with ``@example``. Fixed in commit
fa23eb6 (plain regression tests now): (1) ``Queue.last_descriptor`` returned
the nested INDIRECT entry of an indirect table, and blk wrote its IOERR status
through it; (2) GSO segments larger than the MTU were handed to the peer;
(3) a mergeable receive chain whose header spans descriptors raised
ValueError out of ``deliver()`` and lost the chain; (9) with inflight
tracking, an avail-ring head >= queue size raised IndexError out of
``Queue.pop_heads`` (``test_regression_inflight_bogus_head``; fixed later:
the inflight region ignores heads it has no entry for).

Budget: every property runs a bounded number of examples (see
``fuzz_testlib.fuzz_settings``; the whole ``tests/fuzz`` directory takes well
under a minute on a 2-core CI machine), with no example database (runs are
stateless). For a longer local run set ``SIMVIRT_FUZZ_EXAMPLES=N`` (for
example ``SIMVIRT_FUZZ_EXAMPLES=5000``): every property then runs N examples.
"""
from __future__ import annotations

import collections
import itertools
import logging
import random
import struct
from dataclasses import dataclass, field, replace
from typing import Optional

import pytest
from hypothesis import event, example, given, strategies as st

from simvirt.devices.blk import spec as blk
from simvirt.devices.blk.device import BlkDevice
from simvirt.devices.blk.storage import MemoryStorage
from simvirt.devices.net.device import NetDevice
from simvirt.metrics import QueueStats
from simvirt.net import packets as pk
from simvirt.net import spec as ns
from simvirt.net.offload import PartialCsumFrame
from simvirt.vhost_user import inflight
from simvirt.virtio.errors import AvailIndexError, ChainAddressError, VirtqueueError
from simvirt.virtio.queue import MAX_INDIRECT, DescriptorChain, Queue
from simvirt.virtio.spec import VIRTIO_F_VERSION_1, bit, vring_need_event

from fuzz_testlib import (
    DESC,
    INDIRECT,
    NEXT,
    U64_MAX,
    WRITE,
    GuardedRam,
    Intervals,
    RefChainError,
    assert_writes_confined,
    fuzz_settings,
    reachable,
    ref_walk,
    writable_ranges,
)

# ---------------------------------------------------------------------------
# guest RAM layout (region A always; region B only in "multi" mode, after a hole)
# ---------------------------------------------------------------------------
REGION = 0x10000
A_GPA, B_GPA = 0x0, 0x20000  # [0x10000, 0x20000) is a hole
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0000, 0x0400, 0x0800
TABLE_GPA, TABLE_STRIDE, NTABLES, TABLE_MAX = 0x1000, 0x200, 16, 32  # indirect tables (never a buffer target)
DATA_A = 0x4000  # buffers live in [DATA_A, A end) and in region B
SLOT = 0x400
HOT = [DATA_A + SLOT * k for k in range((REGION - DATA_A) // SLOT)] + [B_GPA + SLOT * k for k in range(REGION // SLOT)]
SIZES = [1, 2, 4, 8, 16]

_labels = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def _quiet_device_logs():
    """Every dropped chain logs a warning; thousands of them only slow the run down."""
    logger = logging.getLogger("simvirt")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(old)


@dataclass
class RingCase:
    """Everything a driver controls in one split ring, plus the device-side starting indices."""

    size: int
    multi: bool = False
    indirect: bool = True
    event_idx: bool = False
    descs: list = field(default_factory=list)  # size x (addr, len, flags, next)
    tables: list = field(default_factory=list)  # table k at TABLE_GPA + k * TABLE_STRIDE
    avail: list = field(default_factory=list)  # size ring entries
    next_avail: int = 0
    avail_idx: int = 0
    next_used: int = 0
    used_event: int = 0
    avail_flags: int = 0
    plants: list = field(default_factory=list)  # (gpa, bytes) written into data areas
    seed: int = 0  # data-area fill
    inflight: bool = False  # vhost-user INFLIGHT_SHMFD tracking on (a fresh region, as after GET_INFLIGHT_FD)


def build(case: RingCase) -> tuple[GuardedRam, Queue]:
    layout = [(A_GPA, REGION)] + ([(B_GPA, REGION)] if case.multi else [])
    fill = random.Random(case.seed).randbytes(REGION)
    ram = GuardedRam(layout, fill)
    n = case.size
    descs = list(case.descs) + [(0, 0, 0, 0)] * (n - len(case.descs))
    ram.write(DESC_GPA, b"".join(DESC.pack(*d) for d in descs[:n]))
    for k, table in enumerate(case.tables[:NTABLES]):
        if table:
            ram.write(TABLE_GPA + k * TABLE_STRIDE, b"".join(DESC.pack(*d) for d in table[:TABLE_MAX]))
    avail = list(case.avail) + [0] * (n - len(case.avail))
    ram.write(AVAIL_GPA, struct.pack(f"<HH{n}HH", case.avail_flags, case.avail_idx & 0xFFFF, *avail[:n], case.used_event))
    used = bytearray(random.Random(case.seed ^ 0x5EED).randbytes(6 + 8 * n))
    struct.pack_into("<H", used, 2, case.next_used & 0xFFFF)
    ram.write(USED_GPA, bytes(used))
    for gpa, data in case.plants:
        if ram.locate(gpa, len(data)) is not None and gpa >= DATA_A:
            ram.write(gpa, data)
    m = ram.mem
    q = Queue(m, n, m.translate(DESC_GPA, 16 * n), m.translate(AVAIL_GPA, 6 + 2 * n), m.translate(USED_GPA, 6 + 8 * n),
              event_idx=case.event_idx, indirect=case.indirect, next_avail=case.next_avail, next_used=case.next_used)
    if case.inflight:  # as BackendSession._attach_inflight does for a fresh region
        iq = inflight.InflightQueue(memoryview(bytearray(inflight.queue_region_size(n))), n)
        iq.reset()
        assert iq.recover(q.next_used) == []
        q.inflight = iq
    return ram, q


def check_inflight(q: Queue, what: str) -> None:
    """With inflight tracking, a batch fully returned leaves nothing marked inflight, and the
    region's used_idx follows the ring's (what a restarted backend relies on)."""
    iq = q.inflight
    if iq is None:
        return
    assert iq.used_idx == q.next_used, f"{what}: inflight used_idx {iq.used_idx} != ring's {q.next_used}"
    left = [h for h in range(iq.size) if inflight.DESC_STATE.unpack_from(iq.view, inflight.REGION_HDR.size + 16 * h)[0]]
    assert left == [], f"{what}: heads {left} still marked inflight after they were returned"


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------
ODD_ADDRS = [REGION - 1, REGION, REGION - 16, B_GPA - 1, B_GPA + REGION - 1, B_GPA + REGION, 0x30000,
             1 << 32, 1 << 63, U64_MAX, U64_MAX - 15]
ODD_LENS = [0, 1, 11, 12, 15, 16, 17, 26, 60, 511, 512, 513, 1024, 4096, 0x8000, 0x10000, 0x7FFFFFFF,
            0x80000000, 0xFFFFFFFF]

buf_addr = st.one_of(
    st.sampled_from(HOT),
    st.integers(DATA_A, REGION - 1),
    st.integers(B_GPA, B_GPA + REGION - 1),
    st.sampled_from(ODD_ADDRS),
    st.integers(B_GPA + REGION, U64_MAX),
)
buf_len = st.one_of(st.sampled_from(ODD_LENS), st.integers(0, 0x2400))
FLAG_COMBOS = [0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE, NEXT | WRITE | INDIRECT]
BOGUS_TABLES = [REGION - 16, REGION - 8, 0x30000, B_GPA - 16, U64_MAX - 15, 1 << 40]
ODD_TABLE_LENS = [8, 24, 17, 16 * (MAX_INDIRECT + 1), 0xFFFFFFF0, 0xFFFFFFFF]


def decode_descriptor(b: bytes, size: int, in_table: bool = False) -> tuple[int, int, int, int]:
    """16 fuzz bytes -> one descriptor; all-zero bytes decode to the simplest one.

    Descriptors come from raw bytes (one hypothesis draw per table, cheap to
    generate and to shrink) through selectors that favour the interesting
    values: hot buffer addresses, region edges, the hole between regions,
    addresses near 2**64, lengths around 0/12/16/512/4 GiB, every flag
    combination and, more rarely, raw 16-bit flags and next indices.
    """
    a_sel, l_sel, f_sel, n_sel = b[0], b[1], b[2], b[3]
    raw64 = int.from_bytes(b[4:12], "little")
    raw32 = int.from_bytes(b[12:16], "little")
    flags = FLAG_COMBOS[f_sel % 8] if f_sel < 224 else raw32 & 0xFFFF
    if flags & INDIRECT and not in_table:
        addr = TABLE_GPA + (a_sel % NTABLES) * TABLE_STRIDE if a_sel < 224 else BOGUS_TABLES[a_sel % len(BOGUS_TABLES)]
        length = 16 * (l_sel % (TABLE_MAX + 3)) if l_sel < 224 else ODD_TABLE_LENS[l_sel % len(ODD_TABLE_LENS)]
    else:
        if a_sel < 128:
            addr = HOT[a_sel % len(HOT)] + (raw64 % 3) * (SLOT // 2 - 1)
        elif a_sel < 176:
            addr = DATA_A + raw64 % (REGION - DATA_A)
        elif a_sel < 208:
            addr = B_GPA + raw64 % REGION
        elif a_sel < 240:
            addr = ODD_ADDRS[a_sel % len(ODD_ADDRS)]
        else:
            addr = B_GPA + REGION + raw64 % (U64_MAX - B_GPA - REGION + 1)
        if l_sel < 144:
            length = ODD_LENS[l_sel % len(ODD_LENS)]
        elif l_sel < 240:
            length = raw32 % 0x2400
        else:
            length = raw32
    limit = TABLE_MAX if in_table else size
    if n_sel < 208:
        nxt = n_sel % limit
    else:
        nxt = [limit, limit + 1, 0xFFFF, raw32 >> 16][n_sel % 4]
    return (addr, length, flags, nxt)


def descriptors(n: int, size: int, in_table: bool = False) -> st.SearchStrategy[list]:
    return st.binary(min_size=16 * n, max_size=16 * n).map(
        lambda b: [decode_descriptor(b[16 * k:16 * k + 16], size, in_table) for k in range(n)])


def segs_to_descs(segs: list[tuple[int, int, int]], slots: list[int]) -> list[tuple[int, tuple]]:
    """Link ``segs`` through descriptor indices ``slots`` with NEXT: [(index, (addr, len, flags, next))]."""
    out = []
    for k, (addr, length, flags) in enumerate(segs):
        last = k == len(segs) - 1
        out.append((slots[k], (addr, length, flags | (0 if last else NEXT), 0 if last else slots[k + 1])))
    return out


# Plausible chains per device, so processing gets past the walk often.
HOT_A = [a for a in HOT if a < REGION]
HOT_B = [a for a in HOT if a >= B_GPA]


HOT_ALL = HOT_A + HOT_A + HOT_A + HOT_B  # region A (always mapped) three times as often as region B


def hot_addr() -> st.SearchStrategy[int]:
    return st.sampled_from(HOT_ALL)


BLK_TYPES = [blk.VIRTIO_BLK_T_IN, blk.VIRTIO_BLK_T_OUT, blk.VIRTIO_BLK_T_FLUSH, blk.VIRTIO_BLK_T_GET_ID,
             blk.VIRTIO_BLK_T_DISCARD, blk.VIRTIO_BLK_T_WRITE_ZEROES, 2, 77, 0xFFFFFFFF]


@st.composite
def blk_chain(draw, hot=HOT_ALL) -> tuple[list[tuple[int, int, int]], list[tuple[int, bytes]]]:
    """A request-shaped chain and the header planted where its first descriptor points.

    Mostly coherent (data direction matching the request type, sector-sized
    lengths, a one-byte writable status) so requests get served, with
    random deviations in every part.
    """
    cap = DISK // 512
    rtype = draw(st.sampled_from(BLK_TYPES + [blk.VIRTIO_BLK_T_IN] * 4 + [blk.VIRTIO_BLK_T_OUT] * 2))
    coherent = draw(st.integers(0, 3)) != 0
    sector = draw(st.one_of(st.integers(0, cap - 16), st.integers(0, cap),
                            st.sampled_from([cap - 1, cap - 8, 1 << 63, U64_MAX])))
    hdr = draw(st.sampled_from(hot))
    header = blk.OUTHDR.pack(rtype, 0, sector)
    if rtype in (blk.VIRTIO_BLK_T_DISCARD, blk.VIRTIO_BLK_T_WRITE_ZEROES):
        header += b"".join(blk.DISCARD_SEG.pack(*x) for x in draw(st.lists(st.tuples(
            st.one_of(st.integers(0, cap), st.just(U64_MAX)), st.sampled_from([0, 1, 8, cap, 0xFFFFFFFF]),
            st.sampled_from([0, 0, 1, 2])), min_size=coherent, max_size=2)))
    if draw(st.booleans()):
        segs = [(hdr, 16, 0)]
    else:
        cut = draw(st.integers(0, 16))
        segs = [(hdr, cut, 0), (hdr + cut, 16 - cut, 0)]
    if len(header) > 16:
        segs.append((hdr + 16, len(header) - 16, 0))
    data_flag = WRITE if rtype in (blk.VIRTIO_BLK_T_IN, blk.VIRTIO_BLK_T_GET_ID) else 0
    lens = [512, 1024, 4096, 8192] if coherent else [512, 4096, 0, 1, 16, 20, 513, 8192]
    for addr, length, flag in draw(st.lists(st.tuples(st.sampled_from(hot), st.sampled_from(lens), st.sampled_from([0, WRITE])),
                                            max_size=3)):
        segs.append((addr, length, data_flag if coherent else flag))
    status = draw(st.sampled_from(hot)) + SLOT - 1
    if coherent:
        segs.append((status, 1, WRITE))
    else:
        segs += draw(st.sampled_from([[(status, 1, WRITE)], [(status - 1, 2, WRITE)], [], [(status, 0, WRITE)],
                                      [(status, 1, 0)]]))
    return segs, [(hdr, header)]


@st.composite
def blk_plant(draw, hot=HOT_ALL) -> tuple[int, bytes]:
    cap = DISK // 512
    rtype = draw(st.sampled_from(BLK_TYPES))
    sector = draw(st.one_of(st.integers(0, cap), st.sampled_from([cap - 1, 1 << 63, U64_MAX])))
    return (draw(st.sampled_from(hot)), blk.OUTHDR.pack(rtype, 0, sector))


GUEST_MAC = pk.parse_mac("52:54:00:12:34:56")
GW_MAC = pk.parse_mac("52:55:0a:00:02:02")
IP_G, IP_W = pk.ip_bytes("10.0.2.15"), pk.ip_bytes("10.0.2.2")


def _hdr(**kw) -> bytes:
    return ns.VirtioNetHdr(**kw).pack()


NET_TX_PAYLOADS = [
    _hdr() + pk.pad_frame(pk.arp_frame(1, GUEST_MAC, IP_G, bytes(6), IP_W)),
    _hdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    + pk.udp_frame(GUEST_MAC, GW_MAC, IP_G, IP_W, 4000, 7, b"u" * 300, checksum="partial"),
    _hdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=ns.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=536,
         csum_start=34, csum_offset=16)
    + pk.tcp_frame(GUEST_MAC, GW_MAC, IP_G, IP_W, 5000, 80, 1, 1, 0x18, bytes(range(256)) * 12, checksum="partial"),
    _hdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=ns.VIRTIO_NET_HDR_GSO_UDP, gso_size=1000, csum_start=34,
         csum_offset=6) + pk.udp_frame(GUEST_MAC, GW_MAC, IP_G, IP_W, 4000, 7, b"f" * 2500, checksum="partial"),
    _hdr() + b"\x01" * 10,  # shorter than an Ethernet header
    _hdr() + pk.build_ethernet(GW_MAC, GUEST_MAC, 0x0800) + bytes(1600),  # over the MTU
]


@st.composite
def net_tx_plant(draw, hot=HOT_ALL) -> tuple[int, bytes]:
    data = bytearray(draw(st.sampled_from(NET_TX_PAYLOADS)))
    if draw(st.booleans()):  # scribble over the virtio_net_hdr and the first header bytes
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 60)) % len(data)] = draw(st.integers(0, 255))
    return (draw(st.sampled_from(hot)), bytes(data))


@st.composite
def net_tx_chain(draw, hot=HOT_ALL) -> tuple[list[tuple[int, int, int]], list[tuple[int, bytes]]]:
    addr, data = draw(net_tx_plant(hot))
    total = draw(st.one_of(st.just(len(data)), st.just(len(data)), buf_len))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, min(total, 4096) - 1)), max_size=3))) if total > 1 else []
    bounds = [0, *cuts, total]
    return [(addr + a, b - a, draw(st.sampled_from([0, 0, 0, WRITE]))) for a, b in zip(bounds, bounds[1:])], [(addr, data)]


@st.composite
def net_rx_chain(draw, hot=HOT_ALL) -> tuple[list[tuple[int, int, int]], list[tuple[int, bytes]]]:
    n = draw(st.integers(1, 3))
    return [(draw(st.sampled_from(hot)) + draw(st.sampled_from([0, 0x100])),
             draw(st.one_of(st.sampled_from([1526, 2048, 60, 74, 11, 12, 13, 26, 0, 100, 1000]), st.integers(0, 3000))),
             draw(st.sampled_from([WRITE, WRITE, WRITE, 0]))) for _ in range(n)], []


@st.composite
def ctrl_plant(draw, hot=HOT_ALL) -> tuple[int, bytes]:
    cls = draw(st.sampled_from([ns.VIRTIO_NET_CTRL_RX, ns.VIRTIO_NET_CTRL_MAC, ns.VIRTIO_NET_CTRL_MQ, 9]))
    cmd = draw(st.integers(0, 5))
    payload = draw(st.one_of(
        st.binary(max_size=40),
        st.tuples(st.integers(0, 3), st.integers(0, 3)).map(
            lambda t: struct.pack("<I", t[0]) + bytes(6 * t[0]) + struct.pack("<I", t[1]) + bytes(6 * t[1])),
        st.just(struct.pack("<I", 0xFFFFFFFF)),
    ))
    return (draw(st.sampled_from(hot)), bytes([cls, cmd]) + payload)


@st.composite
def ctrl_chain(draw, hot=HOT_ALL) -> tuple[list[tuple[int, int, int]], list[tuple[int, bytes]]]:
    cmd, data = draw(ctrl_plant(hot))
    segs = [(cmd, draw(st.sampled_from([len(data), len(data), 2, 3, 8, 22, 0])), 0)]
    if draw(st.booleans()):
        segs.append((cmd + 2, draw(st.integers(0, 20)), 0))
    segs += draw(st.sampled_from([[(draw(st.sampled_from(hot)) + SLOT - 1, 1, WRITE)], [], [(draw(st.sampled_from(hot)), 0, WRITE)],
                                  [(draw(st.sampled_from(hot)), 4, WRITE), (draw(st.sampled_from(hot)), 0, WRITE)]]))
    return segs, [(cmd, data)]


# Plausible chains use buffer slots in mapped RAM 9 times out of 10 (random descriptors cover the rest).
CHAINS = {
    kind: {multi: make(HOT_ALL if multi else HOT_A) for multi in (False, True)}
    for kind, make in (("blk", blk_chain), ("net_tx", net_tx_chain), ("net_rx", net_rx_chain), ("ctrl", ctrl_chain))
}
_generic = st.tuples(st.lists(st.tuples(buf_addr, buf_len, st.sampled_from([0, WRITE])), min_size=1, max_size=4), st.just([]))
CHAINS["generic"] = {False: _generic, True: _generic}
PLANTS = {"blk": blk_plant(), "net_tx": net_tx_plant(), "ctrl": ctrl_plant(),
          "net_rx": st.tuples(hot_addr(), st.binary(max_size=16)),
          "generic": st.tuples(hot_addr(), st.binary(max_size=16))}


@st.composite
def ring_cases(draw, kind: str = "generic", sizes=SIZES) -> RingCase:
    size = draw(st.sampled_from(sizes))
    case = RingCase(size=size, multi=draw(st.booleans()), indirect=draw(st.booleans()),
                    event_idx=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
                    inflight=kind != "generic" and draw(st.integers(0, 3)) == 0)
    # 1. random descriptors everywhere, random indirect tables (table k lives at TABLE_GPA + k * TABLE_STRIDE)
    descs = draw(descriptors(size, size))
    tables = draw(st.lists(st.integers(0, 8).flatmap(lambda n: descriptors(n, size, in_table=True)), max_size=3))
    # 2. plausible chains laid over them: direct (at random free indices) or through an indirect table
    heads = []
    chain_plants = []
    chain_slots: list[int] = []
    free = list(draw(st.permutations(range(size))))
    for (segs, plants), via_table in draw(st.lists(st.tuples(CHAINS[kind][case.multi or draw(st.integers(0, 9)) == 0], st.integers(0, 3)), max_size=min(size, 6))):
        if case.indirect and via_table == 0 and free and len(tables) < NTABLES:
            k = len(tables)
            segs = segs[:TABLE_MAX]
            tables.append([d for _, d in segs_to_descs(segs, list(range(len(segs))))])
            i = free.pop(0)
            descs[i] = (TABLE_GPA + k * TABLE_STRIDE, 16 * len(segs), INDIRECT, 0)
            heads.append(i)
        elif len(segs) <= len(free):
            slots, free = free[:len(segs)], free[len(segs):]
            for i, d in segs_to_descs(segs, slots):
                descs[i] = d
            heads.append(slots[0])
            chain_slots += slots
        chain_plants += plants
    # 3. point mutations of single fields, in the ring and in the indirect tables: flag flips,
    #    next indices in/out of range (loops), odd lengths, stray addresses
    def mutate(d: tuple, which: int, v: int, limit: int, in_table: bool = False) -> tuple:
        a, n, f, x = d
        if which == 0:
            f ^= (NEXT, WRITE, INDIRECT, 1 << (v % 16))[v % 4]
        elif which == 1:  # (re)link: loops, jumps out of range, chains running into other chains
            f |= NEXT
            x = v % (limit + 2)
        elif which == 2:
            n = ODD_LENS[v % len(ODD_LENS)]
        else:  # a hot buffer slot, or somewhere past the end of RAM (never ring metadata)
            a = HOT[(v >> 1) % len(HOT)] if v % 2 == 0 else B_GPA + REGION + (v >> 1)
        if f & INDIRECT and not in_table and DATA_A <= a < B_GPA + REGION:
            # Indirect tables stay in the table area: the device may write the data areas while it
            # works, and a table there would make "which bytes may change" depend on the order.
            a = TABLE_GPA + (v % NTABLES) * TABLE_STRIDE
        return (a, n, f, x)

    for i, which, v in draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 3), st.integers(0, 2**64 - 1)),
                                     max_size=2)):
        if chain_slots and v % 3:  # mostly hit the plausible chains, often their last descriptor
            i = chain_slots[-1] if v % 3 == 1 else chain_slots[i % len(chain_slots)]
        descs[i] = mutate(descs[i], which, v >> 2, size)
    for k, which, v in draw(st.lists(st.tuples(st.integers(0, NTABLES - 1), st.integers(0, 3), st.integers(0, 2**64 - 1)),
                                     max_size=2)):
        if k < len(tables) and tables[k]:
            j = v % len(tables[k])
            tables[k][j] = mutate(tables[k][j], which, v >> 8, len(tables[k]), in_table=True)
    case.descs, case.tables = descs, tables
    # 4. the avail ring: heads of the plausible chains first, then anything
    extra = draw(st.binary(min_size=3 * size, max_size=3 * size))
    entries = heads + [extra[3 * k + 1] % size if extra[3 * k] < 224 else int.from_bytes(extra[3 * k + 1:3 * k + 3], "little")
                       for k in range(size)]
    case.avail = entries[:size]
    case.next_avail = draw(st.one_of(st.sampled_from([0, 0xFFFF, 0xFFFE, 0x8000]), st.integers(0, 0xFFFF)))
    pending = draw(st.one_of(st.just(min(len(heads), size)), st.integers(0, size)))
    if draw(st.integers(0, 9)) == 0:  # a driver bug (or attack): avail idx more than a ring ahead
        pending = draw(st.one_of(st.integers(size + 1, size + 2), st.integers(0, 0xFFFF)))
    case.avail_idx = (case.next_avail + pending) & 0xFFFF
    # the ring position the driver sees: avail entry k sits at slot (next_avail + k) % size
    rot = case.next_avail % size
    case.avail = case.avail[size - rot:] + case.avail[:size - rot] if rot else case.avail
    case.next_used = draw(st.one_of(st.sampled_from([0, 0xFFFF]), st.integers(0, 0xFFFF)))
    case.used_event = draw(st.integers(0, 0xFFFF))
    case.avail_flags = draw(st.sampled_from([0, 1, 0xFFFF]))
    case.plants = draw(st.lists(PLANTS[kind], max_size=3)) + chain_plants
    return case


def pending_of(case: RingCase) -> int:
    return (case.avail_idx - case.next_avail) & 0xFFFF


def avail_heads(ram: GuardedRam, case: RingCase, n: int) -> list[int]:
    ring = struct.unpack_from(f"<{case.size}H", ram.read(AVAIL_GPA + 4, 2 * case.size))
    return [ring[(case.next_avail + k) % case.size] for k in range(n)]


def used_entries(ram: GuardedRam, case: RingCase, n: int) -> tuple[int, list[tuple[int, int]]]:
    idx = struct.unpack("<H", ram.read(USED_GPA + 2, 2))[0]
    out = []
    for k in range(n):
        slot = (case.next_used + k) % case.size
        out.append(struct.unpack("<II", ram.read(USED_GPA + 4 + 8 * slot, 8)))
    return idx, out


def allowed_writes(ram: GuardedRam, case: RingCase, heads: list[int]) -> Intervals:
    allowed = Intervals()
    allowed.add(USED_GPA, 6 + 8 * case.size)
    for h in heads:
        for a, n in writable_ranges(reachable(ram, DESC_GPA, case.size, h)):
            allowed.add(a, n)
    return allowed


def capacity(ram: GuardedRam, case: RingCase, head: int) -> int:
    return sum(n for _, n in writable_ranges(reachable(ram, DESC_GPA, case.size, head)))


def check_returned(ram: GuardedRam, case: RingCase, q: Queue, popped: int, *, ordered: bool, what: str) -> None:
    """Every popped chain is on the used ring exactly once, with a plausible length."""
    heads = avail_heads(ram, case, popped)
    idx, entries = used_entries(ram, case, popped)
    assert q.next_used == (case.next_used + popped) & 0xFFFF, (
        f"{what}: popped {popped} chains but returned {(q.next_used - case.next_used) & 0xFFFF}")
    assert idx == q.next_used, f"{what}: used idx in memory {idx} != device's next_used {q.next_used}"
    ids = [i for i, _ in entries]
    if ordered:
        assert ids == heads, f"{what}: used ids {ids} != popped heads {heads}"
    else:
        assert collections.Counter(ids) == collections.Counter(heads), f"{what}: used ids {ids} != popped {heads}"
    for head, length in entries:
        assert length <= capacity(ram, case, head), (
            f"{what}: used len {length} for head {head} exceeds its device-writable capacity {capacity(ram, case, head)}")


# ---------------------------------------------------------------------------
# 1. the walker against the model
# ---------------------------------------------------------------------------
@fuzz_settings(300)
@given(ring_cases("generic"), st.lists(st.integers(0, 20), min_size=1, max_size=4))
def test_fuzz_walk_matches_model_and_raises_only_typed_errors(case, heads):
    ram, q = build(case)
    for head in heads:
        try:
            want = ref_walk(ram, DESC_GPA, case.size, head, case.indirect)
            want_err = None
        except RefChainError as e:
            want, want_err = None, e.reason
        try:
            got = q.walk(head)
            got_err = None
        except VirtqueueError as e:
            got, got_err = None, e.reason
        # Anything else (IndexError, struct.error, ValueError...) propagates and fails the test.
        assert (got, got_err) == (want, want_err), f"head {head}: walk gave {got or got_err}, model {want or want_err}"
        if got is None:
            continue
        dc = DescriptorChain(q, head)
        for d in dc.descriptors():
            where = ram.locate(d.addr, d.len)
            try:
                view = dc.memory(d)
            except ChainAddressError:
                assert where is None, f"{d} is inside RAM but memory() refused it"
                continue
            assert where is not None, f"{d} is outside RAM but memory() translated it"
            assert len(view) == d.len and bytes(view) == bytes(ram.backing[where:where + d.len])


# Finding 1 (fixed in fa23eb6): a chain through an indirect table whose second entry is itself
# INDIRECT (and flagged WRITE). walk() refuses it (NestedIndirect); the device then looks for a
# status byte to report IOERR, and Queue.last_descriptor() used to return that nested entry.
NESTED_INDIRECT = RingCase(size=1, indirect=True, descs=[(TABLE_GPA, 32, INDIRECT, 0)],
                           tables=[[(DATA_A, 16, NEXT, 1), (DATA_A + SLOT, 64, INDIRECT | WRITE, 0)]],
                           avail=[0], avail_idx=1,
                           plants=[(DATA_A, blk.OUTHDR.pack(blk.VIRTIO_BLK_T_IN, 0, 0))])


def check_last_descriptor(case: RingCase, heads: list[int]) -> None:
    ram, q = build(case)
    for head in heads:
        last = q.last_descriptor(head)  # documented never to raise
        if last is not None:
            assert last in reachable(ram, DESC_GPA, case.size, head), (
                f"last_descriptor({head}) = {last} is not a buffer descriptor of that chain")


@fuzz_settings(200)
@given(ring_cases("generic"), st.lists(st.integers(0, 20), min_size=1, max_size=4))
def test_fuzz_last_descriptor_never_raises_and_stays_in_the_chain(case, heads):
    check_last_descriptor(case, heads)


@fuzz_settings(20)
@example(case=NESTED_INDIRECT, heads=[0])
@given(ring_cases("generic"), st.lists(st.integers(0, 20), min_size=1, max_size=4))
def test_regression_last_descriptor_skips_nested_indirect_entry(case, heads):
    """Finding 1: last_descriptor() returned the nested INDIRECT entry of an indirect table as the
    chain's final descriptor (its loop recorded the entry before testing the INDIRECT flag). That
    entry refers to an (illegal) table, not a buffer; virtio 1.2 2.7.5.3.2: the device MUST ignore
    WRITE on a descriptor that refers to an indirect table."""
    check_last_descriptor(case, heads)


# ---------------------------------------------------------------------------
# 2. avail side: pending / pop_heads / pop_chains follow the avail index exactly
# ---------------------------------------------------------------------------
@fuzz_settings(300)
@given(st.sampled_from(SIZES + [256]), st.integers(0, 0xFFFF),
       st.one_of(st.tuples(st.just("near size"), st.integers(-3, 3)), st.tuples(st.just("any"), st.integers(0, 0xFFFF))),
       st.one_of(st.none(), st.integers(0, 40)), st.booleans(), st.integers(0, 2**32 - 1))
def test_fuzz_pop_follows_avail_index(size, next_avail, delta, limit, chains, seed):
    ahead = delta[1] if delta[0] == "any" else max(0, size + delta[1])
    avail_idx = (next_avail + ahead) & 0xFFFF
    ram = GuardedRam([(0, 0x8000)])
    m = ram.mem
    rnd = random.Random(seed)
    ring = [rnd.randrange(0x10000) for _ in range(size)]
    avail_gpa, used_gpa = 0x1000, 0x2000
    ram.write(avail_gpa, struct.pack(f"<HH{size}HH", 0, avail_idx, *ring, 0))
    q = Queue(m, size, m.translate(0, 16 * size), m.translate(avail_gpa, 6 + 2 * size),
              m.translate(used_gpa, 6 + 8 * size), next_avail=next_avail)
    before = ram.snapshot()
    ahead = (avail_idx - next_avail) & 0xFFFF
    if ahead > size:
        for call in (q.pending, lambda: q.pop_heads(limit or 0), lambda: q.pop_chains(limit)):
            with pytest.raises(AvailIndexError):
                call()
        assert q.next_avail == next_avail
    else:
        assert q.pending() == ahead
        if chains:  # pop_chains: limit None = everything; pop_heads: limit 0 = everything
            n = ahead if limit is None else min(ahead, limit)
            got = [c.head for c in q.pop_chains(limit)]
        else:
            n = ahead if not limit else min(ahead, limit)
            got = q.pop_heads(limit or 0)
        assert got == [ring[(next_avail + k) % size] for k in range(n)]
        assert q.next_avail == (next_avail + n) & 0xFFFF
        assert q.pending() == ahead - n
    assert ram.snapshot() == before, "popping wrote to guest memory"


# ---------------------------------------------------------------------------
# 3. used side: add_used / add_used_many / notifications against a model
# ---------------------------------------------------------------------------
used_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("many"), st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)), max_size=5)),
    st.tuples(st.just("notify"), st.integers(0, 0xFFFF), st.sampled_from([0, 1, 0xFFFF])),
    st.tuples(st.just("enable"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("disable")),
), max_size=30)


@fuzz_settings(200)
@given(st.sampled_from(SIZES), st.booleans(), st.integers(0, 0xFFFF), used_ops)
def test_fuzz_used_ring_and_notifications_follow_the_spec(size, event_idx, next_used, ops):
    ram = GuardedRam([(0, REGION)], random.Random(size).randbytes(REGION))
    m = ram.mem
    q = Queue(m, size, m.translate(DESC_GPA, 16 * size), m.translate(AVAIL_GPA, 6 + 2 * size),
              m.translate(USED_GPA, 6 + 8 * size), event_idx=event_idx, next_used=next_used)
    model_used = next_used
    signalled: Optional[int] = None
    allowed = Intervals()
    allowed.add(USED_GPA, 6 + 8 * size)
    before = ram.snapshot()
    for op in ops:
        if op[0] == "add":
            head, length = op[1] & 0xFFFF, op[2]
            q.add_used(head, length)
            entries = [(head, length)]
        elif op[0] == "many":
            q.add_used_many(op[1])
            entries = op[1]
        else:
            entries = []
        if entries:
            # The last `size` entries are visible at their slots; the used idx is published.
            for k, (head, length) in enumerate(entries[-size:]):
                pos = (model_used + len(entries) - len(entries[-size:]) + k) % size
                assert struct.unpack("<II", ram.read(USED_GPA + 4 + 8 * pos, 8)) == (head, length)
            model_used = (model_used + len(entries)) & 0xFFFF
            assert struct.unpack("<H", ram.read(USED_GPA + 2, 2))[0] == model_used == q.next_used
        if op[0] == "notify":
            used_event, flags = op[1], op[2]
            ram.write(AVAIL_GPA + 4 + 2 * size, struct.pack("<H", used_event))
            ram.write(AVAIL_GPA, struct.pack("<H", flags))
            got = q.needs_notification()
            if event_idx:
                want = True if signalled is None else vring_need_event(used_event, model_used, signalled)
                signalled = model_used
            else:
                want = not flags & 1
            assert got is want
            before = _accept_driver_writes(ram, before, AVAIL_GPA, 6 + 2 * size)
        elif op[0] == "enable":
            ram.write(AVAIL_GPA + 2, struct.pack("<H", op[1]))
            assert q.enable_notification() is (op[1] != q.next_avail)
            if event_idx:
                assert struct.unpack("<H", ram.read(USED_GPA + 4 + 8 * size, 2))[0] == q.next_avail
            else:
                assert struct.unpack("<H", ram.read(USED_GPA, 2))[0] == 0
            before = _accept_driver_writes(ram, before, AVAIL_GPA, 6 + 2 * size)
        elif op[0] == "disable":
            old_flags = ram.read(USED_GPA, 2)
            q.disable_notification()
            want = old_flags if event_idx else struct.pack("<H", 1)
            assert ram.read(USED_GPA, 2) == want
    assert_writes_confined(ram, before, allowed, "used-ring operations")


def _accept_driver_writes(ram: GuardedRam, before: bytes, gpa: int, n: int) -> bytes:
    """The test itself (as the driver) wrote [gpa, +n): fold that into the baseline."""
    off = ram.locate(gpa, n)
    b = bytearray(before)
    b[off:off + n] = ram.backing[off:off + n]
    return bytes(b)


# ---------------------------------------------------------------------------
# 4. devices on arbitrary rings
# ---------------------------------------------------------------------------
DISK = 1 << 20
_BLK: dict = {}


def blk_device(readonly: bool, small_limits: bool) -> BlkDevice:
    key = (readonly, small_limits)
    if key not in _BLK:
        storage = MemoryStorage(DISK)
        storage.write(0, [memoryview(random.Random(3).randbytes(DISK))])
        kw = dict(seg_max=2, size_max=4096, max_discard_seg=1, max_discard_sectors=64) if small_limits else {}
        _BLK[key] = BlkDevice(storage, label=f"fuzz-blk{next(_labels)}", readonly=readonly, **kw)
    return _BLK[key]


def drain(process, q: Queue) -> tuple[int, Optional[VirtqueueError]]:
    """Run process() until it stops making progress; returns (chains popped, typed error if the queue broke)."""
    start = q.next_avail
    err = None
    for _ in range(64):
        before = q.next_avail
        try:
            process()
        except VirtqueueError as e:  # the server's "queue broken" path; anything else fails the test
            err = e
            break
        if q.next_avail == before:
            break
    return (q.next_avail - start) & 0xFFFF, err


def check_broken_queue(case: RingCase, popped: int, err: Optional[VirtqueueError], what: str) -> None:
    if err is None:
        assert pending_of(case) <= case.size, f"{what}: avail idx {pending_of(case)} ahead went unnoticed"
        return
    assert isinstance(err, AvailIndexError), f"{what}: one bad chain broke the whole queue: {type(err).__name__}: {err}"
    assert pending_of(case) > case.size, f"{what}: AvailIndexError although avail idx is only {pending_of(case)} ahead"
    assert popped == 0


def run_blk(case: RingCase, readonly: bool, small_limits: bool) -> None:
    dev = blk_device(readonly, small_limits)
    ram, q = build(case)
    heads_all = avail_heads(ram, case, min(pending_of(case), case.size))
    stats = QueueStats("standalone", dev.label, "0")
    allowed = allowed_writes(ram, case, heads_all)
    before = ram.snapshot()
    popped, err = drain(lambda: dev.process_queue(0, q, stats), q)
    check_broken_queue(case, popped, err, "blk")
    assert_writes_confined(ram, before, allowed, "blk")
    check_returned(ram, case, q, popped, ordered=True, what="blk")
    check_inflight(q, "blk")
    # Unwalkable chains are returned with nothing (or at most an error status byte) written.
    _, entries = used_entries(ram, case, popped)
    for head, length in entries:
        try:
            ref_walk(ram, DESC_GPA, case.size, head, case.indirect)
            event("blk: walkable chain, used len > 1" if length > 1 else "blk: walkable chain, used len <= 1")
        except RefChainError as e:
            event(f"blk: malformed chain ({e.reason})")
            assert length <= 1, f"blk: malformed chain {head} returned with used len {length}"


@fuzz_settings(250)
@given(ring_cases("blk"), st.booleans(), st.booleans())
def test_fuzz_blk_process_queue(case, readonly, small_limits):
    run_blk(case, readonly, small_limits)


@fuzz_settings(20)
@example(case=NESTED_INDIRECT, readonly=False, small_limits=False)
@given(ring_cases("blk"), st.booleans(), st.booleans())
def test_regression_blk_writes_no_status_through_nested_indirect_entry(case, readonly, small_limits):
    """Finding 1, its consequence: BlkDevice._fail_unwalkable wrote VIRTIO_BLK_S_IOERR into the last
    byte of the area the nested INDIRECT|WRITE entry refers to (and returned used len 1): guest
    memory nobody gave the device to write."""
    run_blk(case, readonly, small_limits)


# Finding 9 (fixed): inflight tracking on (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), and the driver puts a
# head >= queue size in the avail ring.
INFLIGHT_BOGUS_HEAD = RingCase(size=2, indirect=False, inflight=True, avail=[0xFFFF, 0], avail_idx=1)


@fuzz_settings(20)
@example(case=INFLIGHT_BOGUS_HEAD, readonly=False, small_limits=False)
@given(ring_cases("blk"), st.booleans(), st.booleans())
def test_regression_inflight_bogus_head(case, readonly, small_limits):
    run_blk(case, readonly, small_limits)


class CapturePeer:
    accepts_offload = False

    def __init__(self, borrows: bool, partial: bool) -> None:
        self.borrows_frames = borrows
        self.accepts_partial_csum = partial
        self.frames: list[bytes] = []

    def send(self, frames) -> None:
        for f in frames:
            if isinstance(f, PartialCsumFrame):
                f = f.completed()
            self.frames.append(bytes(f))


_NET: dict = {}
NET_FEATURES = [ns.VIRTIO_NET_F_MRG_RXBUF, ns.VIRTIO_NET_F_CSUM, ns.VIRTIO_NET_F_HOST_TSO4, ns.VIRTIO_NET_F_HOST_TSO6]


def net_device(features: int, peer: CapturePeer) -> NetDevice:
    if "dev" not in _NET:
        _NET["dev"] = NetDevice(mac=GUEST_MAC, label=f"fuzz-net{next(_labels)}")
    dev = _NET["dev"]
    dev.reset()
    dev.set_features(bit(VIRTIO_F_VERSION_1) | bit(ns.VIRTIO_NET_F_CTRL_VQ) | features)
    dev.peer = peer
    dev.signal = lambda index: None
    return dev


net_features = st.lists(st.sampled_from(NET_FEATURES), unique=True).map(lambda fs: sum(bit(f) for f in fs))


def run_net_tx(case: RingCase, features: int, borrows: bool, partial: bool) -> None:
    peer = CapturePeer(borrows, partial)
    dev = net_device(features, peer)
    ram, q = build(case)
    pass  # (the inflight bogus-head bug is fixed: no input is avoided)
    stats = QueueStats("standalone", dev.label, "1")
    before = ram.snapshot()
    allowed = Intervals()
    allowed.add(USED_GPA, 6 + 8 * case.size)  # transmit never writes a buffer
    popped, err = drain(lambda: dev.process_queue(1, q, stats), q)
    check_broken_queue(case, popped, err, "net tx")
    assert_writes_confined(ram, before, allowed, "net tx")
    check_returned(ram, case, q, popped, ordered=True, what="net tx")
    check_inflight(q, "net tx")
    for f in peer.frames:
        # "frames over the MTU ... are drops" (device.py); 14 + 4: Ethernet header and one VLAN tag
        assert 14 <= len(f) <= dev.mtu + 18, f"net tx handed the peer a {len(f)}-byte frame (MTU {dev.mtu})"


@fuzz_settings(200)
@given(ring_cases("net_tx"), net_features, st.booleans(), st.booleans())
def test_fuzz_net_tx_process_queue(case, features, borrows, partial):
    run_net_tx(case, features, borrows, partial)


# Finding 2 (fixed in fa23eb6): a TSO super-frame (3 KiB of TCP payload, every header consistent)
# whose gso_size is 1560: each segment is 14 + 20 + 20 + 1560 = 1614 bytes, over the 1500-byte MTU.
_TSO_BIG_MSS = _hdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=ns.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                    gso_size=1560, csum_start=34, csum_offset=16) + NET_TX_PAYLOADS[2][ns.VIRTIO_NET_HDR_SIZE:]
TSO_OVER_MTU = RingCase(size=1, indirect=False, descs=[(DATA_A, len(_TSO_BIG_MSS), 0, 0)], avail=[0], avail_idx=1,
                        plants=[(DATA_A, _TSO_BIG_MSS)])


@fuzz_settings(20)
@example(case=TSO_OVER_MTU, features=bit(ns.VIRTIO_NET_F_CSUM) | bit(ns.VIRTIO_NET_F_HOST_TSO4), borrows=False,
         partial=False)
@example(case=TSO_OVER_MTU, features=0, borrows=False, partial=False)
@given(ring_cases("net_tx"), net_features, st.booleans(), st.booleans())
def test_regression_net_tx_gso_segments_within_mtu(case, features, borrows, partial):
    """Finding 2: NetDevice._tx dropped plain and NEEDS_CSUM frames over mtu + 18, but handed the
    segments of a GSO super-frame to the peer unchecked: segment() cuts at the guest's gso_size, so
    gso_size > MTU - headers put frames larger than the advertised MTU on the wire (tap, stream,
    switch, pcap). The GSO path was also taken without HOST_TSO4/TSO6/UFO/USO negotiated."""
    run_net_tx(case, features, borrows, partial)


BCAST_FRAMES = [
    pk.pad_frame(pk.arp_frame(1, GW_MAC, IP_W, bytes(6), IP_G)).replace(GW_MAC, GW_MAC, 1),
    pk.BROADCAST_MAC + GW_MAC + b"\x08\x00" + bytes(1000),
    pk.BROADCAST_MAC + GW_MAC + b"\x08\x00" + bytes(1500),
    GUEST_MAC + GW_MAC + b"\x08\x06" + bytes(46),
]
rx_frames = st.lists(st.one_of(st.sampled_from(BCAST_FRAMES),
                               st.binary(min_size=0, max_size=1600).map(lambda b: pk.BROADCAST_MAC + b)), max_size=6)


def run_net_rx(case: RingCase, features: int, backlog: list, frames: list) -> None:
    peer = CapturePeer(False, False)
    dev = net_device(features, peer)
    ram, q = build(case)
    pass  # (the inflight bogus-head bug is fixed: no input is avoided)
    stats = QueueStats("standalone", dev.label, "0")
    heads_all = avail_heads(ram, case, min(pending_of(case), case.size))
    allowed = allowed_writes(ram, case, heads_all)
    before = ram.snapshot()
    start = q.next_avail
    # Frames that arrived before any receive buffer wait in the backlog ...
    assert dev.deliver(list(backlog)) == 0
    dev.queue_started(0, q)
    # ... a refill kick drains it, then the peer delivers more. None of this may raise.
    dev.process_queue(0, q, stats)
    dev.deliver(list(frames))
    popped = (q.next_avail - start) & 0xFFFF
    if pending_of(case) > case.size:
        assert popped == 0
    assert_writes_confined(ram, before, allowed, "net rx")
    check_returned(ram, case, q, popped, ordered=False, what="net rx")
    check_inflight(q, "net rx")


@fuzz_settings(200)
@given(ring_cases("net_rx"), net_features, rx_frames, rx_frames)
def test_fuzz_net_rx_process_queue_and_deliver(case, features, backlog, frames):
    run_net_rx(case, features, backlog, frames)


# Finding 3 (fixed in fa23eb6): one receive chain, a 5-byte writable descriptor then a 2 KiB one
# (room for the whole frame), with VIRTIO_NET_F_MRG_RXBUF.
MRG_SPLIT_HEADER = RingCase(size=2, multi=False, indirect=False,
                            descs=[(DATA_A, 5, NEXT | WRITE, 1), (DATA_A + SLOT, 2048, WRITE, 0)],
                            avail=[0, 0], next_avail=0, avail_idx=1, next_used=0)


@fuzz_settings(20)
@example(case=MRG_SPLIT_HEADER, features=bit(ns.VIRTIO_NET_F_MRG_RXBUF), backlog=[BCAST_FRAMES[0]], frames=[])
@example(case=replace(MRG_SPLIT_HEADER, descs=[(DATA_A, 0, NEXT | WRITE, 1), (DATA_A + SLOT, 2048, WRITE, 0)]),
         features=bit(ns.VIRTIO_NET_F_MRG_RXBUF), backlog=[], frames=[BCAST_FRAMES[1]])
@given(ring_cases("net_rx"), net_features, rx_frames, rx_frames)
def test_regression_net_rx_mergeable_header_split_across_descriptors(case, features, backlog, frames):
    """Finding 3: NetDevice._rx_mergeable wrote num_buffers with first_view[10:12] = ..., assuming
    the first writable descriptor holds the whole 12-byte virtio_net_hdr. A shorter one (legal
    framing, even 0 bytes) raised ValueError out of deliver()/process_queue() after the chain was
    popped: never returned to the used ring, and the frame stuck at the head of the backlog."""
    run_net_rx(case, features, backlog, frames)


@fuzz_settings(150)
@given(ring_cases("ctrl"))
def test_fuzz_net_ctrl_process_queue(case):
    dev = net_device(0, CapturePeer(False, False))
    ram, q = build(case)
    pass  # (the inflight bogus-head bug is fixed: no input is avoided)
    stats = QueueStats("standalone", dev.label, "2")
    heads_all = avail_heads(ram, case, min(pending_of(case), case.size))
    allowed = allowed_writes(ram, case, heads_all)
    before = ram.snapshot()
    popped, err = drain(lambda: dev.process_queue(2, q, stats), q)
    check_broken_queue(case, popped, err, "net ctrl")
    assert_writes_confined(ram, before, allowed, "net ctrl")
    check_returned(ram, case, q, popped, ordered=True, what="net ctrl")
    check_inflight(q, "net ctrl")
    _, entries = used_entries(ram, case, popped)
    assert all(length in (0, 1) for _, length in entries)
