"""BlkDevice request handling, sans-IO: hand-written chains in, status bytes and storage out."""
from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings, strategies as st

from simvirt import metrics
from simvirt.devices.blk import spec as s
from simvirt.devices.blk.device import BlkDevice
from simvirt.devices.blk.storage import MemoryStorage
from simvirt.memory import PageAllocator
from simvirt.virtio.errors import AvailIndexError
from simvirt.virtio.spec import VIRTIO_F_VERSION_1, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, bit

from simvirt_testlib import R, W, RawRing, bytearray_memory, write_indirect_table

DISK = 1 << 20
RAM = 4 << 20
SIZE_MAX = 64 * 1024
SEG_MAX = 4
OK, IOERR, UNSUPP = s.VIRTIO_BLK_S_OK, s.VIRTIO_BLK_S_IOERR, s.VIRTIO_BLK_S_UNSUPP
SENTINEL = 0xEE
_labels = itertools.count()


class CountingStorage(MemoryStorage):
    def __init__(self, size, readonly=False, fail=False):
        super().__init__(size, readonly)
        self.flushes = 0
        self.fail = fail

    def flush(self):
        self.flushes += 1

    def read(self, offset, bufs):
        if self.fail:
            raise OSError(5, "injected EIO")
        super().read(offset, bufs)

    def write(self, offset, bufs):
        if self.fail:
            raise OSError(5, "injected EIO")
        super().write(offset, bufs)


class Rig:
    def __init__(self, readonly=False, fail=False, **kw):
        self.label = f"blk-t{next(_labels)}"
        self.storage = CountingStorage(DISK)
        self.storage.write(0, [memoryview(random.Random(7).randbytes(DISK))])
        self.storage.fail = fail
        self.dev = BlkDevice(self.storage, label=self.label, seg_max=SEG_MAX, size_max=SIZE_MAX,
                             readonly=readonly, serial="serial-123", **kw)
        self.mem = bytearray_memory(RAM)
        alloc = PageAllocator(0, RAM)
        self.ring = RawRing(self.mem, alloc, 16)
        self.q = self.ring.device_queue(indirect=True)
        self.stats = metrics.QueueStats("standalone", self.label, "0")
        scratch = alloc.alloc(4096)
        self.hdr = scratch
        self.st = scratch + 256
        self.tbl = scratch + 1024
        self.data = alloc.alloc(1 << 20)
        self.data2 = alloc.alloc(1 << 20)
        self.mem.write(self.st, bytes([SENTINEL]))

    def disk(self, off, n):
        buf = bytearray(n)
        MemoryStorage.read(self.storage, off, [memoryview(buf)])
        return bytes(buf)

    def header(self, rtype, sector, gpa=None):
        gpa = self.hdr if gpa is None else gpa
        self.mem.write(gpa, s.OUTHDR.pack(rtype, 0, sector))
        return (gpa, 16, R)

    def status(self):
        self.mem.write(self.st, bytes([SENTINEL]))
        return (self.st, 1, W)

    def run(self, segs=None, head=0):
        if segs is not None:
            self.ring.chain(segs)
        self.ring.push(head)
        self.dev.process_queue(0, self.q, self.stats)
        (used,) = self.ring.pop_used()
        assert used[0] == head
        st = self.mem.read(self.st, 1)[0]
        self.mem.write(self.st, bytes([SENTINEL]))
        return used[1], st

    def errors(self, reason):
        return metrics.REGISTRY.get_sample_value(
            "simvirt_errors_total", {"vm": "standalone", "device": self.label, "reason": reason}) or 0.0

    def ok_read(self, sector=10, n=4096):
        self.mem.write(self.data2, b"\x5a" * n)
        used, st = self.run([self.header(s.VIRTIO_BLK_T_IN, sector), (self.data2, n, W), self.status()])
        assert (used, st) == (n + 1, OK)
        assert self.mem.read(self.data2, n) == self.disk(sector * 512, n)


@pytest.fixture
def rig():
    return Rig()


