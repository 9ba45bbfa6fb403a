"""Device-side split virtqueue (sans-IO): chains, guards, used ring, notifications."""
from __future__ import annotations

import random
import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from simvirt.memory import PageAllocator
from simvirt.virtio.errors import (
    AvailIndexError,
    ChainAddressError,
    DescriptorChainTooLong,
    InvalidDescriptorIndex,
    InvalidIndirectTable,
    NestedIndirect,
    VirtqueueError,
)
from simvirt.virtio.queue import MAX_INDIRECT, Descriptor, DescriptorChain, Queue
from simvirt.virtio.spec import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

from simvirt_testlib import R, W, RawRing, bytearray_memory, ring_memory, write_indirect_table

NEXT, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT
RAM = 1 << 20


def raw(size=8, *, indirect=False, event_idx=False, ram=RAM):
    mem = bytearray_memory(ram)
    alloc = PageAllocator(0, ram)
    ring = RawRing(mem, alloc, size)
    return mem, alloc, ring, ring.device_queue(indirect=indirect, event_idx=event_idx)


# ---------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32768 * 2, -8])
def test_invalid_size(size):
    mem = bytearray_memory(RAM)
    v = mem.translate(0, 0x80000)
    with pytest.raises(ValueError):
        Queue(mem, size, v, v, v)


def test_ring_areas_too_small():
    mem = bytearray_memory(RAM)
    big = mem.translate(0, 4096)
    with pytest.raises(ValueError):
        Queue(mem, 8, mem.translate(0, 16 * 8 - 1), big, big)
    with pytest.raises(ValueError):
        Queue(mem, 8, big, mem.translate(0, 6 + 2 * 8 - 1), big)
    with pytest.raises(ValueError):
        Queue(mem, 8, big, big, mem.translate(0, 6 + 8 * 8 - 1))
    Queue(mem, 8, mem.translate(0, 128), mem.translate(0x1000, 22), mem.translate(0x2000, 70))


# ---------------------------------------------------------------------------
# well-formed chains, driver and device over the same memory
# ---------------------------------------------------------------------------
def test_direct_chains_round_trip():
    mem, alloc, dq, q = ring_memory(8)
    buf = alloc.alloc(4096)
    dq.add([(buf, 16)], [(buf + 512, 512), (buf + 1024, 1)], token="a")
    dq.add([(buf + 16, 100)], [], token="b")
    dq.add([], [(buf + 2048, 7)], token="c")
    assert q.pending() == 0  # nothing published yet
    dq.publish()
    assert q.pending() == 3 and q.avail_idx() == 3
    chains = q.pop_chains()
    assert q.pending() == 0 and q.next_avail == 3
    assert [c.descriptors() for c in chains] == [
        [Descriptor(buf, 16, False), Descriptor(buf + 512, 512, True), Descriptor(buf + 1024, 1, True)],
        [Descriptor(buf + 16, 100, False)],
        [Descriptor(buf + 2048, 7, True)],
    ]
    # DescriptorChain.memory is a live view of guest RAM.
    d = chains[0].descriptors()[1]
    chains[0].memory(d)[:4] = b"DATA"
    assert mem.read(buf + 512, 4) == b"DATA"
    # Completed out of order; the driver sees them in used-ring order with their lengths.
    q.add_used(chains[2].head, 7)
    q.add_used_many([(chains[0].head, 513), (chains[1].head, 0)])
    assert q.next_used == 3
    assert dq.pop_used() == [("c", 7), ("a", 513), ("b", 0)]
    assert dq.num_free == 8 and dq.in_flight == 0


def test_indirect_chain_walk():
    mem, alloc, dq, q = ring_memory(8, indirect=True, indirect_max=16)
    buf = alloc.alloc(4096)
    outs = [(buf + 16 * i, 16) for i in range(3)]
    ins = [(buf + 1024 + 100 * i, 100) for i in range(5)]
    head = dq.add(outs, ins, token=1)
    dq.publish()
    # The head descriptor is a single INDIRECT one.
    w = struct.unpack_from("<QIHH", mem.read(dq.desc_gpa + 16 * head, 16))
    assert w[2] == INDIRECT and w[1] == 16 * 8
    (chain,) = q.pop_chains()
    assert [(d.addr, d.len, d.write) for d in chain] == [(a, n, False) for a, n in outs] + [(a, n, True) for a, n in ins]
    q.add_used(chain.head, 500)
    assert dq.pop_used() == [(1, 500)]


