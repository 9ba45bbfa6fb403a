"""The device process's event loop edge: listen, serve one frontend at a time.

Kick eventfds are watched with ``loop.add_reader``; a wake-up drains the
eventfd, processes every available chain (re-checking after re-enabling
notifications, so nothing posted during processing waits for another kick)
and writes the call eventfd only if the driver asked for it.

When the frontend disconnects, rings and memory are dropped and the server
waits for the next one: QEMU reconnects with ``reconnect=N`` on its chardev.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Optional

from simvirt import metrics
from simvirt.runtime import bind_unix
from simvirt.devices.base import VirtioDevice
from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.backend import BackendSession, Vring
from simvirt.vhost_user.transport import Disconnected, recv_message, send_message
from simvirt.virtio.errors import VirtqueueError

log = logging.getLogger(__name__)


class VhostUserServer:
    def __init__(self, device: VirtioDevice, socket_path: str, *, loop: Optional[asyncio.AbstractEventLoop] = None,
                 poll_us: float = 0.0) -> None:
        self.device = device
        # Like vhost-net's busyloop_timeout: after a batch, keep looking at the
        # avail ring this long before re-arming notifications and sleeping.
        self.poll_ns = int(poll_us * 1000)
        self.socket_path = socket_path
        self.loop = loop or asyncio.get_event_loop()
        self.listener: Optional[socket.socket] = None
        self.conn: Optional[socket.socket] = None
        self.session: Optional[BackendSession] = None
        self._disconnected: Optional[asyncio.Future] = None
        self.connections = 0

    # -- listening --------------------------------------------------------
    def listen(self) -> None:
        s = bind_unix(self.socket_path)  # owner-only: see simvirt/runtime.py
        s.setblocking(False)
        self.listener = s

    async def serve_forever(self) -> None:
        if self.listener is None:
            self.listen()
        assert self.listener is not None
        while True:
            conn, _ = await self.loop.sock_accept(self.listener)
            await self.serve_connection(conn)

    async def serve_connection(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        self.conn = conn
        self.connections += 1
        metrics.FRONTEND_CONNECTIONS.labels(self.device.vm, self.device.label).inc()
        log.info("%s: frontend connected", self.device.label)
        self.session = BackendSession(self.device, self)
        self.device.signal = self._signal_ring  # type: ignore[attr-defined]
        self._disconnected = self.loop.create_future()
        self.loop.add_reader(conn.fileno(), self._on_message)
        try:
            await self._disconnected
        finally:
            self.loop.remove_reader(conn.fileno())
            self.session.close()
            self.session = None
            conn.close()
            self.conn = None
            log.info("%s: frontend disconnected; waiting for the next one", self.device.label)

    def close(self) -> None:
        if self._disconnected is not None and not self._disconnected.done():
            self._disconnected.set_result(None)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def _drop(self, why: str) -> None:
        log.info("%s: dropping frontend: %s", self.device.label, why)
        if self._disconnected is not None and not self._disconnected.done():
            self._disconnected.set_result(None)

    # -- control plane ----------------------------------------------------
    def _on_message(self) -> None:
        assert self.conn is not None and self.session is not None
        try:
            msg = recv_message(self.conn)
        except Disconnected:
            self._drop("peer closed the socket")
            return
        except (p.ProtocolError, OSError) as e:
            metrics.count_error(self.device.vm, self.device.label, "vhost_user_malformed")
            self._drop(f"malformed message: {e}")
            return
        log.debug("%s: <- %s flags=%#x size=%d fds=%d", self.device.label, msg.name, msg.flags,
                  len(msg.payload), len(msg.fds))
        try:
            replies = self.session.handle(msg)
        except p.ProtocolError as e:
            if msg.request in p.REQUESTS_WITH_REPLY:
                # The frontend waits for a reply we cannot give: it must not hang.
                self._drop(f"{msg.name}: {e}")
            else:
                log.warning("%s: %s rejected: %s", self.device.label, msg.name, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug must not kill the device process
            log.exception("%s: internal error handling %s", self.device.label, msg.name)
            metrics.count_error(self.device.vm, self.device.label, "internal")
            self._drop(f"internal error: {e}")
            return
        for r in replies:
            try:
                send_message(self.conn, r, r.fds)
            except OSError as e:
                self._drop(f"send failed: {e}")
                return
            finally:
                for fd in r.fds:  # sent (the frontend has its own copy) or failed: ours to close
                    os.close(fd)
                r.fds = []

    # -- SessionHooks -----------------------------------------------------
    def watch_kick(self, index: int, fd: int) -> None:
        self.loop.add_reader(fd, self._on_kick, index, fd)
        # A kick may have arrived before we watched (or while disabled): look now.
        self.loop.call_soon(self._on_kick, index, -1)

    def unwatch_kick(self, index: int, fd: int) -> None:
        self.loop.remove_reader(fd)

    # -- data plane -------------------------------------------------------
    def _on_kick(self, index: int, fd: int) -> None:
        session = self.session
        if session is None:
            return
        vr = session.vrings[index]
        if fd >= 0:
            try:
                os.eventfd_read(fd)
            except (BlockingIOError, OSError):
                pass
        if not vr.active:
            return
        assert vr.stats is not None
        vr.stats.kicks += fd >= 0
        self.run_queue(vr)

    def run_queue(self, vr: Vring) -> None:
        """Drain the ring; interrupt once per batch; optionally busy-poll before sleeping."""
        queue = vr.queue
        stats = vr.stats
        assert queue is not None and stats is not None
        device = self.device
        if device.passive_ring(vr.index):
            # Buffers the device takes on its own schedule (net rx): a kick just
            # means "more buffers", never "work to drain".
            try:
                device.process_queue(vr.index, queue, stats)
            except VirtqueueError as e:
                metrics.count_error(device.vm, device.label, e.reason)
            if vr.queue is queue:
                if device.passive_wants_kick(vr.index):
                    queue.enable_notification()
                else:
                    queue.disable_notification()
            return
        poll_ns = self.poll_ns
        total = 0
        try:
            queue.disable_notification()
            while True:
                before = stats.chains
                device.process_queue(vr.index, queue, stats)
                n = stats.chains - before
                if n:
                    total += n
                    self._notify(vr)
                    if vr.queue is not queue:  # the device stopped the ring meanwhile
                        break
                    continue
                if poll_ns and _poll(queue, poll_ns):
                    continue
                if not queue.enable_notification():
                    break
                queue.disable_notification()
        except VirtqueueError as e:
            # Ring-level corruption (e.g. a bogus avail idx): stop serving this ring.
            log.error("%s: queue %d broken: %s", device.label, vr.index, e)
            metrics.count_error(device.vm, device.label, e.reason)
            session = self.session
            if session is not None:
                session._stop(vr)
            return
        stats.flush(total)

    def _notify(self, vr: Vring) -> None:
        queue = vr.queue
        assert queue is not None and vr.stats is not None
        if queue.needs_notification():
            vr.signal()
            vr.stats.interrupts += 1
        else:
            vr.stats.suppressed += 1

    def _signal_ring(self, index: int) -> None:
        """For devices that complete chains outside a kick (e.g. net rx, balloon stats)."""
        if self.session is None:
            return
        vr = self.session.vrings[index]
        if vr.queue is not None:
            self._notify(vr)


def _poll(queue, budget_ns: int) -> bool:
    """Spin on the avail index for up to ``budget_ns``; True if work arrived."""
    now = time.perf_counter_ns
    deadline = now() + budget_ns
    idx = queue.avail_idx
    seen = queue.next_avail
    yield_cpu = os.sched_yield
    while now() < deadline:
        if idx() != seen:
            return True
        # If the driver shares our CPU, let it run instead of spinning against it.
        yield_cpu()
    return False
