"""Driver-side split virtqueue (sans-IO): free list, indirect tables, used reclaim, kicks."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from simvirt.memory import OutOfGuestMemory, PageAllocator
from simvirt.virtio.driver_queue import DriverQueue, QueueFull
from simvirt.virtio.spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

from simvirt_testlib import bytearray_memory, ring_memory

DESC = struct.Struct("<QIHH")


def desc(mem, dq, i):
    return DESC.unpack(mem.read(dq.desc_gpa + 16 * i, 16))


@pytest.mark.parametrize("size", [0, -1, 3, 100, 65536])
def test_invalid_size(size):
    mem = bytearray_memory(1 << 20)
    with pytest.raises(ValueError):
        DriverQueue(mem, PageAllocator(0, 1 << 20), size)


def test_rings_come_from_the_allocator():
    mem = bytearray_memory(64 * 1024)
    alloc = PageAllocator(0, 64 * 1024)
    DriverQueue(mem, alloc, 256)  # 4K + 1 page + 1 page
    assert alloc.free_pages == 16 - 3
    with pytest.raises(OutOfGuestMemory):
        DriverQueue(mem, alloc, 32768)


def test_layout_of_a_direct_chain():
    mem, alloc, dq, q = ring_memory(8)
    head = dq.add([(0x1000, 16), (0x2000, 512)], [(0x3000, 1)], token="t")
    assert dq.num_free == 5 and dq.in_flight == 1
    a0, l0, f0, n0 = desc(mem, dq, head)
    a1, l1, f1, n1 = desc(mem, dq, n0)
    a2, l2, f2, _ = desc(mem, dq, n1)
    assert (a0, l0, f0) == (0x1000, 16, VIRTQ_DESC_F_NEXT)
    assert (a1, l1, f1) == (0x2000, 512, VIRTQ_DESC_F_NEXT)
    assert (a2, l2, f2) == (0x3000, 1, VIRTQ_DESC_F_WRITE)
    # avail ring entry written, avail idx not yet published.
    flags, idx, ring0 = struct.unpack("<HHH", mem.read(dq.avail_gpa, 6))
    assert ring0 == head and idx == 0 and dq.avail_idx == 1
    dq.publish()
    assert struct.unpack("<H", mem.read(dq.avail_gpa + 2, 2))[0] == 1


def test_argument_checks():
    mem, alloc, dq, q = ring_memory(8)
    with pytest.raises(ValueError):
        dq.add([], [], token=1)
    with pytest.raises(ValueError):
        dq.add([(0x1000, 1)], [], token=None)
    assert dq.num_free == 8 and dq.in_flight == 0


def test_queue_full_and_recycling():
    mem, alloc, dq, q = ring_memory(4)
    dq.add([(0x1000, 1)] * 3, [], token=1)
    with pytest.raises(QueueFull):
        dq.add([(0x1000, 1)] * 2, [], token=2)
    assert dq.num_free == 1 and dq.in_flight == 1  # the failed add changed nothing
    dq.add([(0x1000, 1)], [], token=3)
    assert dq.num_free == 0
    dq.publish()
    for c in q.pop_chains():
        q.add_used(c.head, 0)
    assert sorted(t for t, _ in dq.pop_used()) == [1, 3]
    assert dq.num_free == 4 and dq.in_flight == 0
    # The whole ring is usable again as one chain.
    dq.add([(0x1000, 1)] * 4, [], token=4)
    dq.publish()
    (c,) = q.pop_chains()
    assert len(c.descriptors()) == 4


def test_indirect_for_long_chains_and_crowded_ring():
    mem, alloc, dq, q = ring_memory(4, indirect=True, indirect_max=8)
    # Short chain with room: direct.
    h = dq.add([(0x1000, 16)], [(0x2000, 1)], token="short")
    assert not desc(mem, dq, h)[2] & VIRTQ_DESC_F_INDIRECT and dq.num_free == 2
    # Long chain (> 4 buffers): one indirect descriptor.
    h = dq.add([(0x1000, 16)] * 3, [(0x2000, 8)] * 3, token="long")
    a, n, f, _ = desc(mem, dq, h)
    assert f == VIRTQ_DESC_F_INDIRECT and n == 6 * 16 and dq.num_free == 1
    # Crowded ring (3 buffers, 1 free descriptor): indirect too.
    h = dq.add([(0x1000, 16)], [(0x2000, 8), (0x3000, 1)], token="crowded")
    assert desc(mem, dq, h)[2] == VIRTQ_DESC_F_INDIRECT and dq.num_free == 0
    # More than indirect_max buffers cannot go indirect, and do not fit directly.
    dq2_mem, _, dq2, _ = ring_memory(4, indirect=True, indirect_max=8)
    with pytest.raises(QueueFull):
        dq2.add([(0x1000, 1)] * 9, [], token="huge")
    dq.publish()
    chains = q.pop_chains()
    assert [len(c.descriptors()) for c in chains] == [2, 6, 3]
    assert [d.write for d in chains[1].descriptors()] == [False] * 3 + [True] * 3
    for c in chains:
        q.add_used(c.head, 0)
    assert [t for t, _ in dq.pop_used()] == ["short", "long", "crowded"]
    assert dq.num_free == 4


def test_indirect_disabled_without_table_room():
    mem, alloc, dq, q = ring_memory(8, indirect=True, indirect_max=1)
    assert dq.indirect is False
    h = dq.add([(0x1000, 1)] * 6, [], token=1)
    assert not desc(mem, dq, h)[2] & VIRTQ_DESC_F_INDIRECT


def test_pop_used_rejects_bogus_device_answers():
    mem, alloc, dq, q = ring_memory(8)
    dq.add([(0x1000, 1)], [], token=1)
    dq.publish()
    (c,) = q.pop_chains()
    q.add_used(5, 0)  # descriptor 5 was never made available
    with pytest.raises(RuntimeError):
        dq.pop_used()

    mem, alloc, dq, q = ring_memory(8)
    dq.add([(0x1000, 1)], [], token=1)
    dq.publish()
    q.add_used(0, 0)
    q.add_used(0, 0)  # more used entries than chains in flight
    with pytest.raises(RuntimeError):
        dq.pop_used()

    mem, alloc, dq, q = ring_memory(8)
    dq.add([(0x1000, 1)], [], token=1)
    q.add_used(9, 0)  # head beyond the ring
    with pytest.raises(RuntimeError):
        dq.pop_used()


def test_interrupt_suppression_flags():
    mem, alloc, dq, q = ring_memory(8)
    dq.disable_interrupts()
    assert struct.unpack("<H", mem.read(dq.avail_gpa, 2))[0] == VIRTQ_AVAIL_F_NO_INTERRUPT
    assert dq.enable_interrupts() is False
    assert struct.unpack("<H", mem.read(dq.avail_gpa, 2))[0] == 0


def test_event_idx_used_event_position():
    size = 8
    mem, alloc, dq, q = ring_memory(size, event_idx=True)
    for t in range(4):
        dq.add([(0x1000, 1)], [], token=t)
    dq.publish()
    dq.enable_interrupts()
    # used_event lives right after the avail ring entries.
    assert struct.unpack("<H", mem.read(dq.avail_gpa + 4 + 2 * size, 2))[0] == 0
    dq.enable_interrupts(delayed=True)  # 3/4 of 4 in flight
    assert struct.unpack("<H", mem.read(dq.avail_gpa + 4 + 2 * size, 2))[0] == 3
    assert q.used_event() == 3


def test_event_idx_kick_decisions():
    mem, alloc, dq, q = ring_memory(8, event_idx=True)
    q.enable_notification()  # avail_event = 0
    dq.add([(0x1000, 1)], [], token=1)
    assert dq.publish() is True  # 0 -> 1 crosses avail_event 0
    dq.add([(0x1000, 1)], [], token=2)
    assert dq.publish() is False  # device has not re-armed
    q.pop_chains()
    assert q.enable_notification() is False  # avail_event = 2
    dq.add([(0x1000, 1)], [], token=3)
    dq.add([(0x1000, 1)], [], token=4)
    assert dq.publish() is True  # 2 -> 4 crosses 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()), min_size=1, max_size=80),
       st.booleans())
def test_random_add_complete_keeps_free_list_consistent(ops, indirect):
    """Random adds and (out of order) completions: every token comes back exactly once,
    descriptors are never lost, and the device always sees the chain that was added."""
    size = 8
    mem, alloc, dq, q = ring_memory(size, indirect=indirect, indirect_max=8)
    expected = {}
    by_head = {}
    pending = []
    token = 0
    for nout, nin, complete in ops:
        if nout + nin == 0:
            nout = 1
        outs = [(0x1000 + 16 * k, 16) for k in range(nout)]
        ins = [(0x8000 + 16 * k, 8) for k in range(nin)]
        try:
            head = dq.add(outs, ins, token)
        except QueueFull:
            assert dq.num_free < nout + nin
        else:
            assert head not in by_head, "head handed out twice"
            by_head[head] = token
            expected[token] = [(a, n, False) for a, n in outs] + [(a, n, True) for a, n in ins]
            token += 1
        dq.publish()
        for c in q.pop_chains():
            assert [tuple(d) for d in c.descriptors()] == expected[by_head[c.head]]
            pending.append(c)
        if complete and pending:
            c = pending.pop(len(pending) // 2)
            del by_head[c.head]
            q.add_used(c.head, 7)
        for t, length in dq.pop_used():
            assert length == 7
            del expected[t]
    # Drain: complete everything; all descriptors come back.
    for c in pending:
        q.add_used(c.head, 7)
    got = dq.pop_used()
    for t, _ in got:
        del expected[t]
    assert expected == {}
    assert dq.num_free == size and dq.in_flight == 0


def test_persistent_chains_are_reused_without_rebuilding():
    mem, alloc, dq, q = ring_memory(8)
    head = dq.add_persistent([(0x1000, 16)], [(0x2000, 512), (0x3000, 1)])
    assert dq.num_free == 5 and dq.in_flight == 0
    for rnd in range(3):
        dq.post(head, token=("r", rnd))
        dq.publish()
        (c,) = q.pop_chains()
        assert c.head == head and [(d.addr, d.len, d.write) for d in c] == [(0x1000, 16, False), (0x2000, 512, True), (0x3000, 1, True)]
        q.add_used(head, 513)
        assert dq.pop_used() == [(("r", rnd), 513)]
        assert dq.num_free == 5  # the chain stays allocated
    # Ordinary chains keep using the other descriptors meanwhile.
    other = dq.add([(0x4000, 1)], [], token="o")
    assert other != head
    dq.post(head, token="busy")
    with pytest.raises(ValueError):
        dq.release_persistent(head)  # in flight
    with pytest.raises(ValueError):
        dq.release_persistent(other)  # not persistent
    dq.publish()
    for c in q.pop_chains():
        q.add_used(c.head, 0)
    assert sorted(map(str, (t for t, _ in dq.pop_used()))) == ["busy", "o"]
    dq.release_persistent(head)
    assert dq.num_free == 8
