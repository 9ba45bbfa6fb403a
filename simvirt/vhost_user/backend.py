"""vhost-user backend session: the device's half of the protocol.

One :class:`BackendSession` per frontend connection. It turns messages into
state (memory table, ring configuration, features) and replies, and tells
its I/O owner through :class:`SessionHooks` when a ring must be watched or
unwatched. It never reads or writes the socket itself.

Ring life cycle (docs/interop/vhost-user.rst, "Ring states"): a ring is
*started* when its kick fd arrives and *stopped* by GET_VRING_BASE. Without
VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts; with
it, only SET_VRING_ENABLE(1) enables it. The device processes a ring only
while it is started and enabled.
"""
from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from typing import Optional, Protocol

from simvirt import metrics
from simvirt.devices.base import VirtioDevice
from simvirt.memory.guest import GuestAddressError, GuestMemory
from simvirt.vhost_user import inflight
from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.protocol import Message, ProtocolError, ProtocolFeature, Request
from simvirt.virtio.queue import Queue
from simvirt.virtio.spec import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
)

log = logging.getLogger(__name__)

DEFAULT_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.BACKEND_REQ)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD)
)
MAX_MEM_SLOTS = 8
MAX_INFLIGHT_AREA = 64 << 20
MAX_INFLIGHT_OFFSET = 1 << 40  # an fd offset beyond this is nonsense (and beyond mmap's range near 2**63)


class SessionHooks(Protocol):
    def watch_kick(self, index: int, fd: int) -> None: ...
    def unwatch_kick(self, index: int, fd: int) -> None: ...


@dataclass
class Vring:
    """One ring's configuration as the frontend set it."""

    index: int
    num: int = 0
    addr: Optional[p.VringAddr] = None
    base: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    started: bool = False
    enabled: bool = False
    queue: Optional[Queue] = None
    stats: Optional[metrics.QueueStats] = None
    resumed: bool = False          # built over a ring with history: interrupt once when it goes live

    @property
    def active(self) -> bool:
        return self.started and self.enabled and self.queue is not None

    def signal(self) -> None:
        """Interrupt the driver through the call eventfd."""
        if self.call_fd >= 0:
            try:
                os.eventfd_write(self.call_fd, 1)
            except OSError:
                pass