# ---------------------------------------------------------------------------
# well-formed requests, every framing
# ---------------------------------------------------------------------------
def test_read_canonical(rig):
    used, st = rig.run([rig.header(s.VIRTIO_BLK_T_IN, 3), (rig.data, 8192, W), rig.status()])
    assert (used, st) == (8193, OK)
    assert rig.mem.read(rig.data, 8192) == rig.disk(3 * 512, 8192)


def test_write_canonical(rig):
    payload = random.randbytes(4096)
    rig.mem.write(rig.data, payload)
    used, st = rig.run([rig.header(s.VIRTIO_BLK_T_OUT, 100), (rig.data, 4096, R), rig.status()])
    assert (used, st) == (1, OK)
    assert rig.disk(100 * 512, 4096) == payload


def test_odd_framings(rig):
    # Header split across two descriptors, data in three segments, status shares the last data segment.
    rig.mem.write(rig.hdr, s.OUTHDR.pack(s.VIRTIO_BLK_T_IN, 0, 5))
    rig.mem.write(rig.st, bytes([SENTINEL]))
    segs = [(rig.hdr, 7, R), (rig.hdr + 7, 9, R), (rig.data, 512, W), (rig.data + 4096, 1024, W),
            (rig.data + 8192, 513, W)]
    used, _ = rig.run(segs)
    assert used == 2049
    got = rig.mem.read(rig.data, 512) + rig.mem.read(rig.data + 4096, 1024) + rig.mem.read(rig.data + 8192, 512)
    assert got == rig.disk(5 * 512, 2048)
    assert rig.mem.read(rig.data + 8192 + 512, 1) == bytes([OK])
    # Header and write data in one descriptor.
    payload = random.randbytes(1024)
    rig.mem.write(rig.data, s.OUTHDR.pack(s.VIRTIO_BLK_T_OUT, 0, 40) + payload)
    used, st = rig.run([(rig.data, 16 + 1024, R), rig.status()])
    assert (used, st) == (1, OK) and rig.disk(40 * 512, 1024) == payload


def test_indirect_request(rig):
    n = write_indirect_table(rig.mem, rig.tbl, [rig.header(s.VIRTIO_BLK_T_IN, 8), (rig.data, 512, W),
                                                (rig.data + 512, 512, W), rig.status()])
    rig.ring.set_desc(0, rig.tbl, n, VIRTQ_DESC_F_INDIRECT)
    used, st = rig.run()
    assert (used, st) == (1025, OK) and rig.mem.read(rig.data, 1024) == rig.disk(8 * 512, 1024)


def test_limits_are_inclusive(rig):
    # Exactly seg_max segments of exactly size_max each.
    segs = [(rig.data + k * SIZE_MAX, SIZE_MAX, W) for k in range(SEG_MAX)]
    used, st = rig.run([rig.header(s.VIRTIO_BLK_T_IN, 0), *segs, rig.status()])
    assert (used, st) == (SEG_MAX * SIZE_MAX + 1, OK)
    # The very last sector.
    cap = DISK // 512
    used, st = rig.run([rig.header(s.VIRTIO_BLK_T_IN, cap - 1), (rig.data, 512, W), rig.status()])
    assert (used, st) == (513, OK)


def test_flush_get_id(rig):
    used, st = rig.run([rig.header(s.VIRTIO_BLK_T_FLUSH, 0), rig.status()])
    assert (used, st) == (1, OK) and rig.storage.flushes == 1
    used, st = rig.run([rig.header(s.VIRTIO_BLK_T_GET_ID, 0), (rig.data, 20, W), rig.status()])
    assert (used, st) == (21, OK) and rig.mem.read(rig.data, 20) == b"serial-123".ljust(20, b"\0")
    rig.mem.write(rig.data, b"\xff" * 8)
    used, st = rig.run([rig.header(s.VIRTIO_BLK_T_GET_ID, 0), (rig.data, 6, W), rig.status()])
    assert (used, st) == (7, OK) and rig.mem.read(rig.data, 8) == b"serial\xff\xff"