def test_pop_chains_limit_and_pop_heads():
    mem, alloc, dq, q = ring_memory(8)
    buf = alloc.alloc(4096)
    heads = [dq.add([(buf, 1)], [], token=i) for i in range(5)]
    dq.publish()
    assert [c.head for c in q.pop_chains(limit=2)] == heads[:2]
    assert q.pending() == 3
    assert q.pop_heads() == heads[2:]
    assert q.pop_heads() == [] and q.pop_chains() == []


@pytest.mark.parametrize("entries", [9, 64, MAX_INDIRECT])
def test_indirect_table_longer_than_ring_is_allowed(entries):
    # Linux's virtio-blk sends seg_max + 2 entries through a smaller ring.
    mem, alloc, ring, q = raw(8, indirect=True)
    segs = [(0x1000, 512, R)] * (entries - 1) + [(0x2000, 1, W)]
    ring.set_desc(0, 0x8000, write_indirect_table(mem, 0x8000, segs), INDIRECT)
    ring.push(0)
    (chain,) = q.pop_chains()
    assert [(d.addr, d.len, d.write) for d in chain] == [(a, n, bool(f)) for a, n, f in segs]


def test_chain_of_exactly_queue_size_is_allowed():
    mem, alloc, ring, q = raw(8)
    ring.chain([(0x1000 + i, 1, R) for i in range(8)])
    ring.push(0)
    (head,) = q.pop_heads()
    assert len(q.walk(head)) == 8


# ---------------------------------------------------------------------------
# guards: each malformed chain raises its specific VirtqueueError subclass
# ---------------------------------------------------------------------------
def _loop(ring, mem):
    ring.set_desc(0, 0x1000, 16, NEXT, 1)
    ring.set_desc(1, 0x2000, 16, NEXT, 2)
    ring.set_desc(2, 0x3000, 16, NEXT, 1)  # back to 1
    return 0


def _self_loop(ring, mem):
    ring.set_desc(3, 0x1000, 16, NEXT, 3)
    return 3


def _too_long(ring, mem):
    # A chain through all 8 descriptors whose last one still says NEXT (to 0).
    for i in range(8):
        ring.set_desc(i, 0x1000, 1, NEXT, (i + 1) % 8)
    return 0


def _next_out_of_range(ring, mem):
    ring.set_desc(0, 0x1000, 16, NEXT, 8)
    return 0


def _next_far_out_of_range(ring, mem):
    ring.set_desc(0, 0x1000, 16, NEXT, 0xFFFF)
    return 0


def _head_out_of_range(ring, mem):
    return 9


def _indirect_without_feature(ring, mem):
    n = write_indirect_table(mem, 0x8000, [(0x1000, 16, R)])
    ring.set_desc(0, 0x8000, n, INDIRECT)
    return 0


def _indirect_and_next(ring, mem):
    n = write_indirect_table(mem, 0x8000, [(0x1000, 16, R)])
    ring.set_desc(0, 0x8000, n, INDIRECT | NEXT, 1)
    ring.set_desc(1, 0x1000, 1, W)
    return 0


def _nested_indirect(ring, mem):
    write_indirect_table(mem, 0x9000, [(0x1000, 16, R)])
    n = write_indirect_table(mem, 0x8000, [(0x1000, 16, R), (0x9000, 16, INDIRECT)])
    ring.set_desc(0, 0x8000, n, INDIRECT)
    return 0


def _indirect_len_not_multiple(ring, mem):
    write_indirect_table(mem, 0x8000, [(0x1000, 16, R), (0x1000, 16, R)])
    ring.set_desc(0, 0x8000, 24, INDIRECT)
    return 0


def _indirect_len_zero(ring, mem):
    ring.set_desc(0, 0x8000, 0, INDIRECT)
    return 0


def _indirect_outside_ram(ring, mem):
    ring.set_desc(0, RAM - 16, 32, INDIRECT)  # second entry past the end of RAM
    return 0


def _indirect_far_outside_ram(ring, mem):
    ring.set_desc(0, 1 << 40, 16, INDIRECT)
    return 0


