"""vhost-user wire codec (sans-IO) and the socket edge (recv/send with SCM_RIGHTS)."""
from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.protocol import Message, MessageParser, ProtocolError, Request
from simvirt.vhost_user.transport import Disconnected, recv_message, send_message


# ---------------------------------------------------------------------------
# messages and the incremental parser
# ---------------------------------------------------------------------------
def test_header_layout():
    m = Message(Request.SET_VRING_NUM, p.VHOST_USER_VERSION, p.encode_vring_state(1, 256))
    raw = m.encode()
    assert raw[:12] == struct.pack("=III", 8, 1, 8) and len(raw) == 20
    assert m.name == "SET_VRING_NUM" and not m.need_reply and not m.is_reply
    assert Message(999).name == "UNKNOWN(999)"


def test_reply_flags():
    req = Message(Request.GET_FEATURES, p.VHOST_USER_VERSION | p.VHOST_USER_NEED_REPLY_MASK)
    assert req.need_reply
    r = p.reply_to(req, p.encode_u64(7))
    assert r.request == Request.GET_FEATURES and r.flags == 0x5 and r.is_reply and not r.need_reply
    assert p.decode_u64(r.payload) == 7


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([1, 5, 9, 13]),
                          st.binary(max_size=300)), min_size=1, max_size=6),
       st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_parser_round_trip_any_chunking(msgs, cuts):
    stream = b"".join(Message(r, f, pl).encode() for r, f, pl in msgs)
    parser = MessageParser()
    out = []
    pos = 0
    k = 0
    while pos < len(stream):
        n = cuts[k % len(cuts)]
        k += 1
        out += parser.feed(stream[pos:pos + n])
        pos += n
    assert [(m.request, m.flags, m.payload) for m in out] == [(r, f, pl) for r, f, pl in msgs]
    assert parser.feed(b"") == []


def test_parser_byte_at_a_time_and_partial_header():
    parser = MessageParser()
    raw = Message(Request.SET_FEATURES, 1, p.encode_u64(0x1234)).encode()
    for b in raw[:-1]:
        assert parser.feed(bytes([b])) == []
    (m,) = parser.feed(raw[-1:])
    assert p.decode_u64(m.payload) == 0x1234


def test_parser_attaches_fds_to_a_message():
    parser = MessageParser()
    raw = Message(Request.SET_VRING_KICK, 1, p.encode_u64(0)).encode()
    assert parser.feed(raw[:5], fds=[42]) == []
    (m,) = parser.feed(raw[5:])
    assert m.fds == [42]
    assert parser.pending_fds() == []


def test_parser_fds_belong_to_the_message_whose_header_they_came_with():
    """The module's contract: fds received with a header attach to the message that header starts.

    Here the first message's tail and the second message's head (with its fd)
    arrive in one read, exactly as a unix-socket recvmsg can deliver them.
    """
    parser = MessageParser()
    first = Message(Request.SET_VRING_NUM, 1, p.encode_vring_state(0, 8)).encode()
    second = Message(Request.SET_VRING_KICK, 1, p.encode_u64(0)).encode()
    assert parser.feed(first[:14]) == []
    m1, m2 = parser.feed(first[14:] + second, fds=[77])
    assert m1.request == Request.SET_VRING_NUM and m2.request == Request.SET_VRING_KICK
    assert (m1.fds, m2.fds) == ([], [77])


@pytest.mark.parametrize("flags", [0, 2, 3, 0x4, 0x8])
def test_parser_bad_version(flags):
    with pytest.raises(ProtocolError, match="version"):
        MessageParser().feed(struct.pack("=III", 1, flags, 0))


def test_parser_rejects_oversize_before_payload_arrives():
    parser = MessageParser()
    with pytest.raises(ProtocolError, match="exceeds"):
        parser.feed(struct.pack("=III", 5, 1, p.MAX_PAYLOAD + 1))  # header alone is enough
    ok = MessageParser()
    assert ok.feed(struct.pack("=III", 5, 1, p.MAX_PAYLOAD)) == []  # the limit itself is fine


# ---------------------------------------------------------------------------
# payload encoders and decoders
# ---------------------------------------------------------------------------
@given(st.integers(0, 2**64 - 1))
def test_u64_round_trip(v):
    assert p.decode_u64(p.encode_u64(v)) == v


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_vring_state_round_trip(i, n):
    assert p.decode_vring_state(p.encode_vring_state(i, n)) == (i, n)


@given(st.tuples(*[st.integers(0, 2**32 - 1)] * 2, *[st.integers(0, 2**64 - 1)] * 4))
def test_vring_addr_round_trip(t):
    a = p.VringAddr(*t)
    assert p.decode_vring_addr(p.encode_vring_addr(a)) == a