def test_long_serial_is_truncated():
    r = Rig()
    r.dev.serial = b"x" * 20
    used, st = r.run([r.header(s.VIRTIO_BLK_T_GET_ID, 0), (r.data, 20, W), r.status()])
    assert (used, st) == (21, OK) and r.mem.read(r.data, 20) == b"x" * 20
    assert BlkDevice(MemoryStorage(DISK), serial="y" * 30).serial == b"y" * 20


def test_write_through_flushes_every_write(rig):
    rig.dev.write_config(s.CONFIG_WRITEBACK_OFFSET, b"\0")
    rig.mem.write(rig.data, b"a" * 512)
    assert rig.run([rig.header(s.VIRTIO_BLK_T_OUT, 1), (rig.data, 512, R), rig.status()]) == (1, OK)
    assert rig.storage.flushes == 1
    assert rig.run([rig.header(s.VIRTIO_BLK_T_OUT, 1), (rig.data, 256, R), (rig.data, 256, R), rig.status()]) == (1, OK)
    assert rig.storage.flushes == 2  # general path too
    rig.dev.reset()
    assert rig.dev.writeback == 1


@pytest.mark.parametrize("rtype,flags", [(s.VIRTIO_BLK_T_DISCARD, 0), (s.VIRTIO_BLK_T_WRITE_ZEROES, 0),
                                         (s.VIRTIO_BLK_T_WRITE_ZEROES, s.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)])
def test_discard_and_write_zeroes(rig, rtype, flags):
    segs = [(3, 5, flags), (100, 300, flags), (2047, 1, flags)]  # unaligned to pages on purpose
    rig.mem.write(rig.data, b"".join(s.DISCARD_SEG.pack(*x) for x in segs))
    before = rig.disk(0, DISK)
    used, st = rig.run([rig.header(rtype, 0), (rig.data, 16 * len(segs), R), rig.status()])
    assert (used, st) == (1, OK)
    expect = bytearray(before)
    for sector, num, _ in segs:
        expect[sector * 512:(sector + num) * 512] = bytes(num * 512)
    assert rig.disk(0, DISK) == bytes(expect)


