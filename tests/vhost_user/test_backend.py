"""BackendSession in process: message semantics, ring life cycle, fd ownership, acks."""
from __future__ import annotations

import itertools
import os
import socket
import struct

import pytest

from simvirt import metrics
from simvirt.devices.blk import spec as blk
from simvirt.devices.blk.device import BlkDevice
from simvirt.devices.blk.storage import MemoryStorage
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.backend import BackendSession
from simvirt.vhost_user.protocol import Message, ProtocolError, ProtocolFeature, Request
from simvirt.virtio.driver_queue import DriverQueue
from simvirt_testlib import RecordingHooks, is_open
from simvirt.virtio.spec import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    bit,
)

_labels = itertools.count()
RAM = 1 << 20


Hooks = RecordingHooks


def msg(req, payload=b"", fds=(), ack=False) -> Message:
    flags = p.VHOST_USER_VERSION | (p.VHOST_USER_NEED_REPLY_MASK if ack else 0)
    return Message(int(req), flags, payload, list(fds))


class Env:
    """A session over a blk device plus the 'driver' memory it is told about."""

    def __init__(self, num_queues: int = 2, reply_ack: bool = True) -> None:
        self.label = f"be{next(_labels)}"
        self.dev = BlkDevice(MemoryStorage(RAM), num_queues=num_queues, label=self.label)
        self.hooks = Hooks()
        self.s = BackendSession(self.dev, self.hooks)
        self.mem = GuestMemory.create_shared(RAM)
        self.alloc = PageAllocator(0, RAM)
        if reply_ack:
            self.ok(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ)))

    def handle(self, req, payload=b"", fds=(), ack=False) -> list[Message]:
        return self.s.handle(msg(req, payload, fds, ack))

    def ack(self, req, payload=b"", fds=()) -> int:
        (r,) = self.handle(req, payload, fds, ack=True)
        assert r.request == int(req) and r.flags == 0x5
        return p.decode_u64(r.payload)

    def ok(self, req, payload=b"", fds=()) -> None:
        assert self.ack(req, payload, fds) == 0

    def errors(self, reason: str) -> float:
        return metrics.REGISTRY.get_sample_value(
            "simvirt_errors_total", {"vm": "standalone", "device": self.label, "reason": reason}) or 0.0

    def region_fd(self) -> int:
        return os.dup(self.mem.regions[0].fd)

    def set_mem_table(self) -> None:
        r = self.mem.regions[0]
        self.ok(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, RAM, r.user_addr, 0)]), [self.region_fd()])

    def setup_ring(self, index: int = 0, size: int = 8, *, kick: bool = True) -> tuple[DriverQueue, int, int]:
        dq = DriverQueue(self.mem, self.alloc, size)
        u = self.mem.gpa_to_user
        self.ok(Request.SET_VRING_NUM, p.encode_vring_state(index, size))
        self.ok(Request.SET_VRING_BASE, p.encode_vring_state(index, 0))
        self.ok(Request.SET_VRING_ADDR, p.encode_vring_addr(p.VringAddr(index, 0, u(dq.desc_gpa), u(dq.used_gpa), u(dq.avail_gpa), 0)))
        call = os.eventfd(0, os.EFD_NONBLOCK)
        self.ok(Request.SET_VRING_CALL, p.encode_u64(index), [call])
        kfd = -1
        if kick:
            kfd = os.eventfd(0, os.EFD_NONBLOCK)
            self.ok(Request.SET_VRING_KICK, p.encode_u64(index), [kfd])
        return dq, kfd, call

    def close(self) -> None:
        self.s.close()
        self.mem.close()


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)


# ---------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------
def test_features(env):
    (r,) = env.handle(Request.GET_FEATURES)
    offered = p.decode_u64(r.payload)
    assert r.flags == 0x5 and offered & FEATURES == FEATURES
    assert offered & bit(blk.VIRTIO_BLK_F_FLUSH) and not offered & bit(blk.VIRTIO_BLK_F_RO)
    env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES))
    assert env.s.features == FEATURES and env.dev.acked_features == FEATURES