def _indirect_loop(ring, mem):
    # Two entries pointing at each other.
    mem.write(0x8000, struct.pack("<QIHH", 0x1000, 16, NEXT, 1) + struct.pack("<QIHH", 0x1000, 16, NEXT, 0))
    ring.set_desc(0, 0x8000, 32, INDIRECT)
    return 0


def _indirect_next_out_of_table(ring, mem):
    mem.write(0x8000, struct.pack("<QIHH", 0x1000, 16, NEXT, 2) + bytes(16))
    ring.set_desc(0, 0x8000, 32, INDIRECT)
    return 0


def _indirect_larger_than_max(ring, mem):
    write_indirect_table(mem, 0x8000, [(0x1000, 1, R)] * (MAX_INDIRECT + 1))
    ring.set_desc(0, 0x8000, 16 * (MAX_INDIRECT + 1), INDIRECT)
    return 0


def _indirect_huge_len(ring, mem):
    ring.set_desc(0, 0x8000, 0xFFFFFFF0, INDIRECT)
    return 0


def _direct_then_indirect_too_long(ring, mem):
    # 5 direct descriptors, then an indirect table over the limit.
    for i in range(5):
        ring.set_desc(i, 0x1000, 1, NEXT, i + 1)
    write_indirect_table(mem, 0x8000, [(0x1000, 1, R)] * (MAX_INDIRECT + 1))
    ring.set_desc(5, 0x8000, 16 * (MAX_INDIRECT + 1), INDIRECT)
    return 0


def _indirect_loop_in_long_table(ring, mem):
    # A 64-entry table (longer than the ring, which is allowed) whose chain loops back.
    write_indirect_table(mem, 0x8000, [(0x1000, 1, R)] * 64)
    mem.write(0x8000 + 16 * 63, struct.pack("<QIHH", 0x1000, 1, NEXT, 10))
    ring.set_desc(0, 0x8000, 16 * 64, INDIRECT)
    return 0


GUARDS = [
    (_loop, False, DescriptorChainTooLong),
    (_self_loop, False, DescriptorChainTooLong),
    (_too_long, False, DescriptorChainTooLong),
    (_next_out_of_range, False, InvalidDescriptorIndex),
    (_next_far_out_of_range, False, InvalidDescriptorIndex),
    (_head_out_of_range, False, InvalidDescriptorIndex),
    (_indirect_without_feature, False, InvalidIndirectTable),
    (_indirect_and_next, True, InvalidIndirectTable),
    (_nested_indirect, True, NestedIndirect),
    (_indirect_len_not_multiple, True, InvalidIndirectTable),
    (_indirect_len_zero, True, InvalidIndirectTable),
    (_indirect_outside_ram, True, ChainAddressError),
    (_indirect_far_outside_ram, True, ChainAddressError),
    (_indirect_loop, True, DescriptorChainTooLong),
    (_indirect_next_out_of_table, True, InvalidDescriptorIndex),
    (_indirect_larger_than_max, True, DescriptorChainTooLong),
    (_indirect_huge_len, True, DescriptorChainTooLong),
    (_direct_then_indirect_too_long, True, DescriptorChainTooLong),
    (_indirect_loop_in_long_table, True, DescriptorChainTooLong),
]


@pytest.mark.parametrize("build,indirect,exc", GUARDS, ids=[g[0].__name__.lstrip("_") for g in GUARDS])
def test_malformed_chain_raises_typed_error(build, indirect, exc):
    mem, alloc, ring, q = raw(8, indirect=indirect)
    head = build(ring, mem)
    ring.push(head)
    (got,) = q.pop_chains()
    assert got.head == head
    with pytest.raises(VirtqueueError) as ei:
        got.descriptors()
    assert type(ei.value) is exc, f"{type(ei.value).__name__}: {ei.value}"
    assert ei.value.reason == exc.reason
    # The queue itself is still usable: return the bad chain, serve a good one.
    q.add_used(head, 0)
    ring.chain([(0x1000, 4, R)], first=7)
    ring.push(7)
    (good,) = q.pop_chains()
    assert good.descriptors() == [Descriptor(0x1000, 4, False)]
    assert ring.pop_used() == [(head, 0)]


def test_error_reasons_are_distinct():
    reasons = [c.reason for c in (InvalidDescriptorIndex, DescriptorChainTooLong, InvalidIndirectTable,
                                  NestedIndirect, AvailIndexError, ChainAddressError)]
    assert len(set(reasons)) == len(reasons)


