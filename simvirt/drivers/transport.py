"""The driver's view of a virtio device reached through vhost-user.

vhost-user has no device status register (QEMU keeps it in its device
model), so this class plays that role: it walks the status handshake
ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK, turning each step into
the vhost-user requests QEMU would send, and refuses to go on if the
device does not offer what the driver needs (VERSION_1).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Callable, Optional

from simvirt import metrics
from simvirt.memory.alloc import PageAllocator
from simvirt.memory.guest import GuestMemory
from simvirt.vhost_user.frontend import VhostUserFrontend
from simvirt.vhost_user.protocol import (
    HEADER,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    BackendRequest,
    ProtocolFeature,
)
from simvirt.virtio.driver_queue import DriverQueue
from simvirt.virtio.spec import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    bit,
)

log = logging.getLogger(__name__)

WANTED_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.BACKEND_REQ)
)


class DeviceError(Exception):
    """The device cannot be driven (missing features, refused set-up)."""


class DriverQueueHandle:
    """A driver queue plus its kick/call eventfds and counters."""

    def __init__(self, index: int, queue: DriverQueue, kick_fd: int, call_fd: int, labels: tuple[str, str, str]) -> None:
        self.index = index
        self.queue = queue
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.kicks = 0
        self.kicks_suppressed = 0
        self.interrupts = 0
        self._kick_c = metrics.KICKS_SENT.labels(*labels)
        self._supp_c = metrics.KICKS_SUPPRESSED.labels(*labels)
        self._irq_c = metrics.INTERRUPTS_RECEIVED.labels(*labels)
        self._inflight_g = metrics.IN_FLIGHT.labels(*labels)
        self._occ_g = metrics.RING_OCCUPANCY.labels(*labels)
        self._flushed = (0, 0, 0)

    def publish(self) -> None:
        """Expose new chains; kick only if the device asked for it.

        After :meth:`VhostUserTransport.stop` the kick fd is -1: a publish
        deferred to the loop before the stop kicks nobody (the fd number may
        already belong to another file)."""
        if self.queue.publish() and self.kick_fd >= 0:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
        else:
            self.kicks_suppressed += 1

    def flush_metrics(self) -> None:
        k, s, i = self._flushed
        if self.kicks != k:
            self._kick_c.inc(self.kicks - k)
        if self.kicks_suppressed != s:
            self._supp_c.inc(self.kicks_suppressed - s)
        if self.interrupts != i:
            self._irq_c.inc(self.interrupts - i)
        self._flushed = (self.kicks, self.kicks_suppressed, self.interrupts)
        self._inflight_g.set(self.queue.in_flight)
        self._occ_g.set(self.queue.in_flight / self.queue.size)


class VhostUserTransport:
    def __init__(self, socket_path: str, mem: GuestMemory, alloc: PageAllocator,
                 *, vm: str = "sim", device_label: str = "dev", connect_timeout: float = 10.0,
                 inflight: bool = False) -> None:
        self.socket_path = socket_path
        self.mem = mem
        self.alloc = alloc
        self.vm = vm
        self.label = device_label
        self.connect_timeout = connect_timeout
        self.fe = VhostUserFrontend(socket_path)
        self.status = 0
        self.device_features = 0
        self.features = 0
        self.protocol_features = 0
        self.max_queues = 1
        self.queues: dict[int, DriverQueueHandle] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._backend_req: Optional[socket.socket] = None
        self._backend_buf = b""
        self._config_cb: Optional[Callable[[], None]] = None
        # INFLIGHT_SHMFD: ask for it, and keep the area (fd, size, offset, queues, size) across backends.
        self.want_inflight = inflight
        self.inflight_area: Optional[tuple[int, int, int, int, int]] = None
        self.reconnects = 0

    # -- handshake --------------------------------------------------------
    def _set_status(self, bits: int) -> None:
        self.status |= bits

    def start(self) -> None:
        """Connect and reach FEATURES-readable state (ACKNOWLEDGE | DRIVER)."""
        self.fe.connect(retry_for=self.connect_timeout)
        self._set_status(DeviceStatus.ACKNOWLEDGE)
        self.device_features = self.fe.get_features()
        if self.device_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self.fe.get_protocol_features()
            wanted = WANTED_PROTOCOL_FEATURES | (bit(ProtocolFeature.INFLIGHT_SHMFD) if self.want_inflight else 0)
            self.protocol_features = offered & wanted
            self.fe.set_protocol_features(self.protocol_features)
        if self.protocol_features & bit(ProtocolFeature.MQ):
            self.max_queues = self.fe.get_queue_num()
        if self.protocol_features & bit(ProtocolFeature.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.fe.set_backend_req_fd(theirs.fileno())
            finally:
                theirs.close()
            ours.setblocking(False)
            self._backend_req = ours
        self.fe.set_owner()
        self._set_status(DeviceStatus.DRIVER)

    def negotiate(self, wanted: int, required: int = 0) -> int:
        """Accept the intersection of ``wanted`` and the device's offer (FEATURES_OK)."""
        required |= bit(VIRTIO_F_VERSION_1)
        missing = required & ~self.device_features
        if missing:
            self._set_status(DeviceStatus.FAILED)
            raise DeviceError(f"device lacks required features {missing:#x}")
        self.features = (wanted | required) & self.device_features
        acked = self.features
        if self.device_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            acked |= bit(VHOST_USER_F_PROTOCOL_FEATURES)
        self.fe.set_features(acked)
        self._set_status(DeviceStatus.FEATURES_OK)
        self.fe.set_mem_table(self.mem)
        return self.features

    def has(self, feature_bit: int) -> bool:
        return bool(self.features & (1 << feature_bit))

    def read_config(self, offset: int, size: int) -> bytes:
        if not self.protocol_features & bit(ProtocolFeature.CONFIG):
            raise DeviceError("backend has no VHOST_USER_PROTOCOL_F_CONFIG: config space unreadable")
        return self.fe.get_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.fe.set_config(offset, data)

    def setup_queue(self, index: int, size: int, indirect_max: int = 0) -> DriverQueueHandle:
        """Allocate rings in guest RAM and describe them to the backend."""
        q = DriverQueue(self.mem, self.alloc, size,
                        event_idx=self.has(VIRTIO_F_EVENT_IDX),
                        indirect=self.has(VIRTIO_F_INDIRECT_DESC), indirect_max=indirect_max)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe = self.fe
        fe.set_vring_num(index, size)
        fe.set_vring_base(index, 0)
        fe.set_vring_addr(index, self.mem.gpa_to_user(q.desc_gpa), self.mem.gpa_to_user(q.used_gpa),
                          self.mem.gpa_to_user(q.avail_gpa))
        fe.set_vring_call(index, call)
        h = DriverQueueHandle(index, q, kick, call, (self.vm, self.label, str(index)))
        self.queues[index] = h
        return h

    def _setup_inflight(self) -> None:
        """GET_INFLIGHT_FD once, SET_INFLIGHT_FD to every backend (QEMU's order: before the kicks)."""
        if not self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD) or not self.queues:
            return
        if self.inflight_area is None:
            # One region per queue, sized for the largest ring (QEMU: its queue-size property).
            nq, qs = max(self.queues) + 1, max(h.queue.size for h in self.queues.values())
            fd, size, offset = self.fe.get_inflight_fd(nq, qs)
            self.inflight_area = (fd, size, offset, nq, qs)
        fd, size, offset, nq, qs = self.inflight_area
        self.fe.set_inflight_fd(fd, size, offset, nq, qs)

    def driver_ok(self) -> None:
        """Start the rings (kick fds) and enable them: the device may now use them."""
        self._setup_inflight()
        self._start_rings()

    def _start_rings(self) -> None:
        for index, h in self.queues.items():
            self.fe.set_vring_kick(index, h.kick_fd)
        if self.device_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for index in self.queues:
                self.fe.set_vring_enable(index, True)
        self._set_status(DeviceStatus.DRIVER_OK)

    def _close_backend_req(self) -> None:
        if self._backend_req is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._backend_req.fileno())
            self._backend_req.close()
            self._backend_req = None

    def watch_interrupts(self, loop: asyncio.AbstractEventLoop, index: int, callback: Callable[[], None]) -> None:
        h = self.queues[index]
        self._loop = loop

        def on_call() -> None:
            try:
                os.eventfd_read(h.call_fd)
            except BlockingIOError:
                return
            h.interrupts += 1
            callback()

        loop.add_reader(h.call_fd, on_call)

    def reconnect(self, retry_for: Optional[float] = None) -> None:
        """Drive a restarted backend on the same socket from where the old one left off.

        What QEMU's vhost-user-blk does on reconnect: connect, renegotiate the
        same features, send the memory table and the kept inflight area, and
        restart every ring at the used index found in guest RAM (a dead backend
        cannot answer GET_VRING_BASE); a backend with the inflight area resubmits
        what the old one had taken and not finished.  Rings, buffers, requests
        in flight and the call/kick eventfds all stay: only the backend changed.
        """
        old_features = self.features
        self._close_backend_req()
        self.fe.close()
        self.fe = VhostUserFrontend(self.socket_path)
        saved_timeout = self.connect_timeout
        if retry_for is not None:
            self.connect_timeout = retry_for
        try:
            self.start()
        finally:
            self.connect_timeout = saved_timeout
        missing = old_features & ~self.device_features
        if missing:
            self._set_status(DeviceStatus.FAILED)
            raise DeviceError(f"the restarted backend lacks negotiated features {missing:#x}")
        acked = old_features
        if self.device_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            acked |= bit(VHOST_USER_F_PROTOCOL_FEATURES)
        self.fe.set_features(acked)
        self._set_status(DeviceStatus.FEATURES_OK)
        self.fe.set_mem_table(self.mem)
        if self.inflight_area is not None and not self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD):
            log.warning("%s: the restarted backend has no INFLIGHT_SHMFD: requests in flight restart from used idx",
                        self.label)
        fe = self.fe
        for index, h in self.queues.items():
            q = h.queue
            fe.set_vring_num(index, q.size)
            fe.set_vring_base(index, q.device_used_idx())
            fe.set_vring_addr(index, self.mem.gpa_to_user(q.desc_gpa), self.mem.gpa_to_user(q.used_gpa),
                              self.mem.gpa_to_user(q.avail_gpa))
            fe.set_vring_call(index, h.call_fd)
        if self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD) and self.inflight_area is not None:
            fd, size, offset, nq, qs = self.inflight_area
            fe.set_inflight_fd(fd, size, offset, nq, qs)
        self._start_rings()
        if self._loop is not None and self._config_cb is not None:
            self.watch_config_changes(self._loop, self._config_cb)
        self.reconnects += 1

    def watch_config_changes(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
        """Call ``callback`` on each BACKEND_CONFIG_CHANGE_MSG (the config interrupt).

        Returns False if the backend offers no back-end request channel.
        """
        self._config_cb = callback
        sock = self._backend_req
        if sock is None:
            return False
        self._loop = loop

        def on_msg() -> None:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(sock.fileno())
                return
            self._backend_buf += data
            while len(self._backend_buf) >= HEADER.size:
                req, flags, size = HEADER.unpack_from(self._backend_buf)
                if len(self._backend_buf) < HEADER.size + size:
                    break
                self._backend_buf = self._backend_buf[HEADER.size + size:]
                if flags & VHOST_USER_NEED_REPLY_MASK:
                    sock.send(HEADER.pack(req, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 8) + bytes(8))
                if req == BackendRequest.CONFIG_CHANGE_MSG:
                    callback()

        loop.add_reader(sock.fileno(), on_msg)
        return True

    def stop(self) -> dict[int, int]:
        """Stop every ring (GET_VRING_BASE) and hang up; returns the final avail indices."""
        bases = {}
        for index, h in list(self.queues.items()):
            if self._loop is not None:
                self._loop.remove_reader(h.call_fd)
            try:
                if self.device_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
                    self.fe.set_vring_enable(index, False)
                bases[index] = self.fe.get_vring_base(index)
            except OSError:
                pass
            os.close(h.kick_fd)
            os.close(h.call_fd)
            h.kick_fd = h.call_fd = -1
        self.queues.clear()
        self._close_backend_req()
        self.fe.close()
        self.status = 0
        if self.inflight_area is not None:
            os.close(self.inflight_area[0])
            self.inflight_area = None
        return bases