def test_set_features_refuses_bits_not_offered(env):
    before = env.errors("vhost_user_set_features")
    assert env.ack(Request.SET_FEATURES, p.encode_u64(FEATURES | bit(63))) == 1
    with pytest.raises(ProtocolError):
        env.handle(Request.SET_FEATURES, p.encode_u64(bit(63)))
    assert env.s.features == 0
    assert env.errors("vhost_user_set_features") == before + 2


def test_protocol_features_are_masked_to_the_offer(env):
    (r,) = env.handle(Request.GET_PROTOCOL_FEATURES)
    offered = p.decode_u64(r.payload)
    assert offered & bit(ProtocolFeature.REPLY_ACK) and offered & bit(ProtocolFeature.CONFIG)
    env.ok(Request.SET_PROTOCOL_FEATURES, p.encode_u64(2**64 - 1))
    assert env.s.protocol_features == offered


def test_no_ack_without_reply_ack_negotiated():
    e = Env(reply_ack=False)
    try:
        assert e.handle(Request.SET_OWNER, ack=True) == []  # NEED_REPLY is ignored without REPLY_ACK
        (r,) = e.handle(Request.GET_QUEUE_NUM, ack=True)     # real replies still come
        assert p.decode_u64(r.payload) == 2
    finally:
        e.close()


# ---------------------------------------------------------------------------
# memory table
# ---------------------------------------------------------------------------
def test_mem_table_maps_the_drivers_memory(env):
    env.set_mem_table()
    env.mem.write(0x1234, b"shared!")
    assert env.s.mem.read(0x1234, 7) == b"shared!"
    env.s.mem.write(0x2000, b"back")
    assert env.mem.read(0x2000, 4) == b"back"
    assert env.dev.mem is env.s.mem  # the device sees the same table


def test_mem_table_replacement_keeps_the_device_object(env):
    env.set_mem_table()
    mem_obj = env.s.mem
    other = GuestMemory.create_shared(RAM, gpa=0x100000)
    try:
        other.write(0x100000, b"new")
        r = other.regions[0]
        env.ok(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0x100000, RAM, r.user_addr, 0)]), [os.dup(r.fd)])
        assert env.s.mem is mem_obj and env.dev.mem is mem_obj
        assert mem_obj.read(0x100000, 3) == b"new"
        with pytest.raises(ValueError):
            mem_obj.read(0, 1)  # the old region is gone
    finally:
        other.close()


def test_mem_table_fd_count_mismatch_closes_all_fds(env):
    fds = [env.region_fd(), env.region_fd()]
    r = env.mem.regions[0]
    assert env.ack(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, RAM, r.user_addr, 0)]), fds) == 1
    assert not any(is_open(fd) for fd in fds)
    assert env.ack(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, RAM, r.user_addr, 0)])) == 1


@pytest.mark.parametrize("size,offset", [
    (RAM * 2, 0),                 # region larger than the fd's file
    (RAM, RAM),                   # offset pushes it past the end
    (0, 0),                       # empty region
    (2**63 - 4096, 0),            # absurd but representable as ssize_t
    (2**64 - 4096, 0),            # does not even fit in ssize_t
    (RAM, 2**64 - 4096),
])
def test_mem_table_bad_region_is_refused_and_fd_closed(env, size, offset):
    env.set_mem_table()
    env.mem.write(0x10, b"old")
    fd = env.region_fd()
    r = env.mem.regions[0]
    status = env.ack(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, size, r.user_addr, offset)]), [fd])
    assert status != 0
    assert not is_open(fd), "the refused region's fd leaked"
    assert env.s.mem.read(0x10, 3) == b"old"  # the previous table stays in force