def test_descriptor_memory_outside_ram():
    mem, alloc, ring, q = raw(8)
    ring.chain([(RAM - 8, 16, W)])
    ring.push(0)
    (chain,) = q.pop_chains()
    (d,) = chain.descriptors()  # walking is fine: the address is only checked on use
    with pytest.raises(ChainAddressError):
        chain.memory(d)


@pytest.mark.parametrize("ahead", [9, 100, 0x8000, 0xFFFF])
def test_avail_idx_too_far_ahead(ahead):
    mem, alloc, ring, q = raw(8)
    ring.set_avail_idx(ahead)
    with pytest.raises(AvailIndexError):
        q.pending()
    with pytest.raises(AvailIndexError):
        q.pop_heads()
    with pytest.raises(AvailIndexError):
        q.pop_chains()
    assert q.next_avail == 0  # nothing consumed


def test_avail_idx_exactly_queue_size_ahead_is_fine():
    mem, alloc, ring, q = raw(8)
    for i in range(8):
        ring.chain([(0x1000, 1, R)], first=i)
        ring.push(i)
    assert q.pop_heads() == list(range(8))


def test_avail_idx_ahead_across_wrap():
    mem, alloc, ring, q = raw(8)
    q.next_avail = 0xFFFE
    ring.set_avail_idx(0x0003)  # 5 ahead, modulo 2**16
    assert q.pending() == 5
    ring.set_avail_idx(0x0007)  # 9 ahead
    with pytest.raises(AvailIndexError):
        q.pending()


# ---------------------------------------------------------------------------
# notifications
# ---------------------------------------------------------------------------
NEED_EVENT_TABLE = [
    # event, new, old, expected
    (0, 1, 0, True),            # first entry after re-arm
    (0, 2, 1, False),           # device has not re-armed since
    (1, 2, 0, True),            # batch [0, 2) crosses 1
    (2, 2, 0, False),           # event == new: not yet crossed
    (5, 5, 5, False),           # nothing new
    (9, 10, 0, True),
    (10, 10, 0, False),
    (0xFFFF, 0x0000, 0xFFFE, True),   # crossing the 16-bit wrap
    (0xFFFF, 0xFFFF, 0xFFFE, False),
    (0x0000, 0x0001, 0xFFFF, True),
    (0xFFF0, 0x0010, 0xFFE0, True),
    (0x0011, 0x0010, 0xFFE0, False),  # event just beyond new, across the wrap
    (0xFFDF, 0x0010, 0xFFE0, False),  # event just before old
    (0x8000, 0x0000, 0xFFFF, False),
]


@pytest.mark.parametrize("event,new,old,expected", NEED_EVENT_TABLE)
def test_vring_need_event_table(event, new, old, expected):
    assert vring_need_event(event, new, old) is expected


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_is_event_in_half_open_batch(event, new, old):
    # Notify iff the event index lies in [old, new), counting modulo 2**16.
    assert vring_need_event(event, new, old) == (((event - old) & 0xFFFF) < ((new - old) & 0xFFFF))


def _used_flags(mem, dq):
    return struct.unpack("<H", mem.read(dq.used_gpa, 2))[0]


def _avail_flags(mem, dq):
    return struct.unpack("<H", mem.read(dq.avail_gpa, 2))[0]


def test_notification_flags_without_event_idx():
    mem, alloc, dq, q = ring_memory(8)
    buf = alloc.alloc(4096)
    # Device side: NO_NOTIFY while draining, cleared on re-enable.
    q.disable_notification()
    assert _used_flags(mem, dq) == VIRTQ_USED_F_NO_NOTIFY
    dq.add([(buf, 1)], [], token=1)
    assert dq.publish() is False  # the device said it needs no kick
    assert q.enable_notification() is True  # a chain arrived meanwhile
    assert _used_flags(mem, dq) == 0
    dq.add([(buf, 1)], [], token=2)
    assert dq.publish() is True
    assert dq.publish() is False  # nothing new: never kick for an empty publish
    for c in q.pop_chains():
        q.add_used(c.head, 0)
    assert q.enable_notification() is False
    # Driver side: NO_INTERRUPT suppresses the device's interrupt.
    dq.disable_interrupts()
    assert q.needs_notification() is False
    assert dq.enable_interrupts() is True  # used entries are already waiting
    assert q.needs_notification() is True
    assert [t for t, _ in dq.pop_used()] == [1, 2]
    assert dq.enable_interrupts() is False


