"""Bad input through a raw vhost-user frontend against a real ``simvirt device blk`` process.

The test owns guest RAM and one ring, writes every descriptor itself and
posts malformed chains. For each: the device answers with an error status
(or returns the chain with used len 0), counts it in
``simvirt_errors_total{reason=...}``, stays up, and a well-formed write and
read on the same ring right after return the right data.
"""
from __future__ import annotations

import os
import random
import time

import pytest

from simvirt.devices.blk import spec as s
from simvirt.virtio.spec import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT

from simvirt_testlib import MiB, R, W, Device, RawRig, write_indirect_table

SIZE_MAX = 64 * 1024
SEG_MAX = 4
OK, IOERR, UNSUPP = s.VIRTIO_BLK_S_OK, s.VIRTIO_BLK_S_IOERR, s.VIRTIO_BLK_S_UNSUPP
SENTINEL = 0xEE
RAM = 16 * MiB


@pytest.fixture(scope="module")
def device():
    d = Device(["--memory", "16M", "--size-max", "64K", "--seg-max", str(SEG_MAX)], metrics=True)
    yield d
    log = d.log()
    d.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def ro_device():
    d = Device(["--memory", "4M", "--readonly"], metrics=True)
    yield d
    d.stop()


@pytest.fixture
def rig(device):
    r = RawRig(device.socket_path, ram=RAM)
    yield r
    r.close()
    assert device.alive, device.log()
    assert device.errors("internal") == 0, device.log()


def _segs(rig, *segs):
    rig.mem.write(rig.data_gpa, b"".join(s.DISCARD_SEG.pack(*x) for x in segs))
    return (rig.data_gpa, 16 * len(segs), R)


def hdr(rig, rtype, sector=0):
    return rig.header(rtype, sector)