def test_overlapping_regions_refused(env):
    r = env.mem.regions[0]
    regions = [p.MemRegion(0, RAM, r.user_addr, 0), p.MemRegion(RAM // 2, RAM // 2, r.user_addr + RAM, 0)]
    fds = [env.region_fd(), env.region_fd()]
    assert env.ack(Request.SET_MEM_TABLE, p.encode_mem_table(regions), fds) == 1
    assert not any(is_open(fd) for fd in fds)


def test_add_and_remove_memory_region(env):
    env.set_mem_table()
    other = GuestMemory.create_shared(RAM, gpa=0x400000)
    try:
        r = other.regions[0]
        payload = struct.pack("=Q", 0) + p.MEM_REGION.pack(0x400000, RAM, r.user_addr, 0)
        env.ok(Request.ADD_MEM_REG, payload, [os.dup(r.fd)])
        other.write(0x400010, b"two")
        assert env.s.mem.read(0x400010, 3) == b"two"
        dup = os.dup(r.fd)
        env.ok(Request.ADD_MEM_REG, payload, [dup])  # the same region again: accepted once
        assert not is_open(dup) and len(env.s.mem.regions) == 2
        assert env.ack(Request.ADD_MEM_REG, payload) == 1  # no fd
        env.ok(Request.REM_MEM_REG, payload)
        assert len(env.s.mem.regions) == 1
        assert env.ack(Request.REM_MEM_REG, payload) == 1  # already gone
    finally:
        other.close()


# ---------------------------------------------------------------------------
# rings
# ---------------------------------------------------------------------------
def test_ring_life_cycle_with_protocol_features(env):
    env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES))
    env.set_mem_table()
    dq, kick, call = env.setup_ring(0)
    vr = env.s.vrings[0]
    assert vr.started and not vr.enabled and not vr.active
    assert env.hooks.watched == {}  # started but disabled: not processed
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 1))
    assert vr.active and env.hooks.watched == {0: kick}
    assert vr.queue.event_idx and vr.queue.indirect
    # The device serves a request posted by the driver.
    buf = env.alloc.alloc(4096)
    env.mem.write(buf, blk.OUTHDR.pack(blk.VIRTIO_BLK_T_GET_ID, 0, 0))
    dq.add([(buf, 16)], [(buf + 64, 20), (buf + 128, 1)], token="id")
    dq.publish()
    env.dev.process_queue(0, vr.queue, vr.stats)
    assert dq.pop_used() == [("id", 21)]
    assert env.mem.read(buf + 64, 20) == b"simvirt".ljust(20, b"\0") and env.mem.read(buf + 128, 1) == b"\0"
    # Disable, then re-enable.
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 0))
    assert env.hooks.watched == {} and not vr.active
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 1))
    assert env.hooks.watched == {0: kick}
    # GET_VRING_BASE stops the ring, reports where the device got to, and closes the ring's fds.
    (r,) = env.handle(Request.GET_VRING_BASE, p.encode_vring_state(0, 0))
    assert p.decode_vring_state(r.payload) == (0, 1)
    assert env.hooks.watched == {} and not vr.started and vr.queue is None
    assert not is_open(kick) and not is_open(call)


def test_ring_restart_resumes_at_base(env):
    env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES & ~bit(VHOST_USER_F_PROTOCOL_FEATURES)))
    env.set_mem_table()
    dq, kick, call = env.setup_ring(1, size=16)
    vr = env.s.vrings[1]
    assert vr.active and env.hooks.watched == {1: kick}  # no protocol features: enabled on kick
    env.ok(Request.SET_VRING_BASE, p.encode_vring_state(1, 0x1FFFF))  # only 16 bits count
    assert vr.base == 0xFFFF


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 2**32 - 1])
def test_set_vring_num_invalid(env, num):
    assert env.ack(Request.SET_VRING_NUM, p.encode_vring_state(0, num)) == 1
    assert env.s.vrings[0].num == 0


@pytest.mark.parametrize("req,payload", [
    (Request.SET_VRING_NUM, p.encode_vring_state(2, 8)),
    (Request.SET_VRING_NUM, p.encode_vring_state(2**32 - 1, 8)),
    (Request.SET_VRING_BASE, p.encode_vring_state(5, 0)),
    (Request.SET_VRING_ADDR, p.encode_vring_addr(p.VringAddr(9, 0, 0, 0, 0, 0))),
    (Request.SET_VRING_ENABLE, p.encode_vring_state(2, 1)),
    (Request.SET_VRING_CALL, p.encode_u64(7 | p.VHOST_USER_VRING_NOFD_MASK)),
])
def test_ring_index_out_of_range(env, req, payload):
    before = env.errors("vhost_user_" + req.name.lower())
    assert env.ack(req, payload) == 1
    assert env.errors("vhost_user_" + req.name.lower()) == before + 1