class BackendSession:
    def __init__(self, device: VirtioDevice, hooks: SessionHooks,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES) -> None:
        self.device = device
        self.hooks = hooks
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0
        self.features = 0
        self.owner = False
        self.mem = GuestMemory()
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.backend_req_fd = -1
        # The inflight area (INFLIGHT_SHMFD): mapped from the frontend's fd, kept across rings' restarts.
        self.inflight_map: Optional[mmap.mmap] = None
        self.inflight_queue_size = 0
        self.inflight_num_queues = 0
        device.mem = self.mem  # type: ignore[attr-defined]
        device.config_changed = self.notify_config_change

    # -- helpers ----------------------------------------------------------
    @property
    def protocol_features_negotiated(self) -> bool:
        return bool(self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES))

    def has_protocol(self, f: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << f))

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"ring index {index} out of range (device has {len(self.vrings)})")
        return self.vrings[index]

    def _count(self, msg: Message) -> None:
        metrics.VHOST_USER_MESSAGES.labels(self.device.vm, self.device.label, msg.name).inc()

    # -- dispatch ---------------------------------------------------------
    def handle(self, msg: Message) -> list[Message]:
        """Apply one message; return the replies to send (possibly none).

        A request the session rejects raises ProtocolError unless the
        frontend asked for an ack, in which case the ack carries the failure.
        """
        self._count(msg)
        try:
            return self._dispatch(msg)
        finally:
            # Handlers pop the fds they keep; whatever is left is not ours to hold.
            for fd in msg.fds:
                _close(fd)
            msg.fds = []

    def _dispatch(self, msg: Message) -> list[Message]:
        handler = getattr(self, f"_on_{msg.name.lower()}", None)
        reply: Optional[bytes]
        try:
            if handler is None:
                raise ProtocolError(f"unsupported request {msg.name}")
            reply = handler(msg)
        except (ProtocolError, GuestAddressError, ValueError, OSError) as e:
            metrics.count_error(self.device.vm, self.device.label, "vhost_user_" + msg.name.lower())
            if msg.request == Request.GET_CONFIG:
                # libvhost-user's convention: a config reply of size 0 means failure.
                log.warning("GET_CONFIG failed: %s", e)
                return [p.reply_to(msg, p.CONFIG_HDR.pack(0, 0, 0))]
            if msg.need_reply and self.has_protocol(ProtocolFeature.REPLY_ACK) and msg.request not in p.REQUESTS_WITH_REPLY:
                log.warning("%s failed: %s", msg.name, e)
                return [p.reply_to(msg, p.encode_u64(1))]
            if isinstance(e, ProtocolError):
                raise
            raise ProtocolError(f"{msg.name}: {e}") from e
        if reply is not None:
            r = p.reply_to(msg, reply)
            r.fds = getattr(msg, "reply_fds", [])
            return [r]
        if msg.need_reply and self.has_protocol(ProtocolFeature.REPLY_ACK):
            return [p.reply_to(msg, p.encode_u64(0))]
        return []

    # -- features ---------------------------------------------------------
    def _on_get_features(self, msg: Message) -> bytes:
        return p.encode_u64(self.device.device_features())

    def _on_set_features(self, msg: Message) -> None:
        features = p.decode_u64(msg.payload, "features")
        offered = self.device.device_features()
        if features & ~offered:
            raise ProtocolError(f"frontend acked features {features & ~offered:#x} that were not offered")
        self.features = features
        log.info("%s: frontend acked features %#x", self.device.label, features)
        self.device.set_features(features)
        for vr in self.vrings:
            if vr.queue is not None:
                vr.queue.event_idx = bool(features & (1 << VIRTIO_F_EVENT_IDX))
                vr.queue.indirect = bool(features & (1 << VIRTIO_F_INDIRECT_DESC))
        if not features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            # "Upon receiving SET_FEATURES without F_PROTOCOL_FEATURES the back-end must enable all rings
            # immediately" -- and a ring already started then runs: watch its kick.
            for vr in self.vrings:
                if not vr.enabled:
                    vr.enabled = True
                    if vr.started:
                        self._start(vr)
        return None

    def _on_get_protocol_features(self, msg: Message) -> bytes:
        return p.encode_u64(self.offered_protocol_features)

    def _on_set_protocol_features(self, msg: Message) -> None:
        pf = p.decode_u64(msg.payload, "protocol features")
        # Per the spec the backend must not fail on unknown bits it never offered;
        # keep only what we offered.
        self.protocol_features = pf & self.offered_protocol_features
        return None

    def _on_set_owner(self, msg: Message) -> None:
        self.owner = True
        return None

    def _on_reset_owner(self, msg: Message) -> None:
        self.reset()
        return None

    def _on_reset_device(self, msg: Message) -> None:
        self.reset()
        return None

    def _on_set_backend_req_fd(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise ProtocolError("SET_BACKEND_REQ_FD needs exactly one fd")
        if self.backend_req_fd >= 0:
            _close(self.backend_req_fd)
        self.backend_req_fd = msg.fds.pop()
        return None

    def notify_config_change(self) -> bool:
        """Tell the frontend the config space changed (BACKEND_CONFIG_CHANGE_MSG).

        Returns False when there is no channel (the frontend did not negotiate
        BACKEND_REQ); the frontend then only sees changes when it reads config.
        """
        if self.backend_req_fd < 0 or not self.has_protocol(ProtocolFeature.CONFIG):
            return False
        data = p.HEADER.pack(p.BackendRequest.CONFIG_CHANGE_MSG, p.VHOST_USER_VERSION, 0)
        try:
            os.write(self.backend_req_fd, data)
        except OSError as e:
            log.warning("config-change notification failed: %s", e)
            return False
        return True

    def _on_get_queue_num(self, msg: Message) -> bytes:
        return p.encode_u64(self.device.num_queues)

    def _on_get_max_mem_slots(self, msg: Message) -> bytes:
        return p.encode_u64(MAX_MEM_SLOTS)

    # -- memory -----------------------------------------------------------
    def _on_set_mem_table(self, msg: Message) -> None:
        regions = p.decode_mem_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise ProtocolError(f"SET_MEM_TABLE with {len(regions)} regions but {len(msg.fds)} fds")
        new = GuestMemory()
        try:
            for r in regions:
                fd = msg.fds.pop(0)  # map_fd owns it from here, even on failure
                region = GuestMemory.map_fd(fd, r.guest_phys_addr, r.memory_size,
                                            r.userspace_addr, r.mmap_offset)
                try:
                    new.add_region(region)
                except ValueError:
                    region.close()
                    raise
        except (OSError, ValueError):
            new.close()
            raise
        self._replace_memory(new)
        return None

    def _on_add_mem_reg(self, msg: Message) -> None:
        r = p.decode_single_region(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError("ADD_MEM_REG needs exactly one fd")
        for reg in self.mem.regions:
            if (reg.gpa, reg.size, reg.user_addr) == (r.guest_phys_addr, r.memory_size, r.userspace_addr):
                # QEMU sends the same region once per vhost_dev (e.g. per net queue pair).
                return None
        if len(self.mem.regions) >= MAX_MEM_SLOTS:
            raise ProtocolError("no free memory slot")
        region = GuestMemory.map_fd(msg.fds.pop(), r.guest_phys_addr, r.memory_size,
                                    r.userspace_addr, r.mmap_offset)
        try:
            self.mem.add_region(region)
        except ValueError:
            region.close()
            raise
        self._remap_rings()
        return None

    def _on_rem_mem_reg(self, msg: Message) -> None:
        r = p.decode_single_region(msg.payload)
        for reg in self.mem.regions:
            if reg.gpa == r.guest_phys_addr and reg.size == r.memory_size and reg.user_addr == r.userspace_addr:
                self.mem.regions.remove(reg)
                self._remap_rings()
                reg.close()
                return None
        raise ProtocolError(f"REM_MEM_REG of unknown region at {r.guest_phys_addr:#x}")

    def _replace_memory(self, new: GuestMemory) -> None:
        old = self.mem
        # The device keeps a reference to the GuestMemory object; swap contents in place.
        old_regions = old.regions
        old.regions = []
        for reg in new.regions:
            old.add_region(reg)
        new.regions = []
        self._remap_rings()
        for reg in old_regions:
            reg.close()

    def _remap_rings(self) -> None:
        """Rebuild live rings over the new memory table; the device hears about it.

        The device drops its reference to the old Queue (queue_stopped) before
        its views are released and gets the new one (queue_started); a ring the
        new table no longer maps is stopped, its kick fd unwatched.
        """
        for vr in self.vrings:
            old = vr.queue
            if old is None:
                continue
            was_active = vr.active
            if was_active:
                self.device.queue_stopped(vr.index)
            state = (old.next_avail, old.next_used, old.inflight, old.resubmit)
            old.release()
            vr.queue = None
            try:
                vr.queue = self._build_queue(vr, state[0], state[1])
            except GuestAddressError as e:
                log.warning("ring %d no longer mapped after memory change: %s", vr.index, e)
                if was_active and vr.kick_fd >= 0:
                    self.hooks.unwatch_kick(vr.index, vr.kick_fd)
                vr.started = False
                vr.base = state[0]
                continue
            vr.queue.inflight, vr.queue.resubmit = state[2], state[3]
            if was_active:
                self.device.queue_started(vr.index, vr.queue)

    # -- rings ------------------------------------------------------------
    def _on_set_vring_num(self, msg: Message) -> None:
        st = p.decode_vring_state(msg.payload)
        vr = self._vring(st.index)
        if st.num == 0 or st.num > 32768 or st.num & (st.num - 1):
            raise ProtocolError(f"invalid ring size {st.num}")
        vr.num = st.num
        return None

    def _on_set_vring_addr(self, msg: Message) -> None:
        a = p.decode_vring_addr(msg.payload)
        vr = self._vring(a.index)
        vr.addr = a
        if vr.started:
            self._start(vr)
        return None

    def _on_set_vring_base(self, msg: Message) -> None:
        st = p.decode_vring_state(msg.payload)
        vr = self._vring(st.index)
        vr.base = st.num & 0xFFFF
        return None

    def _on_get_vring_base(self, msg: Message) -> bytes:
        st = p.decode_vring_state(msg.payload)
        vr = self._vring(st.index)
        base = vr.queue.next_avail if vr.queue is not None else vr.base
        self._stop(vr)
        vr.base = base
        # Like libvhost-user: the ring's fds die with it; a restart brings new ones.
        for attr in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(vr, attr)
            if fd >= 0:
                _close(fd)
                setattr(vr, attr, -1)
        return p.encode_vring_state(vr.index, base)

    def _take_fd(self, msg: Message) -> tuple[Vring, int]:
        index, has_fd = p.vring_fd_index(msg.payload)
        if index >= len(self.vrings):
            raise ProtocolError(f"ring index {index} out of range")
        vr = self.vrings[index]
        if has_fd:
            if len(msg.fds) != 1:
                raise ProtocolError(f"{msg.name} expected one fd, got {len(msg.fds)}")
            return vr, msg.fds.pop()
        if msg.fds:
            raise ProtocolError(f"{msg.name} with the no-fd flag carried {len(msg.fds)} fds")
        return vr, -1

    def _on_set_vring_kick(self, msg: Message) -> None:
        vr, fd = self._take_fd(msg)
        if fd < 0:
            # Refused before anything changes: a running ring keeps its kick fd and its watcher.
            raise ProtocolError("polling mode (SET_VRING_KICK without fd) is not supported")
        if vr.kick_fd >= 0:
            if vr.active:
                self.hooks.unwatch_kick(vr.index, vr.kick_fd)
            _close(vr.kick_fd)
        vr.kick_fd = fd
        vr.started = True
        if not self.protocol_features_negotiated:
            vr.enabled = True
        self._start(vr)
        return None

    def _on_set_vring_call(self, msg: Message) -> None:
        vr, fd = self._take_fd(msg)
        if vr.call_fd >= 0:
            _close(vr.call_fd)
        vr.call_fd = fd
        return None

    def _on_set_vring_err(self, msg: Message) -> None:
        vr, fd = self._take_fd(msg)
        if vr.err_fd >= 0:
            _close(vr.err_fd)
        vr.err_fd = fd
        return None

    def _on_set_vring_enable(self, msg: Message) -> None:
        st = p.decode_vring_state(msg.payload)
        vr = self._vring(st.index)
        # DPDK's virtio_user sends this even without VHOST_USER_F_PROTOCOL_FEATURES;
        # libvhost-user accepts it, and so do we.
        if st.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE with value {st.num}")
        was_active = vr.active
        vr.enabled = bool(st.num)
        if vr.enabled and vr.started:
            self._start(vr)
        elif was_active and not vr.enabled:
            self.hooks.unwatch_kick(vr.index, vr.kick_fd)
            self.device.queue_stopped(vr.index)
        return None

    def _build_queue(self, vr: Vring, next_avail: int, next_used: Optional[int]) -> Queue:
        a = vr.addr
        assert a is not None
        n = vr.num
        desc = self.mem.translate_user(a.desc_user_addr, 16 * n)
        avail = self.mem.translate_user(a.avail_user_addr, 6 + 2 * n)
        used = self.mem.translate_user(a.used_user_addr, 6 + 8 * n)
        if next_used is None:
            next_used = int.from_bytes(used[2:4], "little")
        return Queue(self.mem, n, desc, avail, used,
                     event_idx=bool(self.features & (1 << VIRTIO_F_EVENT_IDX)),
                     indirect=bool(self.features & (1 << VIRTIO_F_INDIRECT_DESC)),
                     next_avail=next_avail, next_used=next_used)

    def _start(self, vr: Vring) -> None:
        """Make the ring live if it has everything it needs; (re)watch its kick fd."""
        if not vr.started or vr.addr is None or vr.num == 0:
            return
        if vr.queue is None:
            vr.queue = self._build_queue(vr, vr.base, None)
            self._attach_inflight(vr, vr.queue)
            vr.resumed = vr.queue.next_used != 0
            if vr.stats is None:
                vr.stats = metrics.QueueStats(self.device.vm, self.device.label, str(vr.index))
        if vr.enabled and vr.kick_fd >= 0:
            self.hooks.watch_kick(vr.index, vr.kick_fd)
            self.device.queue_started(vr.index, vr.queue)
            if vr.resumed:
                # A backend that died between publishing used entries and writing the call
                # eventfd left the driver waiting for an interrupt that never comes (a guest
                # at queue depth 1 then hangs for good). One spurious interrupt is harmless.
                vr.resumed = False
                vr.signal()

    def _stop(self, vr: Vring) -> None:
        if vr.active and vr.kick_fd >= 0:
            self.hooks.unwatch_kick(vr.index, vr.kick_fd)
        if vr.queue is not None:
            self.device.queue_stopped(vr.index)
            vr.queue.release()
            vr.queue = None
        vr.started = False

    # -- inflight I/O tracking (INFLIGHT_SHMFD) -------------------------------
    def _on_get_inflight_fd(self, msg: Message) -> bytes:
        _, _, num_queues, queue_size = inflight.decode_payload(msg.payload)
        if not 1 <= num_queues <= len(self.vrings) or queue_size == 0 or queue_size > 32768 \
                or queue_size & (queue_size - 1):
            raise ProtocolError(f"GET_INFLIGHT_FD for {num_queues} queue(s) of {queue_size}")
        size = inflight.area_size(num_queues, queue_size)
        fd = os.memfd_create("simvirt-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            area = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(area)
        for i in range(num_queues):
            q = inflight.InflightQueue(inflight.queue_view(view, i, queue_size), queue_size)  # type: ignore[arg-type]
            q.reset()
            q.release()
        view.release()
        self._set_inflight(area, num_queues, queue_size)
        msg.reply_fds = [fd]  # type: ignore[attr-defined]
        return inflight.encode_payload(size, 0, num_queues, queue_size)

    def _on_set_inflight_fd(self, msg: Message) -> None:
        mmap_size, mmap_offset, num_queues, queue_size = inflight.decode_payload(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_INFLIGHT_FD carried {len(msg.fds)} fds, expected 1")
        if not 1 <= num_queues <= len(self.vrings) or queue_size == 0 or queue_size > 32768:
            raise ProtocolError(f"SET_INFLIGHT_FD for {num_queues} queue(s) of {queue_size}")
        need = inflight.area_size(num_queues, queue_size)
        if mmap_size < need or mmap_size > MAX_INFLIGHT_AREA or mmap_offset % mmap.PAGESIZE \
                or mmap_offset > MAX_INFLIGHT_OFFSET:
            raise ProtocolError(f"SET_INFLIGHT_FD area of {mmap_size} bytes at {mmap_offset} (need {need})")
        area = mmap.mmap(msg.fds[0], mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=mmap_offset)
        self._set_inflight(area, num_queues, queue_size)
        return None

    def _set_inflight(self, area: mmap.mmap, num_queues: int, queue_size: int) -> None:
        self._drop_inflight()
        self.inflight_map = area
        self.inflight_num_queues = num_queues
        self.inflight_queue_size = queue_size

    def _drop_inflight(self) -> None:
        if self.inflight_map is not None:
            for vr in self.vrings:
                if vr.queue is not None and vr.queue.inflight is not None:
                    vr.queue.inflight.release()
                    vr.queue.inflight = None
            try:
                self.inflight_map.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with the process
            self.inflight_map = None

    def _attach_inflight(self, vr: Vring, queue: Queue) -> None:
        """Give a starting ring its inflight region; resubmit what a dead backend left."""
        if self.inflight_map is None or vr.index >= self.inflight_num_queues or vr.num > self.inflight_queue_size:
            return
        view = inflight.queue_view(memoryview(self.inflight_map), vr.index, self.inflight_queue_size)
        if view is None:
            return
        iq = inflight.InflightQueue(view, vr.num)
        if not iq.initialised():
            iq.reset()
        try:
            pending = iq.recover(queue.next_used)
        except inflight.InflightError as e:
            # The frontend's area is garbage: nothing in it can be trusted to resubmit.
            log.warning("%s: queue %d: inflight area unusable (%s); starting it afresh", self.device.label,
                        vr.index, e)
            metrics.count_error(self.device.vm, self.device.label, "inflight_corrupt")
            iq.reset()
            pending = []
        queue.inflight = iq
        if pending:
            # libvhost-user's rule: everything before used_idx + inflight was taken.
            queue.next_avail = (queue.next_used + len(pending)) & 0xFFFF
            again = self.device.recover_inflight(vr.index, queue, list(pending))
            queue.resubmit = again
            log.info("%s: queue %d: %d request(s) the previous backend took and never finished; resubmitting %d",
                     self.device.label, vr.index, len(pending), len(again))
            if again:
                metrics.count_error(self.device.vm, self.device.label, "inflight_resubmitted", len(again))

    def _on_get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = p.decode_config(msg.payload)
        data = self.device.read_config(offset, size)
        return p.encode_config(offset, data, flags)

    def _on_set_config(self, msg: Message) -> None:
        offset, size, flags, data = p.decode_config(msg.payload)
        self.device.write_config(offset, data)
        return None

    def _on_set_vring_endian(self, msg: Message) -> None:
        raise ProtocolError("cross-endian rings are not supported (VERSION_1 is little-endian)")

    # -- teardown ---------------------------------------------------------
    def reset(self) -> None:
        for vr in self.vrings:
            self._stop(vr)
            for attr in ("kick_fd", "call_fd", "err_fd"):
                fd = getattr(vr, attr)
                if fd >= 0:
                    _close(fd)
            self.vrings[vr.index] = Vring(vr.index, stats=vr.stats)
        self.features = 0
        self.device.reset()

    def close(self) -> None:
        self.reset()
        self._drop_inflight()
        if self.backend_req_fd >= 0:
            _close(self.backend_req_fd)
            self.backend_req_fd = -1
        self.mem.close()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