def test_event_idx_device_disable_is_noop_and_flags_stay_clear():
    mem, alloc, dq, q = ring_memory(8, event_idx=True)
    dq.disable_interrupts()
    q.disable_notification()
    assert _used_flags(mem, dq) == 0 and _avail_flags(mem, dq) == 0


def test_event_idx_driver_disable_keeps_used_event_behind():
    """Disabled with EVENT_IDX: used_event one behind, so the device's used entries never cross it."""
    mem, alloc, dq, q = ring_memory(8, event_idx=True)
    for t in range(3):
        dq.add([(0x1000, 1)], [], token=t)
    dq.publish()
    chains = q.pop_chains()
    q.add_used(chains[0].head, 0)
    assert q.needs_notification() is True  # the first one always fires
    dq.pop_used()
    dq.disable_interrupts()
    assert q.used_event() == 0  # last_used 1, minus one
    for c in chains[1:]:
        q.add_used(c.head, 0)
        assert q.needs_notification() is False
    assert dq.enable_interrupts() is True  # two waiting: poll them
    assert [t for t, _ in dq.pop_used()] == [1, 2]
    assert dq.enable_interrupts() is False
    dq.add([(0x1000, 1)], [], token=3)
    dq.publish()
    q.add_used(q.pop_chains()[0].head, 0)
    assert q.needs_notification() is True


def test_event_idx_first_notification_always_fires():
    mem, alloc, dq, q = ring_memory(8, event_idx=True)
    buf = alloc.alloc(4096)
    dq.add([(buf, 1)], [], token=1)
    dq.publish()
    (c,) = q.pop_chains()
    q.add_used(c.head, 0)
    # used_event is 0 and we just moved used idx 0 -> 1: needed anyway, and the first always fires.
    assert q.needs_notification() is True
    assert q.needs_notification() is False  # nothing new since


def test_event_idx_delayed_interrupts():
    mem, alloc, dq, q = ring_memory(8, event_idx=True)
    buf = alloc.alloc(4096)
    for t in range(8):
        dq.add([(buf, 1)], [], token=t)
    dq.publish()
    dq.enable_interrupts(delayed=True)  # used_event = last_used + 3/4 of 8 in flight = 6
    assert q.used_event() == 6
    chains = q.pop_chains()
    q.needs_notification()  # prime: the first always fires
    fired = []
    for c in chains:
        q.add_used(c.head, 0)
        fired.append(q.needs_notification())
    # Entry 6 -> used idx 7 crosses used_event 6; only that one interrupts.
    assert fired == [False, False, False, False, False, False, True, False]


def test_event_idx_wraparound_long_run():
    """>65536 requests through a size-8 EVENT_IDX queue; every kick and interrupt decision
    is checked against an independent model of vring_need_event (event in [old, new))."""
    size = 8
    mem, alloc, dq, q = ring_memory(size, event_idx=True)
    buf = alloc.alloc(4096)
    rng = random.Random(1234)

    def crosses(event, new, old):
        return ((event - old) & 0xFFFF) < ((new - old) & 0xFFFF)

    avail_event = 0  # what the device last asked for (initially 0 in a zeroed ring)
    used_event = 0
    published = 0
    signalled = None  # used idx at the device's last notification decision
    expected_tokens: deque[int] = deque()
    token = 0
    kicks = suppressed_kicks = irqs = suppressed_irqs = 0
    while token < 70_000:
        # Driver: add a batch (chains of 1 or 2 descriptors) and publish.
        nadd = rng.randint(1, dq.num_free) if dq.num_free else 0
        for _ in range(nadd):
            if not dq.num_free:
                break
            if dq.num_free >= 2 and rng.random() < 0.3:
                dq.add([(buf, 16)], [(buf + 64, 1)], token)
            else:
                dq.add([(buf, 16)], [], token)
            expected_tokens.append(token)
            token += 1
        if nadd == 0 and dq.num_free:
            continue
        new = dq.avail_idx
        kick = dq.publish()
        want = new != published and crosses(avail_event, new, published)
        assert kick == want, (avail_event, new, published)
        kicks += kick
        suppressed_kicks += not kick
        published = new
        # Device: consume some or all of what is pending, return them, decide on an interrupt.
        pend = q.pending()
        assert pend == (published - q.next_avail) & 0xFFFF
        take = pend if rng.random() < 0.6 else rng.randint(0, pend)
        for c in q.pop_chains(limit=take):
            assert len(c.descriptors()) in (1, 2)
            q.add_used(c.head, 1)
        if take:
            irq = q.needs_notification()
            want_irq = signalled is None or crosses(used_event, q.next_used, signalled)
            assert irq == want_irq, (used_event, q.next_used, signalled)
            signalled = q.next_used
            irqs += irq
            suppressed_irqs += not irq
        if rng.random() < 0.7:
            more = q.enable_notification()
            avail_event = q.next_avail
            assert more == (q.next_avail != published)
        # Driver: reap (sometimes), then re-arm interrupts at its last_used.
        if rng.random() < 0.8:
            for t, length in dq.pop_used():
                assert t == expected_tokens.popleft() and length == 1
            waiting = dq.enable_interrupts()
            used_event = dq.last_used
            assert waiting is False
    assert token >= 70_000 > 0xFFFF
    assert dq.avail_idx == token & 0xFFFF
    # Everything made available was eventually seen; indices wrapped at least once.
    assert q.next_avail == (token - q.pending()) & 0xFFFF
    assert min(kicks, suppressed_kicks, irqs, suppressed_irqs) > 100