def test_ring_fd_requests_close_refused_fds(env):
    fd = os.eventfd(0)
    assert env.ack(Request.SET_VRING_KICK, p.encode_u64(5), [fd]) == 1  # index out of range
    assert not is_open(fd)
    fd = os.eventfd(0)
    assert env.ack(Request.SET_VRING_CALL, p.encode_u64(0 | p.VHOST_USER_VRING_NOFD_MASK), [fd]) == 1
    assert not is_open(fd)
    fds = [os.eventfd(0), os.eventfd(0)]
    assert env.ack(Request.SET_VRING_ERR, p.encode_u64(0), fds) == 1  # two fds for one ring
    assert not any(is_open(f) for f in fds)
    assert env.ack(Request.SET_VRING_CALL, p.encode_u64(0)) == 1  # fd promised, none sent


def test_kick_without_fd_is_refused(env):
    assert env.ack(Request.SET_VRING_KICK, p.encode_u64(0 | p.VHOST_USER_VRING_NOFD_MASK)) == 1
    assert not env.s.vrings[0].started


def test_set_vring_enable_bad_value(env):
    assert env.ack(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 2)) == 1


def test_ring_addresses_outside_memory(env):
    env.set_mem_table()
    env.ok(Request.SET_VRING_NUM, p.encode_vring_state(0, 8))
    env.ok(Request.SET_VRING_ADDR, p.encode_vring_addr(p.VringAddr(0, 0, 0xdead0000, 0xdead1000, 0xdead2000, 0)))
    kick = os.eventfd(0)
    assert env.ack(Request.SET_VRING_KICK, p.encode_u64(0), [kick]) == 1
    assert env.s.vrings[0].queue is None and env.hooks.watched == {}


def test_truncated_payloads(env):
    for req, payload in [(Request.SET_FEATURES, b"\0" * 4), (Request.SET_VRING_NUM, b"\0" * 4),
                         (Request.SET_VRING_ADDR, b"\0" * 16), (Request.SET_MEM_TABLE, b"\1\0\0\0"),
                         (Request.SET_VRING_KICK, b""), (Request.SET_CONFIG, b"\0" * 8)]:
        assert env.ack(req, payload) == 1, req.name


def test_requests_with_replies_raise_instead_of_acking(env):
    # A GET_* request whose reply cannot be produced must not be answered with an "ack":
    # the frontend expects a payload of the request's own shape.
    with pytest.raises(ProtocolError):
        env.handle(Request.GET_VRING_BASE, p.encode_vring_state(9, 0), ack=True)
    with pytest.raises(ProtocolError):
        env.handle(Request.GET_VRING_BASE, b"\0", ack=True)


def test_unknown_and_unsupported_requests(env):
    assert env.ack(999) == 1
    assert env.ack(Request.SET_VRING_ENDIAN, p.encode_vring_state(0, 1)) == 1
    with pytest.raises(ProtocolError):
        env.handle(999)
    assert env.errors("vhost_user_unknown(999)") == 2


# ---------------------------------------------------------------------------
# config space
# ---------------------------------------------------------------------------
def test_get_config(env):
    (r,) = env.handle(Request.GET_CONFIG, p.encode_config(0, bytes(blk.CONFIG.size)))
    off, size, flags, data = p.decode_config(r.payload)
    cfg = blk.CONFIG.unpack(data)
    assert (off, size) == (0, blk.CONFIG.size)
    assert cfg[0] == RAM // 512 and cfg[13] == 2  # capacity, num_queues
    (r,) = env.handle(Request.GET_CONFIG, p.encode_config(8, bytes(4)))
    assert p.decode_config(r.payload)[3] == struct.pack("<I", 1 << 20)  # size_max
    (r,) = env.handle(Request.GET_CONFIG, p.encode_config(200, bytes(56)))
    assert p.decode_config(r.payload)[3] == bytes(56)  # past our struct: zeros