CASES = {
    "gpa_beyond_ram": (lambda r: [(1 << 40, 16, R), (r.data2_gpa, 512, W), r.status_desc()], 1, IOERR, "bad_address"),
    "data_spans_end_of_ram": (lambda r: [hdr(r, 0), (RAM - 256, 512, W), r.status_desc()], 1, IOERR, "bad_address"),
    "header_short": (lambda r: [(hdr(r, 0)[0], 8, R), (r.data2_gpa, 512, W), r.status_desc()], 1, IOERR, "short_header"),
    "header_in_write_only_descriptor": (lambda r: [(hdr(r, 0)[0], 16, W), (r.data2_gpa, 512, W), r.status_desc()],
                                        1, IOERR, "short_header"),
    "no_writable_status": (lambda r: [hdr(r, 1, 5), (r.data_gpa, 512, R)], 0, SENTINEL, "missing_status"),
    "status_descriptor_len_0": (lambda r: [hdr(r, 0), (r.data2_gpa, 512, W), (r.status_desc()[0], 0, W)],
                                0, SENTINEL, "missing_status"),
    "segment_over_size_max": (lambda r: [hdr(r, 0), (r.data2_gpa, 2 * SIZE_MAX, W), r.status_desc()], 1, IOERR, "size_max"),
    "more_segments_than_seg_max": (lambda r: [hdr(r, 0)] + [(r.data2_gpa + 512 * k, 512, W) for k in range(SEG_MAX + 1)]
                                   + [r.status_desc()], 1, IOERR, "seg_max"),
    "read_beyond_capacity": (lambda r: [hdr(r, 0, r.capacity - 1), (r.data2_gpa, 1024, W), r.status_desc()],
                             1, IOERR, "out_of_range"),
    "write_beyond_capacity": (lambda r: [hdr(r, 1, r.capacity), (r.data_gpa, 512, R), r.status_desc()],
                              1, IOERR, "out_of_range"),
    "sector_2_64_minus_1": (lambda r: [hdr(r, 0, 2**64 - 1), (r.data2_gpa, 512, W), r.status_desc()], 1, IOERR, "out_of_range"),
    "unaligned_length": (lambda r: [hdr(r, 0), (r.data2_gpa, 1000, W), r.status_desc()], 1, IOERR, "unaligned_length"),
    "unknown_request_type": (lambda r: [hdr(r, 99), (r.data2_gpa, 512, W), r.status_desc()], 1, UNSUPP, "unsupported_request"),
    "discard_with_unmap_flag": (lambda r: [hdr(r, s.VIRTIO_BLK_T_DISCARD), _segs(r, (0, 8, s.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)),
                                           r.status_desc()], 1, UNSUPP, "bad_discard_flags"),
    "discard_beyond_capacity": (lambda r: [hdr(r, s.VIRTIO_BLK_T_DISCARD), _segs(r, (r.capacity - 1, 2, 0)), r.status_desc()],
                                1, IOERR, "out_of_range"),
    "discard_33_segments": (lambda r: [hdr(r, s.VIRTIO_BLK_T_DISCARD), _segs(r, *[(0, 1, 0)] * 33), r.status_desc()],
                            1, IOERR, "bad_discard"),
    "read_with_device_readable_data": (lambda r: [hdr(r, 0), (r.data_gpa, 512, R), r.status_desc()], 1, IOERR, "bad_layout"),
    "readable_after_writable": (lambda r: [hdr(r, 0), (r.data2_gpa, 512, W), (r.data_gpa, 16, R), r.status_desc()],
                                1, IOERR, "readable_after_writable"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_chain(device, rig, name):
    build, want_used, want_status, reason = CASES[name]
    before = device.errors(reason)
    # Known content where a refused write would land.
    assert rig.write(5, b"\x11" * 512) == OK
    rig.status_desc(SENTINEL)
    used = rig.submit(build(rig))
    assert used[0] == 0
    assert (used[1], rig.status) == (want_used, want_status)
    assert device.alive
    assert device.errors(reason) == before + 1
    st, data = rig.read(5, 512)
    assert (st, data) == (OK, b"\x11" * 512)  # nothing was written by the refused request
    rig.check_io()


def _loop(r):
    hdr(r, 0)
    r.status_desc()
    r.ring.set_desc(0, r.hdr_gpa, 16, VIRTQ_DESC_F_NEXT, 1)
    r.ring.set_desc(1, r.data2_gpa, 512, W | VIRTQ_DESC_F_NEXT, 2)
    r.ring.set_desc(2, r.status_gpa, 1, W | VIRTQ_DESC_F_NEXT, 0)


def _next_beyond_ring(r):
    hdr(r, 0)
    r.status_desc()
    r.ring.set_desc(0, r.hdr_gpa, 16, VIRTQ_DESC_F_NEXT, 1)
    r.ring.set_desc(1, r.data2_gpa, 512, W | VIRTQ_DESC_F_NEXT, 999)


def _indirect_and_next(r):
    n = write_indirect_table(r.mem, r.table_gpa, [hdr(r, 0), (r.data2_gpa, 512, W), r.status_desc()])
    r.ring.set_desc(0, r.table_gpa, n, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    r.ring.set_desc(1, r.status_gpa, 1, W)


def _nested_indirect(r):
    n = write_indirect_table(r.mem, r.table_gpa, [hdr(r, 0), (r.table_gpa, 48, VIRTQ_DESC_F_INDIRECT), r.status_desc()])
    r.ring.set_desc(0, r.table_gpa, n, VIRTQ_DESC_F_INDIRECT)


def _indirect_len_not_16(r):
    write_indirect_table(r.mem, r.table_gpa, [hdr(r, 0), (r.data2_gpa, 512, W), r.status_desc()])
    r.ring.set_desc(0, r.table_gpa, 40, VIRTQ_DESC_F_INDIRECT)


def _indirect_outside_ram(r):
    r.status_desc()
    r.ring.set_desc(0, RAM - 16, 48, VIRTQ_DESC_F_INDIRECT)


def _indirect_loop(r):
    write_indirect_table(r.mem, r.table_gpa, [hdr(r, 0), (r.data2_gpa, 512, W), r.status_desc()])
    r.mem.write(r.table_gpa + 32 + 12, b"\x01\x00\x01\x00")  # last entry: flags W|NEXT, next 1
    r.ring.set_desc(0, r.table_gpa, 48, VIRTQ_DESC_F_INDIRECT)


WALK = [(_loop, "chain_too_long"), (_next_beyond_ring, "bad_desc_index"), (_indirect_and_next, "bad_indirect"),
        (_nested_indirect, "nested_indirect"), (_indirect_len_not_16, "bad_indirect"),
        (_indirect_outside_ram, "bad_address"), (_indirect_loop, "chain_too_long")]


@pytest.mark.parametrize("build,reason", WALK, ids=[f.__name__.strip("_") for f, _ in WALK])
def test_unwalkable_chain(device, rig, build, reason):
    before = device.errors(reason)
    build(rig)
    rig.post(0)
    head, used_len = rig.wait_used()
    assert head == 0 and used_len in (0, 1)
    assert rig.status in (SENTINEL, IOERR)  # never a fake OK
    assert device.alive and device.errors(reason) == before + 1
    rig.check_io()


def test_head_index_beyond_ring(device, rig):
    before = device.errors("bad_desc_index")
    rig.post(500)
    assert rig.wait_used() == (500, 0)
    assert device.errors("bad_desc_index") == before + 1
    rig.check_io()


def test_avail_index_jump_stops_only_that_ring(device, rig):
    before = device.errors("bad_avail_idx")
    rig.ring.set_avail_idx(rig.ring.avail_idx + 100)
    os.eventfd_write(rig.kick, 1)
    deadline = time.monotonic() + 5
    while device.errors("bad_avail_idx") == before:
        assert time.monotonic() < deadline, "device did not notice the avail idx jump"
        time.sleep(0.01)
    assert device.alive
    rig.close()
    fresh = RawRig(device.socket_path, ram=RAM)
    try:
        fresh.check_io()
    finally:
        fresh.close()


def test_burst_of_bad_and_good_chains(device, rig):
    """Malformed chains and good ones interleaved in one kick: every good one is served."""
    rng = random.Random(5)
    ring = rig.ring
    expected = {}
    payloads = {}
    # Descriptors 0..14 in groups of 3; status bytes and headers in separate slots per chain.
    for k in range(5):
        base = 3 * k
        hdr_gpa = rig.table_gpa + 1024 + 32 * k
        st_gpa = hdr_gpa + 16
        rig.mem.write(st_gpa, bytes([SENTINEL]))
        buf = rig.data_gpa + 8192 * k
        kind = k % 2
        if kind == 0:  # good write of its own data
            data = rng.randbytes(4096)
            payloads[k] = data
            rig.mem.write(buf, data)
            rig.mem.write(hdr_gpa, s.OUTHDR.pack(s.VIRTIO_BLK_T_OUT, 0, 100 + 8 * k))
            ring.set_desc(base, hdr_gpa, 16, VIRTQ_DESC_F_NEXT, base + 1)
            ring.set_desc(base + 1, buf, 4096, VIRTQ_DESC_F_NEXT, base + 2)
            expected[base] = (1, OK, st_gpa)
        else:  # unaligned read
            rig.mem.write(hdr_gpa, s.OUTHDR.pack(s.VIRTIO_BLK_T_IN, 0, 0))
            ring.set_desc(base, hdr_gpa, 16, VIRTQ_DESC_F_NEXT, base + 1)
            ring.set_desc(base + 1, buf, 100, W | VIRTQ_DESC_F_NEXT, base + 2)
            expected[base] = (1, IOERR, st_gpa)
        ring.set_desc(base + 2, st_gpa, 1, W)
        ring.push(base)
    os.eventfd_write(rig.kick, 1)
    got = {}
    deadline = time.monotonic() + 5
    while len(got) < 5:
        assert time.monotonic() < deadline
        for head, length in ring.pop_used():
            got[head] = length
        time.sleep(0.001)
    for head, (length, status, st_gpa) in expected.items():
        assert got[head] == length and rig.mem.read(st_gpa, 1)[0] == status
    for k, data in payloads.items():
        assert rig.read(100 + 8 * k, 4096) == (OK, data)


@pytest.mark.parametrize("what", ["write", "write_multi_segment", "discard", "write_zeroes"])
def test_readonly_device_refuses_writes(ro_device, what):
    before = ro_device.errors("read_only")
    r = RawRig(ro_device.socket_path, ram=RAM)
    try:
        assert r.config.capacity == 4 * MiB // 512
        if what == "write":
            segs = [hdr(r, 1, 0), (r.data_gpa, 4096, R), r.status_desc()]
        elif what == "write_multi_segment":
            segs = [hdr(r, 1, 0), (r.data_gpa, 512, R), (r.data_gpa, 512, R), r.status_desc()]
        elif what == "discard":
            segs = [hdr(r, s.VIRTIO_BLK_T_DISCARD), _segs(r, (0, 8, 0)), r.status_desc()]
        else:
            segs = [hdr(r, s.VIRTIO_BLK_T_WRITE_ZEROES), _segs(r, (0, 8, 0)), r.status_desc()]
        assert r.submit(segs) == (0, 1)
        assert r.status == IOERR
        assert ro_device.errors("read_only") == before + 1
        assert ro_device.alive
        r.check_io(readonly=True)
        assert r.submit([hdr(r, s.VIRTIO_BLK_T_FLUSH), r.status_desc()]) == (0, 1) and r.status == OK
    finally:
        r.close()