@given(st.lists(st.tuples(*[st.integers(0, 2**64 - 1)] * 4), min_size=1, max_size=p.VHOST_MEMORY_MAX_NREGIONS))
def test_mem_table_round_trip(regions):
    rs = [p.MemRegion(*r) for r in regions]
    payload = p.encode_mem_table(rs)
    assert len(payload) == 8 + 32 * len(rs)
    assert p.decode_mem_table(payload) == rs


@given(st.integers(0, 255), st.binary(max_size=256), st.integers(0, 2**32 - 1))
def test_config_round_trip(offset, data, flags):
    assert p.decode_config(p.encode_config(offset, data, flags)) == (offset, len(data), flags, data)


def test_single_region_and_vring_fd_index():
    payload = struct.pack("=Q", 0) + p.MEM_REGION.pack(1, 2, 3, 4)
    assert p.decode_single_region(payload) == (1, 2, 3, 4)
    assert p.vring_fd_index(p.encode_u64(3)) == (3, True)
    assert p.vring_fd_index(p.encode_u64(3 | p.VHOST_USER_VRING_NOFD_MASK)) == (3, False)
    assert p.vring_fd_index(p.encode_u64(0x1FF)) == (0xFF, False)


@pytest.mark.parametrize("decoder,payload", [
    (p.decode_u64, b""),
    (p.decode_u64, b"\0" * 7),
    (p.decode_vring_state, b"\0" * 7),
    (p.decode_vring_addr, b"\0" * 39),
    (p.decode_mem_table, b"\0" * 7),
    (p.decode_mem_table, struct.pack("=II", 0, 0)),                           # no regions
    (p.decode_mem_table, struct.pack("=II", 9, 0) + b"\0" * 32 * 9),           # too many
    (p.decode_mem_table, struct.pack("=II", 2, 0) + b"\0" * 32),               # says 2, carries 1
    (p.decode_mem_table, struct.pack("=II", 1, 0) + b"\0" * 31),
    (p.decode_single_region, b"\0" * 39),
    (p.decode_config, b"\0" * 11),
    (p.decode_config, p.CONFIG_HDR.pack(0, 8, 0) + b"\0" * 7),                # data shorter than size
    (p.decode_config, p.CONFIG_HDR.pack(0, 257, 0) + b"\0" * 257),            # more than config space
    (p.vring_fd_index, b"\0" * 4),
])
def test_decoders_reject_short_or_bad_payloads(decoder, payload):
    with pytest.raises(ProtocolError):
        decoder(payload)


# ---------------------------------------------------------------------------
# socket edge
# ---------------------------------------------------------------------------
@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_send_recv_with_fds(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        send_message(a, Message(Request.SET_VRING_CALL, 1, p.encode_u64(0)), [w])
        send_message(a, Message(Request.GET_FEATURES, 1))
        m = recv_message(b)
        assert m.request == Request.SET_VRING_CALL and len(m.fds) == 1
        os.write(m.fds[0], b"x")  # the received fd is the pipe's write end
        assert os.read(r, 1) == b"x"
        os.close(m.fds[0])
        m2 = recv_message(b)
        assert m2.request == Request.GET_FEATURES and m2.fds == [] and m2.payload == b""
    finally:
        os.close(r)
        os.close(w)


def test_recv_payload_in_pieces(pair):
    a, b = pair
    raw = Message(Request.SET_VRING_ADDR, 1, bytes(range(40))).encode()
    a.sendall(raw[:3])
    import threading
    t = threading.Timer(0.05, lambda: (a.sendall(raw[3:20]), a.sendall(raw[20:])))
    t.start()
    m = recv_message(b)
    t.join()
    assert m.payload == bytes(range(40))


@pytest.mark.parametrize("header", [
    struct.pack("=III", 1, 0, 0),                        # version 0
    struct.pack("=III", 1, 1, p.MAX_PAYLOAD + 1),        # oversize
])
def test_recv_bad_header_closes_received_fds(pair, header):
    a, b = pair
    r, w = os.pipe()
    try:
        a.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ProtocolError):
            recv_message(b)
        assert set(os.listdir("/proc/self/fd")) == before  # the passed fd did not leak
    finally:
        os.close(r)
        os.close(w)


def test_recv_disconnects(pair):
    a, b = pair
    a.sendall(struct.pack("=III", 1, 1, 8) + b"\0" * 3)  # truncated payload, then EOF
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(Disconnected):
        recv_message(b)
    with pytest.raises(Disconnected):
        recv_message(b)