@pytest.mark.parametrize("offset,size", [(250, 16), (256, 1), (2**32 - 1, 1)])
def test_get_config_outside_window_replies_size_zero(env, offset, size):
    (r,) = env.handle(Request.GET_CONFIG, p.encode_config(offset, bytes(size)), ack=True)
    assert r.flags == 0x5 and p.CONFIG_HDR.unpack(r.payload[:12])[1] == 0


def test_set_config_writeback_only(env):
    env.ok(Request.SET_CONFIG, p.encode_config(blk.CONFIG_WRITEBACK_OFFSET, b"\0"))
    assert env.dev.writeback == 0
    (r,) = env.handle(Request.GET_CONFIG, p.encode_config(blk.CONFIG_WRITEBACK_OFFSET, b"\0"))
    assert p.decode_config(r.payload)[3] == b"\0"
    assert env.ack(Request.SET_CONFIG, p.encode_config(0, b"\xff" * 8)) == 1  # capacity is read-only
    assert env.ack(Request.SET_CONFIG, p.encode_config(blk.CONFIG_WRITEBACK_OFFSET, b"\1\1")) == 1
    env.ok(Request.SET_CONFIG, p.encode_config(blk.CONFIG_WRITEBACK_OFFSET, b"\7"))
    assert env.dev.writeback == 1


# ---------------------------------------------------------------------------
# rejection contract and teardown
# ---------------------------------------------------------------------------
def _bad_vring_num(e):
    return msg(Request.SET_VRING_NUM, p.encode_vring_state(0, 3))


def _bad_set_config(e):
    return msg(Request.SET_CONFIG, p.encode_config(0, b"\xff"))


def _mem_table_too_big(e):
    r = e.mem.regions[0]
    return msg(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, 4 * RAM, r.user_addr, 0)]), [e.region_fd()])


@pytest.mark.parametrize("make", [_bad_vring_num, _bad_set_config, _mem_table_too_big],
                         ids=["set_vring_num", "set_config", "set_mem_table"])
def test_rejected_request_without_ack_raises_protocol_error(make):
    """handle()'s documented contract: "A request the session rejects raises ProtocolError
    unless the frontend asked for an ack". The server relies on it: anything else is
    treated as an internal error and the frontend is dropped."""
    e = Env(reply_ack=False)
    try:
        m = make(e)
        fds = list(m.fds)
        with pytest.raises(ProtocolError):
            e.s.handle(m)
        assert not any(is_open(fd) for fd in fds)
    finally:
        e.close()


def test_reset_and_close_release_everything(env):
    env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES))
    env.set_mem_table()
    env.ok(Request.SET_CONFIG, p.encode_config(blk.CONFIG_WRITEBACK_OFFSET, b"\0"))
    dq, kick, call = env.setup_ring(0)
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 1))
    env.ok(Request.RESET_DEVICE)
    assert env.s.features == 0 and env.dev.writeback == 1 and env.dev.acked_features == 0
    assert not is_open(kick) and not is_open(call) and env.hooks.watched == {}
    vr = env.s.vrings[0]
    assert (vr.num, vr.addr, vr.started, vr.enabled, vr.queue) == (0, None, False, False, None)
    dq2, kick2, call2 = env.setup_ring(1)
    region_fd = env.s.mem.regions[0].fd
    env.s.close()
    assert not is_open(kick2) and not is_open(call2) and not is_open(region_fd)
    assert env.s.mem.regions == []


def test_config_change_notification_channel(env):
    assert env.s.notify_config_change() is False  # no channel yet
    a, b = socket.socketpair()
    try:
        env.ok(Request.SET_BACKEND_REQ_FD, b"", [os.dup(a.fileno())])
        assert env.s.notify_config_change() is False  # CONFIG not negotiated
        env.ok(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)))
        env.dev.config_changed()  # the device's hook goes through the session
        b.settimeout(2)
        req, flags, size = p.HEADER.unpack(b.recv(64))
        assert (req, flags & p.VHOST_USER_VERSION_MASK, size) == (p.BackendRequest.CONFIG_CHANGE_MSG, 1, 0)
        assert env.ack(Request.SET_BACKEND_REQ_FD) == 1  # needs exactly one fd
    finally:
        a.close()
        b.close()
