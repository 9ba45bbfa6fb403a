"""Helpers for the virtio-balloon tests (device, driver, control, ctl, machine, bench).

Imported as a plain module: test files in this directory get it on
``sys.path`` from pytest's "prepend" import mode; balloon tests elsewhere
(tests/drivers, tests/test_control.py, tests/test_ctl.py) insert this
directory into ``sys.path`` themselves.

* :class:`BalloonProc`: a ``python -m simvirt device balloon`` child with a
  control socket, a Prometheus port and a log file.
* :class:`RawBalloon`: a raw vhost-user frontend (no simvirt driver) that
  negotiates exactly the feature bits a test asks for, builds the rings
  with :class:`DriverQueue` in its own shared guest RAM, and posts PFN
  arrays, stats buffers and page reports by hand.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable, Optional


from simvirt.control import request
from simvirt.devices.balloon import spec as s
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.vhost_user.frontend import VhostUserFrontend
from simvirt.vhost_user.protocol import HEADER, BackendRequest, ProtocolFeature
from simvirt.virtio.driver_queue import DriverQueue
from simvirt.virtio.spec import VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, bit

KiB = 1 << 10
MiB = 1 << 20
PAGE = 4096
PFN = struct.Struct("<I")
STAT = struct.Struct("<HQ")

FEATURE_BITS = {
    "MUST_TELL_HOST": s.VIRTIO_BALLOON_F_MUST_TELL_HOST,
    "STATS_VQ": s.VIRTIO_BALLOON_F_STATS_VQ,
    "DEFLATE_ON_OOM": s.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    "FREE_PAGE_HINT": s.VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    "PAGE_POISON": s.VIRTIO_BALLOON_F_PAGE_POISON,
    "PAGE_REPORTING": s.VIRTIO_BALLOON_F_PAGE_REPORTING,
}


from simvirt.bench.procs import free_port  # noqa: E402,F401  (re-exported for the tests)
from simvirt.metrics import sample_sum as metric  # noqa: E402,F401


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition", interval: float = 0.002) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pattern(pfn: int) -> bytes:
    """A page full of a recognisable, never-zero pattern for ``pfn``."""
    return struct.pack("<II", pfn | 0x80000000, 0xA5A5A5A5) * (PAGE // 8)


class BalloonProc:
    """``python -m simvirt device balloon`` with --control, --metrics-port and a log file."""

    def __init__(self, *, stats_interval: float = 0.0, metrics: bool = True, control: bool = True,
                 vm: str = "balloontest") -> None:
        self.dir = tempfile.mkdtemp(prefix="simvirt-balloon-test-")
        self.socket_path = os.path.join(self.dir, "balloon.sock")
        self.control_path: Optional[str] = os.path.join(self.dir, "balloon.ctl") if control else None
        self.log_path = os.path.join(self.dir, "device.log")
        self.port: Optional[int] = free_port() if metrics else None
        self.vm = vm
        cmd = [sys.executable, "-m", "simvirt", "device", "balloon", "--socket", self.socket_path,
               "--stats-interval", str(stats_interval), "--vm", vm]
        if self.control_path:
            cmd += ["--control", self.control_path]
        if self.port is not None:
            cmd += ["--metrics-port", str(self.port)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log)
        try:
            wait_for(lambda: self._ready(), 20.0, "balloon device process to listen")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"balloon device exited with {self.proc.returncode}:\n{self.log()}")
        if not os.path.exists(self.socket_path):
            return False
        if self.control_path and not os.path.exists(self.control_path):
            return False
        if self.port is not None:
            try:
                self.scrape()
            except OSError:
                return False
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def ctl(self, msg: dict, timeout: float = 10.0) -> dict:
        assert self.control_path is not None
        return request(self.control_path, msg, timeout=timeout)

    def info(self) -> dict:
        r = self.ctl({"cmd": "info"})
        assert r["ok"], r
        return r

    def scrape(self) -> str:
        assert self.port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def errors(self, reason: str) -> float:
        return metric(self.scrape(), "simvirt_errors_total", reason=reason)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


RAW_PROTOCOL = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)


class RawBalloon:
    """A hand-driven vhost-user frontend for a balloon device.

    ``features`` are the balloon feature bits to negotiate (VERSION_1 and
    VHOST_USER_F_PROTOCOL_FEATURES are added). Rings are set up for
    ``rings`` indices (default: every role the features give, Linux
    numbering) with no EVENT_IDX, so the device interrupts on every used
    buffer; the test polls the used rings.
    """

    def __init__(self, socket_path: str, *, ram: int = 32 * MiB, features: int = 0, rings: Optional[int] = None,
                 qsize: int = 64, protocol: int = RAW_PROTOCOL, backend_req: bool = False) -> None:
        self.ram = ram
        self.mem = GuestMemory.create_shared(ram)
        self.alloc = PageAllocator(0, ram)
        self.fe = VhostUserFrontend(socket_path, timeout=10.0)
        self.queues: dict[int, DriverQueue] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.backend_req: Optional[socket.socket] = None
        self._bufs: list[int] = []
        try:
            self.fe.connect(retry_for=10.0)
            self.device_features = self.fe.get_features()
            offered = self.fe.get_protocol_features()
            self.fe.set_protocol_features(offered & protocol)
            self.fe.set_owner()
            if backend_req:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self.fe.set_backend_req_fd(theirs.fileno())
                finally:
                    theirs.close()
                self.backend_req = ours
            self.features = features | bit(VIRTIO_F_VERSION_1)
            self.fe.set_features(self.features | bit(VHOST_USER_F_PROTOCOL_FEATURES))
            self.fe.set_mem_table(self.mem)
            self.roles = s.queue_roles(self.features)
            n = len(self.roles) if rings is None else rings
            for index in range(n):
                self._setup_ring(index, qsize)
            for index in range(n):
                self.fe.set_vring_kick(index, self.kicks[index])
                self.fe.set_vring_enable(index, True)
        except BaseException:
            self.close()
            raise
        # Scratch pages for PFN arrays and stats buffers.
        # Touched now, so that writing a PFN array later does not change the resident size.
        self.scratch = self.alloc.alloc_pages(16)
        self.mem.write(self.scratch, b"\xff" * 16 * PAGE)
        self._next_scratch = 0

    def _setup_ring(self, index: int, qsize: int) -> None:
        q = DriverQueue(self.mem, self.alloc, qsize)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks[index] = kick
        self.calls[index] = call
        self.queues[index] = q
        u = self.mem.gpa_to_user
        self.fe.set_vring_num(index, qsize)
        self.fe.set_vring_base(index, 0)
        self.fe.set_vring_addr(index, u(q.desc_gpa), u(q.used_gpa), u(q.avail_gpa))
        self.fe.set_vring_call(index, call)

    def ring(self, role: str) -> int:
        return self.roles.index(role)

    def scratch_page(self) -> int:
        gpa = self.scratch + PAGE * (self._next_scratch % 16)
        self._next_scratch += 1
        return gpa

    # -- guest pages ---------------------------------------------------------
    def grab(self, npages: int) -> int:
        """Allocate ``npages`` guest pages and touch them with :func:`pattern`; returns the first PFN."""
        gpa = self.alloc.alloc_pages(npages)
        first = gpa // PAGE
        for k in range(npages):
            self.mem.write(gpa + k * PAGE, pattern(first + k))
        return first

    def page(self, pfn: int) -> bytes:
        """Read one guest page. NB: reading a punched-out page of a shared shmem
        mapping faults a fresh zero page in, so measure resident sizes first."""
        return self.mem.read(pfn * PAGE, PAGE)

    def resident(self) -> int:
        return self.mem.resident_bytes()

    # -- ring traffic --------------------------------------------------------
    def post(self, index: int, out_bufs: list[tuple[int, int]], in_bufs: list[tuple[int, int]], token: Any) -> int:
        q = self.queues[index]
        head = q.add(out_bufs, in_bufs, token)
        q.publish()
        os.eventfd_write(self.kicks[index], 1)
        return head

    def used(self, index: int) -> list[tuple[Any, int]]:
        return self.queues[index].pop_used()

    def wait_used(self, index: int, n: int = 1, timeout: float = 5.0) -> list[tuple[Any, int]]:
        got: list[tuple[Any, int]] = []

        def enough() -> bool:
            got.extend(self.used(index))
            return len(got) >= n

        try:
            wait_for(enough, timeout, interval=0.001)
        except AssertionError:
            raise AssertionError(f"ring {index}: {len(got)} of {n} used buffers came back within {timeout} s") from None
        return got

    def assert_no_used(self, index: int, wait: float = 0.2) -> None:
        time.sleep(wait)
        q = self.queues[index]
        assert not q.has_used(), f"ring {index}: the device returned a buffer it should hold"

    def pfn_buffer(self, pfns: list[int]) -> tuple[int, int]:
        data = b"".join(PFN.pack(p) for p in pfns)
        assert len(data) <= PAGE
        gpa = self.scratch_page()
        self.mem.write(gpa, data)
        return gpa, len(data)

    def inflate(self, pfns: list[int], timeout: float = 5.0) -> int:
        """Post one inflate buffer and wait for it; returns the used length."""
        index = self.ring("inflateq")
        self.post(index, [self.pfn_buffer(pfns)], [], "inflate")
        [(tok, length)] = self.wait_used(index, 1, timeout)
        assert tok == "inflate"
        return length

    def deflate(self, pfns: list[int], timeout: float = 5.0) -> int:
        index = self.ring("deflateq")
        self.post(index, [self.pfn_buffer(pfns)], [], "deflate")
        [(tok, length)] = self.wait_used(index, 1, timeout)
        assert tok == "deflate"
        return length

    def stats_buffer(self, entries: list[tuple[int, int]], gpa: Optional[int] = None) -> tuple[int, int]:
        data = b"".join(STAT.pack(tag, val) for tag, val in entries)
        gpa = self.scratch_page() if gpa is None else gpa
        self.mem.write(gpa, data)
        return gpa, len(data)

    # -- config space --------------------------------------------------------
    def config(self) -> tuple[int, int, int, int]:
        """(num_pages, actual, free_page_hint_cmd_id, poison_val) read with GET_CONFIG."""
        return struct.unpack("<IIII", self.fe.get_config(0, 16))

    def read_backend_req(self, timeout: float = 5.0) -> tuple[int, int, bytes]:
        """One back-end -> front-end message from the SET_BACKEND_REQ_FD channel."""
        assert self.backend_req is not None
        self.backend_req.settimeout(timeout)
        hdr = b""
        while len(hdr) < HEADER.size:
            chunk = self.backend_req.recv(HEADER.size - len(hdr))
            if not chunk:
                raise AssertionError("back-end request channel closed")
            hdr += chunk
        req, flags, size = HEADER.unpack(hdr)
        payload = b""
        while len(payload) < size:
            payload += self.backend_req.recv(size - len(payload))
        return req, flags, payload

    def close(self) -> None:
        self.fe.close()
        for fd in list(self.kicks.values()) + list(self.calls.values()):
            os.close(fd)
        self.kicks.clear()
        self.calls.clear()
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None
        self.mem.close()


CONFIG_CHANGE = BackendRequest.CONFIG_CHANGE_MSG