# ---------------------------------------------------------------------------
# malformed and refused requests
# ---------------------------------------------------------------------------
CASES = {
    # name: (builder(rig) -> segs, expected used len, expected status, metric reason)
    "gpa_beyond_ram": (lambda r: [(1 << 40, 16, R), (r.data, 512, W), r.status()], 1, IOERR, "bad_address"),
    "data_spans_end_of_ram": (lambda r: [r.header(0, 0), (RAM - 256, 512, W), r.status()], 1, IOERR, "bad_address"),
    "status_beyond_ram": (lambda r: [r.header(0, 0), (r.data, 512, W), (RAM, 1, W)], 0, SENTINEL, "bad_address"),
    "header_short": (lambda r: [(r.header(0, 0)[0], 8, R), (r.data, 512, W), r.status()], 1, IOERR, "short_header"),
    "header_write_only": (lambda r: [(r.header(0, 0)[0], 16, W), (r.data, 512, W), r.status()], 1, IOERR, "short_header"),
    "no_writable_descriptor": (lambda r: [r.header(1, 0), (r.data, 512, R)], 0, SENTINEL, "missing_status"),
    "status_len_zero": (lambda r: [r.header(0, 0), (r.data, 512, W), (r.status()[0], 0, W)], 0, SENTINEL, "missing_status"),
    "segment_over_size_max": (lambda r: [r.header(0, 0), (r.data, 2 * SIZE_MAX, W), r.status()], 1, IOERR, "size_max"),
    "write_segment_over_size_max": (lambda r: [r.header(1, 0), (r.data, SIZE_MAX + 512, R), r.status()], 1, IOERR, "size_max"),
    "too_many_segments": (lambda r: [r.header(0, 0)] + [(r.data + 512 * k, 512, W) for k in range(SEG_MAX + 1)] + [r.status()],
                          1, IOERR, "seg_max"),
    "read_beyond_capacity": (lambda r: [r.header(0, DISK // 512 - 1), (r.data, 1024, W), r.status()], 1, IOERR, "out_of_range"),
    "write_beyond_capacity": (lambda r: [r.header(1, DISK // 512), (r.data, 512, R), r.status()], 1, IOERR, "out_of_range"),
    "sector_2_64_minus_1": (lambda r: [r.header(0, 2**64 - 1), (r.data, 512, W), r.status()], 1, IOERR, "out_of_range"),
    "unaligned_length": (lambda r: [r.header(0, 0), (r.data, 1000, W), r.status()], 1, IOERR, "unaligned_length"),
    "unaligned_write": (lambda r: [r.header(1, 0), (r.data, 511, R), r.status()], 1, IOERR, "unaligned_length"),
    "read_with_readable_data": (lambda r: [r.header(0, 0), (r.data, 512, R), r.status()], 1, IOERR, "bad_layout"),
    "write_with_writable_data": (lambda r: [r.header(1, 0), (r.data, 512, W), r.status()], 1, IOERR, "bad_layout"),
    "unknown_type": (lambda r: [r.header(99, 0), (r.data, 512, W), r.status()], 1, UNSUPP, "unsupported_request"),
    "discard_with_unmap": (lambda r: [r.header(11, 0), r._segs((0, 8, s.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)), r.status()],
                           1, UNSUPP, "bad_discard_flags"),
    "write_zeroes_unknown_flag": (lambda r: [r.header(13, 0), r._segs((0, 8, 2)), r.status()], 1, UNSUPP, "bad_discard_flags"),
    "discard_payload_not_16": (lambda r: [r.header(11, 0), (r.data, 20, R), r.status()], 1, IOERR, "bad_discard"),
    "discard_no_payload": (lambda r: [r.header(11, 0), r.status()], 1, IOERR, "bad_discard"),
    "discard_too_many_segments": (lambda r: [r.header(11, 0), r._segs(*[(0, 1, 0)] * 33), r.status()], 1, IOERR, "bad_discard"),
    "discard_too_many_sectors": (lambda r: [r.header(11, 0), r._segs((0, (1 << 22) + 1, 0)), r.status()], 1, IOERR, "bad_discard"),
    "discard_beyond_capacity": (lambda r: [r.header(11, 0), r._segs((DISK // 512 - 1, 2, 0)), r.status()], 1, IOERR, "out_of_range"),
    "write_zeroes_overflowing_sector": (lambda r: [r.header(13, 0), r._segs((2**64 - 1, 1, 0)), r.status()], 1, IOERR, "out_of_range"),
    "readable_after_writable": (lambda r: [r.header(0, 0), (r.data, 512, W), (r.data2, 16, R), r.status()],
                                1, IOERR, "readable_after_writable"),
}


def _segs(self, *segs):
    self.mem.write(self.data, b"".join(s.DISCARD_SEG.pack(*x) for x in segs))
    return (self.data, 16 * len(segs), R)


Rig._segs = _segs


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_answered_and_counted(name):
    build, want_used, want_status, reason = CASES[name]
    rig = Rig()
    before_disk = rig.disk(0, DISK)
    before = rig.errors(reason)
    rig.mem.write(rig.data2, b"\x77" * 16)
    used, st = rig.run(build(rig))
    assert (used, st) == (want_used, want_status)
    assert rig.errors(reason) == before + 1
    assert rig.disk(0, DISK) == before_disk  # a refused request changes nothing on disk
    rig.ok_read()  # and the queue keeps working


def _loop(r):
    r.header(0, 0)
    r.status()
    r.ring.set_desc(0, r.hdr, 16, VIRTQ_DESC_F_NEXT, 1)
    r.ring.set_desc(1, r.st, 1, W | VIRTQ_DESC_F_NEXT, 0)


def _next_out_of_range(r):
    r.header(0, 0)
    r.ring.set_desc(0, r.hdr, 16, VIRTQ_DESC_F_NEXT, 200)


def _indirect_and_next(r):
    n = write_indirect_table(r.mem, r.tbl, [r.header(0, 0), (r.data, 512, W), r.status()])
    r.ring.set_desc(0, r.tbl, n, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)


def _nested_indirect(r):
    n = write_indirect_table(r.mem, r.tbl, [r.header(0, 0), (r.tbl, 48, VIRTQ_DESC_F_INDIRECT), r.status()])
    r.ring.set_desc(0, r.tbl, n, VIRTQ_DESC_F_INDIRECT)


def _indirect_len(r):
    write_indirect_table(r.mem, r.tbl, [r.header(0, 0), (r.data, 512, W), r.status()])
    r.ring.set_desc(0, r.tbl, 40, VIRTQ_DESC_F_INDIRECT)


def _indirect_outside(r):
    r.status()
    r.ring.set_desc(0, RAM - 32, 48, VIRTQ_DESC_F_INDIRECT)


WALK_FAILURES = [(_loop, "chain_too_long"), (_next_out_of_range, "bad_desc_index"),
                 (_indirect_and_next, "bad_indirect"), (_nested_indirect, "nested_indirect"),
                 (_indirect_len, "bad_indirect"), (_indirect_outside, "bad_address")]


@pytest.mark.parametrize("build,reason", WALK_FAILURES, ids=[f.__name__.strip("_") for f, _ in WALK_FAILURES])
def test_unwalkable_chain_is_returned_never_with_ok(build, reason):
    rig = Rig()
    before = rig.errors(reason)
    build(rig)
    used, st = rig.run()
    assert used in (0, 1)
    assert st in (SENTINEL, IOERR)  # never a fake OK
    assert rig.errors(reason) == before + 1
    rig.ok_read()


def test_avail_index_corruption_raises_typed_error(rig):
    rig.ring.set_avail_idx(100)
    with pytest.raises(AvailIndexError):
        rig.dev.process_queue(0, rig.q, rig.stats)


def test_many_chains_in_one_kick_mixed_good_and_bad(rig):
    """12 chains pending at once (more than one device batch), every third one refused."""
    heads = []
    for k in range(12):
        good = k % 3 != 1
        hdr_gpa = rig.data2 + 32 * k
        rig.mem.write(hdr_gpa, s.OUTHDR.pack(s.VIRTIO_BLK_T_IN if good else 77, 0, k))
        rig.mem.write(hdr_gpa + 16, bytes([SENTINEL]))
        segs = [(hdr_gpa, 16, R), (rig.data + 512 * k, 512, W), (hdr_gpa + 16, 1, W)]
        table = rig.tbl + 48 * k
        rig.ring.set_desc(k, table, write_indirect_table(rig.mem, table, segs), VIRTQ_DESC_F_INDIRECT)
        rig.ring.push(k)
        heads.append((k, good, hdr_gpa + 16))
    while rig.q.pending():
        rig.dev.process_queue(0, rig.q, rig.stats)
    used = dict(rig.ring.pop_used())
    assert sorted(used) == list(range(12))
    for k, good, st_gpa in heads:
        assert rig.mem.read(st_gpa, 1)[0] == (OK if good else UNSUPP)
        assert used[k] == (513 if good else 1)
        if good:
            assert rig.mem.read(rig.data + 512 * k, 512) == rig.disk(k * 512, 512)


def test_storage_errors_become_ioerr():
    rig = Rig(fail=True)
    before = rig.errors("io_error")
    assert rig.run([rig.header(0, 0), (rig.data, 512, W), rig.status()]) == (1, IOERR)  # fast path
    assert rig.run([rig.header(0, 0), (rig.data, 256, W), (rig.data + 256, 256, W), rig.status()]) == (1, IOERR)
    assert rig.run([rig.header(1, 0), (rig.data, 512, R), rig.status()]) == (1, IOERR)
    assert rig.errors("io_error") == before + 3


def test_readonly_device():
    rig = Rig(readonly=True)
    assert rig.dev.device_features() & bit(s.VIRTIO_BLK_F_RO)
    before = rig.errors("read_only")
    disk = rig.disk(0, DISK)
    assert rig.run([rig.header(1, 0), (rig.data, 512, R), rig.status()]) == (1, IOERR)
    assert rig.run([rig.header(1, 0), (rig.data, 256, R), (rig.data, 256, R), rig.status()]) == (1, IOERR)
    assert rig.run([rig.header(11, 0), rig._segs((0, 8, 0)), rig.status()]) == (1, IOERR)
    assert rig.run([rig.header(13, 0), rig._segs((0, 8, 0)), rig.status()]) == (1, IOERR)
    assert rig.errors("read_only") == before + 4
    assert rig.disk(0, DISK) == disk
    rig.ok_read()
    assert rig.run([rig.header(s.VIRTIO_BLK_T_FLUSH, 0), rig.status()]) == (1, OK)
    assert BlkDevice(MemoryStorage(DISK, readonly=True)).readonly  # storage can force it


# ---------------------------------------------------------------------------
# config space and features
# ---------------------------------------------------------------------------
def test_config_and_features(rig):
    f = rig.dev.device_features()
    for b in (s.VIRTIO_BLK_F_SIZE_MAX, s.VIRTIO_BLK_F_SEG_MAX, s.VIRTIO_BLK_F_FLUSH, s.VIRTIO_BLK_F_MQ,
              s.VIRTIO_BLK_F_DISCARD, s.VIRTIO_BLK_F_WRITE_ZEROES, s.VIRTIO_BLK_F_CONFIG_WCE):
        assert f & bit(b)
    assert f & bit(VIRTIO_F_VERSION_1) and not f & bit(s.VIRTIO_BLK_F_RO)
    cfg = s.CONFIG.unpack(rig.dev.read_config(0, s.CONFIG.size))
    assert cfg[0] == DISK // 512 and cfg[1] == SIZE_MAX and cfg[2] == SEG_MAX and cfg[6] == 512
    assert cfg[11] == 1 and cfg[13] == 1 and cfg[15] == 32
    assert rig.dev.read_config(200, 56) == bytes(56)
    for off, n in ((250, 7), (256, 1), (-1, 2)):
        with pytest.raises(ValueError):
            rig.dev.read_config(off, n)
    with pytest.raises(ValueError):
        rig.dev.write_config(0, b"\0" * 8)
    with pytest.raises(ValueError):
        rig.dev.write_config(s.CONFIG_WRITEBACK_OFFSET, b"\0\0")


# ---------------------------------------------------------------------------
# any framing of a read gives the same bytes as the canonical one
# ---------------------------------------------------------------------------
_SHARED: list[Rig] = []


def _shared_rig() -> Rig:
    """One rig for all examples (the property only reads)."""
    if not _SHARED:
        _SHARED.append(Rig())
    return _SHARED[0]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, DISK // 512 - 64), st.integers(1, 32), st.data())
def test_any_framing_reads_the_same(sector, nsec, data):
    rig = _shared_rig()
    n = nsec * 512
    hdr_cut = data.draw(st.integers(1, 16))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=SEG_MAX - 1))) if n > 1 else []
    merge_status = data.draw(st.booleans())
    rig.mem.write(rig.hdr, s.OUTHDR.pack(s.VIRTIO_BLK_T_IN, 0, sector))
    segs = [(rig.hdr, hdr_cut, R)] + ([(rig.hdr + hdr_cut, 16 - hdr_cut, R)] if hdr_cut < 16 else [])
    bounds = [0, *cuts, n]
    # Each data piece lives at its own offset, with a gap, so ordering mistakes show.
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        length = b - a + (1 if merge_status and k == len(bounds) - 2 else 0)
        segs.append((rig.data + 4096 * 4 * k, length, W))
    if not merge_status:
        segs.append(rig.status())
    used, st_byte = rig.run(segs)
    assert used == n + 1
    got = b"".join(rig.mem.read(rig.data + 4096 * 4 * k, b - a) for k, (a, b) in enumerate(zip(bounds, bounds[1:])))
    assert got == rig.disk(sector * 512, n)
    last = len(bounds) - 2
    if merge_status:
        st_byte = rig.mem.read(rig.data + 4096 * 4 * last + (bounds[-1] - bounds[-2]), 1)[0]
    assert st_byte == OK
