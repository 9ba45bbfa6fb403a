"""Bad vhost-user messages against a real ``simvirt device blk`` process.

A rejected request is answered with a failing REPLY_ACK (or ignored) and the
connection stays usable; a request that needs a reply the device cannot give
makes it drop the connection, after which a new frontend connects and works.
"""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.frontend import BackendError, VhostUserFrontend
from simvirt.vhost_user.protocol import Message, Request
from simvirt.vhost_user.transport import Disconnected, recv_message, send_message
from simvirt.memory import GuestMemory
from simvirt.virtio.spec import VIRTIO_F_VERSION_1, bit

from simvirt_testlib import MiB, Device, device_works, frontend_handshake

@pytest.fixture(scope="module")
def device():
    d = Device(["--memory", "16M"], metrics=True)
    yield d
    d.stop()


@pytest.fixture
def fe(device):
    f, _ = frontend_handshake(device.socket_path)
    yield f
    f.close()
    assert device.alive, device.log()


def ack_request(fe: VhostUserFrontend, request: int, payload: bytes = b"", fds=None) -> int:
    send_message(fe.sock, Message(request, p.VHOST_USER_VERSION | p.VHOST_USER_NEED_REPLY_MASK, payload), fds)
    reply = recv_message(fe.sock)
    assert reply.request == request and reply.flags == 0x5
    return p.decode_u64(reply.payload)


def assert_usable(fe: VhostUserFrontend) -> None:
    assert fe.get_features() & bit(VIRTIO_F_VERSION_1)
    assert fe.get_queue_num() == 1


def assert_dropped(sock: socket.socket) -> None:
    sock.settimeout(5)
    try:
        data = sock.recv(64)
    except (ConnectionError, OSError):
        return
    assert data == b"", f"expected the device to hang up, got {data!r}"


# ---------------------------------------------------------------------------
# rejected, connection kept
# ---------------------------------------------------------------------------
def test_unknown_request_is_nacked(device, fe):
    before = device.errors("vhost_user_unknown(999)")
    assert ack_request(fe, 999, b"\0" * 8) != 0
    assert_usable(fe)
    assert device.errors("vhost_user_unknown(999)") == before + 1


def test_unknown_request_without_ack_is_ignored(device, fe):
    send_message(fe.sock, Message(999, p.VHOST_USER_VERSION, b"junk"))
    send_message(fe.sock, Message(12345, p.VHOST_USER_VERSION))
    assert_usable(fe)  # the next reply on the socket belongs to GET_FEATURES


@pytest.mark.parametrize("num", [0, 3, 100, 1000, 65536])
def test_set_vring_num_not_power_of_two_or_too_big(device, fe, num):
    before = device.errors("vhost_user_set_vring_num")
    with pytest.raises(BackendError):
        fe.set_vring_num(0, num)
    assert device.errors("vhost_user_set_vring_num") == before + 1
    fe.set_vring_num(0, 128)
    assert_usable(fe)


@pytest.mark.parametrize("call", [
    lambda fe: fe.set_vring_num(1, 8),
    lambda fe: fe.set_vring_base(7, 0),
    lambda fe: fe.set_vring_addr(9, 0, 0, 0),
    lambda fe: fe.set_vring_enable(3, True),
    lambda fe: fe.set_vring_call(200, None),
    lambda fe: fe.set_vring_kick(5, os.eventfd(0)),
], ids=["num", "base", "addr", "enable", "call", "kick"])
def test_ring_index_out_of_range(device, fe, call):
    with pytest.raises(BackendError):
        call(fe)
    assert_usable(fe)


@pytest.mark.parametrize("req,payload", [
    (Request.SET_FEATURES, b""),
    (Request.SET_VRING_NUM, b"\0" * 4),
    (Request.SET_VRING_BASE, b"\0" * 7),
    (Request.SET_VRING_ADDR, b"\0" * 16),
    (Request.SET_MEM_TABLE, struct.pack("=II", 2, 0) + b"\0" * 32),
    (Request.SET_VRING_ENABLE, b"\0"),
    (Request.SET_CONFIG, b"\0" * 4),
], ids=lambda v: v.name if isinstance(v, Request) else None)
def test_truncated_payload_is_nacked(device, fe, req, payload):
    assert ack_request(fe, req, payload) != 0
    assert_usable(fe)


def test_other_refusals(device, fe):
    with pytest.raises(BackendError):
        fe.set_features(bit(63))  # never offered
    with pytest.raises(BackendError):
        fe.set_vring_kick(0, None)  # polling mode
    with pytest.raises(BackendError):
        fe.request(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 2))  # neither 0 nor 1
    with pytest.raises(BackendError):
        fe.get_config(250, 16)  # outside the config window: a size-0 reply
    with pytest.raises(BackendError):
        fe.set_config(0, b"\0" * 8)  # capacity is read-only
    with pytest.raises(BackendError):
        fe.request(Request.SET_VRING_ENDIAN, p.encode_vring_state(0, 1))
    assert_usable(fe)


def test_bad_memory_tables_are_nacked(device, fe):
    mem = GuestMemory.create_shared(1 * MiB)
    try:
        r = mem.regions[0]
        table = p.encode_mem_table([p.MemRegion(0, 1 * MiB, r.user_addr, 0)])
        with pytest.raises(BackendError):
            fe.request(Request.SET_MEM_TABLE, table)  # no fd
        with pytest.raises(BackendError):
            fe.request(Request.SET_MEM_TABLE, table, [r.fd, r.fd])  # two fds
        big = p.encode_mem_table([p.MemRegion(0, 8 * MiB, r.user_addr, 0)])
        with pytest.raises(BackendError):
            fe.request(Request.SET_MEM_TABLE, big, [r.fd])  # larger than the segment
        fe.set_mem_table(mem)  # and a good one still works
        assert_usable(fe)
    finally:
        mem.close()


