"""Helpers shared by simvirt's tests.

Imported as a plain module (``import simvirt_testlib``): pytest's default
"prepend" import mode puts ``tests/`` on ``sys.path`` when it loads
``tests/conftest.py``.

* :func:`ring_memory` / :class:`RawRing`: sans-IO split rings over a
  bytearray-backed :class:`GuestMemory`, with descriptors written by hand.
* :class:`Device`: a ``python -m simvirt device blk`` child with a log file
  and a Prometheus port of our choosing.
* :class:`RawRig`: a raw vhost-user frontend (no simvirt driver) with one
  ring whose descriptors the test writes itself, to post malformed chains.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import tempfile
import time
import urllib.request
from typing import Optional


from simvirt.bench.procs import DeviceProcess
from simvirt.devices.blk import spec as blk
from simvirt.drivers.blk import BlkConfig, VirtioBlkDriver
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, MemoryRegion, PageAllocator
from simvirt.vhost_user.frontend import VhostUserFrontend
from simvirt.vhost_user.protocol import ProtocolFeature
from simvirt.virtio.driver_queue import DriverQueue
from simvirt.virtio.queue import Queue
from simvirt.virtio.spec import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    bit,
)

KiB = 1 << 10
MiB = 1 << 20
DESC = struct.Struct("<QIHH")  # addr, len, flags, next

R = 0  # device-readable
W = VIRTQ_DESC_F_WRITE  # device-writable


# ---------------------------------------------------------------------------
# sans-IO rings
# ---------------------------------------------------------------------------
def bytearray_memory(size: int, gpa: int = 0) -> GuestMemory:
    """Guest RAM backed by a plain bytearray (fast, no shared memory)."""
    return GuestMemory([MemoryRegion(gpa=gpa, size=size, view=memoryview(bytearray(size)))])


def ring_memory(size: int, *, ram: int = 1 * MiB, event_idx: bool = False, indirect: bool = False,
                indirect_max: int = 16) -> tuple[GuestMemory, PageAllocator, DriverQueue, Queue]:
    """A DriverQueue and a device Queue sharing one ring in one GuestMemory."""
    mem = bytearray_memory(ram)
    alloc = PageAllocator(0, ram)
    dq = DriverQueue(mem, alloc, size, event_idx=event_idx, indirect=indirect, indirect_max=indirect_max)
    q = Queue(mem, size, mem.translate(dq.desc_gpa, 16 * size), mem.translate(dq.avail_gpa, 6 + 2 * size),
              mem.translate(dq.used_gpa, 6 + 8 * size), event_idx=event_idx, indirect=indirect)
    return mem, alloc, dq, q


class RawRing:
    """Ring areas in guest RAM that the test fills byte by byte (driver side)."""

    def __init__(self, mem: GuestMemory, alloc: PageAllocator, size: int) -> None:
        self.mem = mem
        self.size = size
        self.desc_gpa = alloc.alloc(16 * size)
        self.avail_gpa = alloc.alloc(6 + 2 * size)
        self.used_gpa = alloc.alloc(6 + 8 * size)
        for gpa, n in ((self.desc_gpa, 16 * size), (self.avail_gpa, 6 + 2 * size), (self.used_gpa, 6 + 8 * size)):
            mem.write(gpa, bytes(n))
        self.avail_idx = 0
        self.last_used = 0

    def device_queue(self, **kw) -> Queue:
        n = self.size
        return Queue(self.mem, n, self.mem.translate(self.desc_gpa, 16 * n),
                     self.mem.translate(self.avail_gpa, 6 + 2 * n), self.mem.translate(self.used_gpa, 6 + 8 * n), **kw)

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc_gpa + 16 * i, DESC.pack(addr, length, flags, nxt))

    def chain(self, segs: list[tuple[int, int, int]], first: int = 0) -> int:
        """Write ``(addr, len, flags)`` segments as descriptors first.. linked by NEXT; return the head."""
        for k, (addr, length, flags) in enumerate(segs):
            last = k == len(segs) - 1
            self.set_desc(first + k, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else first + k + 1)
        return first

    def push(self, head: int) -> None:
        """Put ``head`` in the avail ring and publish the new avail idx."""
        slot = self.avail_idx % self.size
        self.mem.write(self.avail_gpa + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write(self.avail_gpa + 2, struct.pack("<H", idx & 0xFFFF))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used_gpa + 2, 2))[0]

    def used_flags(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used_gpa, 2))[0]

    def used_entry(self, n: int) -> tuple[int, int]:
        slot = n % self.size
        return struct.unpack("<II", self.mem.read(self.used_gpa + 4 + 8 * slot, 8))

    def pop_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            out.append(self.used_entry(self.last_used))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def write_indirect_table(mem: GuestMemory, gpa: int, segs: list[tuple[int, int, int]]) -> int:
    """An indirect table of ``segs`` chained with NEXT (next = k+1); returns its byte length."""
    for k, (addr, length, flags) in enumerate(segs):
        last = k == len(segs) - 1
        mem.write(gpa + 16 * k, DESC.pack(addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else k + 1))
    return 16 * len(segs)


# ---------------------------------------------------------------------------
# device processes and metrics
# ---------------------------------------------------------------------------
from simvirt.bench.procs import free_port  # noqa: E402,F401  (re-exported for the tests)
from simvirt.metrics import sample_sum as parse_metrics  # noqa: E402,F401


class Device:
    """``python -m simvirt device blk ...`` with a log file and an optional metrics port."""

    def __init__(self, args: list[str], metrics: bool = False) -> None:
        self.port: Optional[int] = free_port() if metrics else None
        extra = ["--metrics-port", str(self.port)] if metrics else []
        self.logdir = tempfile.mkdtemp(prefix="simvirt-test-")
        self.log_path = os.path.join(self.logdir, "device.log")
        self.dp = DeviceProcess("blk", [*args, *extra], log_path=self.log_path)
        try:
            self.socket_path = self.dp.wait_ready()
            if metrics:
                self._wait_metrics()
        except BaseException:
            self.stop()
            raise

    def _wait_metrics(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.scrape()
                return
            except OSError:
                if time.monotonic() > deadline or not self.alive:
                    raise
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.dp.proc.pid

    @property
    def alive(self) -> bool:
        return self.dp.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def scrape(self) -> str:
        assert self.port is not None, "device started without metrics"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def errors(self, reason: str) -> float:
        return parse_metrics(self.scrape(), "simvirt_errors_total", reason=reason)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        self.dp.stop()
        shutil.rmtree(self.logdir, ignore_errors=True)
        shutil.rmtree(self.dp.tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# a raw vhost-user frontend with a hand-driven ring
# ---------------------------------------------------------------------------
RIG_PROTOCOL = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)


def frontend_handshake(socket_path: str, protocol: int = RIG_PROTOCOL) -> tuple[VhostUserFrontend, int]:
    """Connect, negotiate protocol features, SET_OWNER; returns (frontend, device features)."""
    fe = VhostUserFrontend(socket_path, timeout=10.0)
    fe.connect(retry_for=10.0)
    features = fe.get_features()
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & protocol)
    fe.set_owner()
    return fe, features


class RawRig:
    """Guest RAM + one ring set up over vhost-user by hand; the test writes the descriptors.

    Scratch layout: header at ``hdr_gpa``, status byte at ``status_gpa``,
    data buffers from ``data_gpa`` (1 MiB) and ``data2_gpa`` (1 MiB).
    """

    def __init__(self, socket_path: str, *, ram: int = 16 * MiB, qsize: int = 16, indirect: bool = True) -> None:
        self.mem = GuestMemory.create_shared(ram)
        self.ram = ram
        self.alloc = PageAllocator(0, ram)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fe: Optional[VhostUserFrontend] = None
        try:
            self.fe, dev_features = frontend_handshake(socket_path)
            want = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)
            if indirect:
                want |= bit(VIRTIO_F_INDIRECT_DESC)
            self.fe.set_features(want & dev_features)
            self.fe.set_mem_table(self.mem)
            self.config = BlkConfig.parse(self.fe.get_config(0, blk.CONFIG.size))
            self.ring = RawRing(self.mem, self.alloc, qsize)
            u = self.mem.gpa_to_user
            self.fe.set_vring_num(0, qsize)
            self.fe.set_vring_base(0, 0)
            self.fe.set_vring_addr(0, u(self.ring.desc_gpa), u(self.ring.used_gpa), u(self.ring.avail_gpa))
            self.fe.set_vring_kick(0, self.kick)
            self.fe.set_vring_enable(0, True)
        except BaseException:
            self.close()
            raise
        scratch = self.alloc.alloc(4096)
        self.hdr_gpa = scratch
        self.status_gpa = scratch + 512
        self.table_gpa = scratch + 1024  # room for an indirect table of 32 entries (512 bytes)
        self.data_gpa = self.alloc.alloc(1 * MiB)
        self.data2_gpa = self.alloc.alloc(1 * MiB)

    @property
    def capacity(self) -> int:
        return self.config.capacity

    # -- building requests -------------------------------------------------
    def header(self, rtype: int, sector: int, gpa: Optional[int] = None) -> tuple[int, int, int]:
        gpa = self.hdr_gpa if gpa is None else gpa
        self.mem.write(gpa, blk.OUTHDR.pack(rtype, 0, sector))
        return (gpa, 16, R)

    def status_desc(self, sentinel: int = 0xEE) -> tuple[int, int, int]:
        self.mem.write(self.status_gpa, bytes([sentinel]))
        return (self.status_gpa, 1, W)

    @property
    def status(self) -> int:
        return self.mem.read(self.status_gpa, 1)[0]

    def post(self, head: int) -> None:
        self.ring.push(head)
        os.eventfd_write(self.kick, 1)

    def wait_used(self, timeout: float = 5.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.ring.pop_used()
            if got:
                assert len(got) == 1, f"expected one used entry, got {got}"
                return got[0]
            if time.monotonic() > deadline:
                raise AssertionError("device returned no used entry in time")
            time.sleep(0.0005)

    def submit(self, segs: list[tuple[int, int, int]]) -> tuple[int, int]:
        """Post one chain built from ``segs`` at descriptor 0 and wait for it: (used id, used len)."""
        head = self.ring.chain(segs)
        self.post(head)
        return self.wait_used()

    # -- well-formed I/O ---------------------------------------------------
    def write(self, sector: int, data: bytes) -> int:
        self.mem.write(self.data_gpa, data)
        used = self.submit([self.header(blk.VIRTIO_BLK_T_OUT, sector), (self.data_gpa, len(data), R), self.status_desc()])
        assert used[1] == 1, used
        return self.status

    def read(self, sector: int, nbytes: int) -> tuple[int, bytes]:
        self.mem.write(self.data2_gpa, b"\x5a" * nbytes)
        used = self.submit([self.header(blk.VIRTIO_BLK_T_IN, sector), (self.data2_gpa, nbytes, W), self.status_desc()])
        st = self.status
        if st == blk.VIRTIO_BLK_S_OK:
            assert used[1] == nbytes + 1, used
        return st, self.mem.read(self.data2_gpa, nbytes)

    def check_io(self, sector: Optional[int] = None, readonly: bool = False) -> None:
        """A well-formed write (unless read-only) then read on this ring returns the right data."""
        if sector is None:
            sector = self.capacity - 64
        if readonly:
            st, _ = self.read(sector, 4096)
            assert st == blk.VIRTIO_BLK_S_OK
            return
        data = random.randbytes(8192)
        assert self.write(sector, data) == blk.VIRTIO_BLK_S_OK
        st, got = self.read(sector, len(data))
        assert st == blk.VIRTIO_BLK_S_OK
        assert got == data

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None
        if self.kick >= 0:
            os.close(self.kick)
            self.kick = -1
        self.mem.close()


# ---------------------------------------------------------------------------
# the simvirt driver against a device
# ---------------------------------------------------------------------------
async def open_driver(socket_path: str, *, ram: int = 16 * MiB, **kw) -> tuple[VirtioBlkDriver, GuestMemory]:
    mem = GuestMemory.create_shared(ram)
    alloc = PageAllocator(0, ram)
    drv = VirtioBlkDriver(VhostUserTransport(socket_path, mem, alloc, device_label="test"), **kw)
    try:
        drv.probe(asyncio.get_running_loop())
    except BaseException:
        mem.close()
        raise
    return drv, mem


def close_driver(drv: VirtioBlkDriver, mem: GuestMemory) -> None:
    try:
        drv.close()
    finally:
        mem.close()


def device_works(socket_path: str, sector: int = 0) -> None:
    """A brand-new driver connection can write and read back data."""

    async def go() -> None:
        drv, mem = await open_driver(socket_path, ram=8 * MiB)
        try:
            data = random.randbytes(16384)
            await asyncio.wait_for(drv.write(sector, data), 10)
            assert await asyncio.wait_for(drv.read(sector, len(data)), 10) == data
        finally:
            close_driver(drv, mem)

    asyncio.run(go())


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class RecordingHooks:
    """SessionHooks that record what the event loop would be watching.

    A contract violation (watching a ring already watched with another fd,
    unwatching what is not watched) is raised at once with ``strict``, or
    listed in ``violations`` for a fuzzer that checks after each message.
    """

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.watched: dict[int, int] = {}
        self.violations: list[str] = []

    def _violated(self, what: str) -> None:
        if self.strict:
            raise AssertionError(what)
        self.violations.append(what)

    def watch_kick(self, index: int, fd: int) -> None:
        old = self.watched.get(index)
        if old is not None and old != fd:
            self._violated(f"watch_kick({index}, {fd}) while fd {old} is still watched for that ring")
        self.watched[index] = fd

    def unwatch_kick(self, index: int, fd: int) -> None:
        if self.watched.get(index) != fd:
            self._violated(f"unwatch_kick({index}, {fd}) but watched is {self.watched.get(index)}")
        self.watched.pop(index, None)