# ---------------------------------------------------------------------------
# garbage in the rings: typed errors or sane descriptors, never anything else
# ---------------------------------------------------------------------------
GARBAGE_RAM = 64 * 1024
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x2000, 0x3000


def _desc_strategy(size):
    addr = st.one_of(st.integers(0, GARBAGE_RAM), st.integers(0, 2**64 - 1), st.sampled_from([0x4000, 0x8000, GARBAGE_RAM - 16]))
    length = st.one_of(st.sampled_from([0, 1, 8, 15, 16, 32, 48, 64, 128, 256, 16 * 1024]), st.integers(0, 2**32 - 1))
    flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF))
    return st.tuples(addr, length, flags, nxt)


@st.composite
def garbage_rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    descs = draw(st.lists(_desc_strategy(size), min_size=size, max_size=size))
    ring = draw(st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)), min_size=size, max_size=size))
    avail_idx = draw(st.integers(0, 0xFFFF))
    next_avail = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    indirect = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return size, descs, ring, avail_idx, next_avail, indirect, seed


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage_rings())
def test_garbage_rings_never_escape(case):
    size, descs, ring_entries, avail_idx, next_avail, indirect, seed = case
    mem = bytearray_memory(GARBAGE_RAM)
    # Random bytes everywhere (indirect tables read garbage), then our descriptors and ring.
    mem.write(0, random.Random(seed).randbytes(GARBAGE_RAM))
    for i, (a, n, f, nx) in enumerate(descs):
        mem.write(DESC_GPA + 16 * i, struct.pack("<QIHH", a, n, f, nx))
    mem.write(AVAIL_GPA, struct.pack("<HH", 0, avail_idx) + struct.pack(f"<{size}H", *ring_entries))
    q = Queue(mem, size, mem.translate(DESC_GPA, 16 * size), mem.translate(AVAIL_GPA, 6 + 2 * size),
              mem.translate(USED_GPA, 6 + 8 * size), indirect=indirect, next_avail=next_avail)
    try:
        heads = q.pop_heads()
        assert len(heads) <= size
    except AvailIndexError:
        heads = []
    for head in set(heads) | set(ring_entries) | set(range(size)):
        last = q.last_descriptor(head)  # best-effort helper: must never raise
        assert last is None or (len(last) == 3 and 0 <= last[1] < 2**32)
        try:
            out = q.walk(head)
        except VirtqueueError:
            continue
        assert 1 <= len(out) <= size + MAX_INDIRECT
        assert last == out[-1]  # on a chain that walks, "last" is its final descriptor
        for a, n, f in out:
            assert 0 <= a < 2**64 and 0 <= n < 2**32 and 0 <= f <= 0xFFFF
            assert not f & INDIRECT  # indirect descriptors are expanded, never handed out
        dc = DescriptorChain(q, head)
        for d in dc.descriptors():
            try:
                assert len(dc.memory(d)) == d.len
            except ChainAddressError:
                pass