def test_absurd_region_size_is_nacked_not_dropped(device, fe):
    """A region size that does not fit in ssize_t must be refused like any other bad size."""
    mem = GuestMemory.create_shared(1 * MiB)
    try:
        r = mem.regions[0]
        table = p.encode_mem_table([p.MemRegion(0, 2**64 - 4096, r.user_addr, 0)])
        with pytest.raises(BackendError):
            fe.request(Request.SET_MEM_TABLE, table, [r.fd])
        assert_usable(fe)
    finally:
        mem.close()


def test_bad_set_config_without_reply_ack_keeps_connection(device):
    """Without REPLY_ACK a refused request can only be ignored; like a bad SET_VRING_NUM,
    a bad SET_CONFIG must not cost the frontend its connection."""
    fe, _ = frontend_handshake(device.socket_path, protocol=0)
    try:
        fe.set_vring_num(0, 3)  # refused, ignored
        assert_usable(fe)
        fe.set_config(0, b"\xff" * 8)  # refused, ignored
        assert_usable(fe)
    finally:
        fe.close()
    assert device.alive


# ---------------------------------------------------------------------------
# dropped, device accepts the next frontend
# ---------------------------------------------------------------------------
def _raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


@pytest.mark.parametrize("payload", [p.encode_vring_state(5, 0), p.encode_vring_state(2**32 - 1, 0), b"\0\0"],
                         ids=["index_5", "index_max", "truncated"])
def test_get_vring_base_bad_index_drops_then_reconnect_works(device, fe, payload):
    before = device.errors("vhost_user_get_vring_base")
    send_message(fe.sock, Message(Request.GET_VRING_BASE, p.VHOST_USER_VERSION, payload))
    assert_dropped(fe.sock)
    fe.close()
    assert device.alive
    assert device.errors("vhost_user_get_vring_base") == before + 1
    device_works(device.socket_path)


@pytest.mark.parametrize("raw", [
    struct.pack("=III", Request.GET_FEATURES, 0, 0),                       # version 0
    struct.pack("=III", Request.GET_FEATURES, 0x2, 0),                     # version 2
    struct.pack("=III", Request.SET_FEATURES, 1, p.MAX_PAYLOAD + 1),       # oversize
    struct.pack("=III", Request.SET_FEATURES, 1, 0xFFFFFFFF),
], ids=["version0", "version2", "oversize", "size_max_u32"])
def test_malformed_header_drops_then_reconnect_works(device, raw):
    before = device.errors("vhost_user_malformed")
    s = _raw_connect(device.socket_path)
    try:
        s.sendall(raw)
        assert_dropped(s)
    finally:
        s.close()
    assert device.alive
    assert device.errors("vhost_user_malformed") == before + 1
    device_works(device.socket_path)


@pytest.mark.parametrize("raw", [
    struct.pack("=II", Request.GET_FEATURES, 1),                           # half a header
    struct.pack("=III", Request.SET_FEATURES, 1, 8) + b"\0" * 3,           # half a payload
    b"",                                                                     # nothing at all
])
def test_truncated_message_then_hangup(device, raw):
    s = _raw_connect(device.socket_path)
    s.sendall(raw)
    s.close()
    assert device.alive
    device_works(device.socket_path)


def test_second_frontend_waits_for_the_first(device, fe):
    other = VhostUserFrontend(device.socket_path, timeout=0.3)
    other.connect()
    try:
        with pytest.raises(socket.timeout):
            other.get_features()  # queued behind the first frontend
        fe.close()
        other.sock.settimeout(5)
        reply = recv_message(other.sock)  # answered once the first hangs up
        assert reply.request == Request.GET_FEATURES and p.decode_u64(reply.payload) & bit(VIRTIO_F_VERSION_1)
    finally:
        other.close()


def _settled_fd_count(device: Device) -> int:
    """fds of the device with exactly one idle, served frontend connected."""
    f, _ = frontend_handshake(device.socket_path)
    try:
        assert_usable(f)
        time.sleep(0.05)
        return device.open_fds()
    finally:
        f.close()


def test_refused_fds_do_not_leak(device):
    baseline = _settled_fd_count(device)
    mem = GuestMemory.create_shared(1 * MiB)
    try:
        r = mem.regions[0]
        for _ in range(3):
            f, _ = frontend_handshake(device.socket_path)
            try:
                with pytest.raises(BackendError):
                    f.set_vring_kick(9, r.fd)
                with pytest.raises(BackendError):
                    f.request(Request.SET_VRING_CALL, p.encode_u64(0 | p.VHOST_USER_VRING_NOFD_MASK), [r.fd])
                with pytest.raises(BackendError):
                    f.request(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, MiB, r.user_addr, 0)]), [r.fd, r.fd])
                with pytest.raises(BackendError):
                    f.request(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, 64 * MiB, r.user_addr, 0)]), [r.fd])
                # Last: a region whose size overflows ssize_t.
                try:
                    f.request(Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, 2**64 - 4096, r.user_addr, 0)]), [r.fd])
                except (BackendError, Disconnected, OSError):
                    pass
            finally:
                f.close()
    finally:
        mem.close()
    assert device.alive
    assert _settled_fd_count(device) == baseline
