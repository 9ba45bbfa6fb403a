"""Hypothesis fuzzers for the vhost-user layer (issue: "fuzzers for vhost-user messages: sizes, fds, orders").

* ``simvirt.vhost_user.protocol.MessageParser`` (the sans-IO codec): random
  byte streams fed in random pieces with fds attached at random offsets,
  random splits of valid streams, truncated headers, sizes over
  ``MAX_PAYLOAD``. It returns well-formed messages or raises its one
  documented error, ``ProtocolError``; fds go to the message the module
  docstring says they belong to, and none is lost or duplicated.
* ``simvirt.vhost_user.transport.recv_message`` over a real socketpair:
  random messages with random fd counts (0..10, more than ``MAX_FDS``)
  attached to random pieces: only ``ProtocolError``/``Disconnected`` come
  out, and no received fd leaks (``/proc/self/fd`` before/after).
* ``simvirt.vhost_user.backend.BackendSession`` over a blk and a net device:
  random sequences of valid-looking and malformed requests in random order
  (SET_VRING_ADDR before SET_MEM_TABLE, out-of-range ring indices, bogus
  regions and fds, huge GET_CONFIG sizes, kicks with and without fds,
  memory-table changes under running rings, GET/SET_INFLIGHT_FD with areas
  of any size, offset and content...), with simulated kicks and, for net,
  frames arriving from the peer. After every request: ``handle()`` raised
  nothing but ``ProtocolError`` and only where its documented contract
  allows (``server.py`` treats anything else as an internal error and drops
  the frontend); replies are well-formed (request number, flags 0x5, shape
  per request, fds only with GET_INFLIGHT_FD); every fd passed in is either
  owned by the session or closed; the kick watchers the session asked its
  hooks for match its rings, and every ring it processes is watched and has
  stats; the device keeps serving. After ``close()`` every fd is closed and
  the process holds exactly the fds it held before.

Every finding is kept as a ``test_regression_*`` test: the property that found
it, with the minimal failing example pinned with ``@example``. Fixed in commit
fa23eb6 (plain regression tests now): (4) the parser lost the fds of messages
completed in a feed() that then hit a bad header; (5) memory-table changes
left NetDevice holding a released Queue (ValueError out of deliver()); (6) a
ring unmapped by a memory-table change stayed watched and its kick fd was
closed under the watcher; (7) SET_FEATURES without protocol features enabled
started rings without watching their kick fds; (8) a refused no-fd
SET_VRING_KICK closed the running ring's kick fd. Fixed later: (10)
SET_INFLIGHT_FD with an mmap offset >= 2**63 raised OverflowError out of
handle() (offsets are now bounded and refused); (11) an inflight area that
recover() refused left the ring half-started (the area is now reset and the
ring starts).

Budget: bounded examples per property (``fuzz_testlib.fuzz_settings``), no
example database. For longer local runs set ``SIMVIRT_FUZZ_EXAMPLES=N``
(e.g. ``SIMVIRT_FUZZ_EXAMPLES=5000``): every property then runs N examples.
"""
from __future__ import annotations

import array
import gc
import itertools
import logging
import os
import random
import socket
import struct
from dataclasses import dataclass
from typing import Optional

import pytest
from hypothesis import example, given, note, strategies as st

from simvirt.devices.blk import spec as blk
from simvirt.devices.blk.device import BlkDevice
from simvirt.devices.blk.storage import MemoryStorage
from simvirt.devices.net.device import NetDevice
from simvirt.memory import GuestMemory
from simvirt.net import packets as pk
from simvirt.net import spec as ns
from simvirt.vhost_user import inflight
from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.backend import BackendSession
from simvirt.vhost_user.protocol import Message, MessageParser, ProtocolError, ProtocolFeature, Request
from simvirt.vhost_user.transport import Disconnected, recv_message
from simvirt.virtio.errors import VirtqueueError
from simvirt.virtio.spec import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

from fuzz_testlib import fuzz_settings
from simvirt_testlib import RecordingHooks, is_open

_labels = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def _quiet_logs_and_cleanup():
    logger = logging.getLogger("simvirt")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(old)
    if DriverRam._inst is not None:
        DriverRam._inst.close()
        DriverRam._inst = None


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def assert_no_new_fds(before: set[int]) -> None:
    """No fd opened since ``before`` is still open (collecting garbage first if some seem to be)."""
    if open_fds() - before:
        gc.collect()  # a cycle may still hold an mmap (and its dup'ed fd)
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)} -> {[os.readlink(f'/proc/self/fd/{fd}') for fd in sorted(leaked)]}"


# ===========================================================================
# 1. MessageParser
# ===========================================================================
@dataclass
class Chunk:
    data: bytes
    nfds: int


def fd_model(starts: list[int], chunks: list[Chunk]) -> tuple[list[list[int]], list[int]]:
    """Where the module docstring says fds go.

    "fds belong to the message whose header starts at or after the stream
    offset where they arrived": fds fed with the chunk at offset ``o`` go to
    the first message starting at ``>= o``; later ones stay pending. Fds are
    numbered 1000, 1001... in feeding order.
    """
    per_msg: list[list[int]] = [[] for _ in starts]
    pending: list[int] = []
    off = 0
    fd = 1000
    for c in chunks:
        fds = list(range(fd, fd + c.nfds))
        fd += c.nfds
        target = next((k for k, s in enumerate(starts) if s >= off), None)
        if target is None:
            pending += fds
        else:
            per_msg[target] += fds
        off += len(c.data)
    return per_msg, pending


valid_message = st.tuples(
    st.one_of(st.sampled_from(list(Request)).map(int), st.integers(0, 2**32 - 1)),
    st.sampled_from([1, 1 | p.VHOST_USER_NEED_REPLY_MASK, 1 | p.VHOST_USER_REPLY_MASK, 0xFFFFFFFD, 0x1 | 0x10]),
    st.one_of(st.binary(max_size=64), st.integers(0, p.MAX_PAYLOAD).map(lambda n: bytes(n % 251) * (n // 251 + 1))
              .map(lambda b: b[:p.MAX_PAYLOAD])),
)


@st.composite
def chunked(draw, stream: bytes) -> list[Chunk]:
    """``stream`` cut at random points (empty pieces allowed), random fd counts on random pieces."""
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return [Chunk(stream[a:b], draw(st.sampled_from([0, 0, 0, 1, 2, 8]))) for a, b in zip(bounds, bounds[1:])]


def feed_all(parser: MessageParser, chunks: list[Chunk]) -> tuple[list[Message], Optional[ProtocolError], list[int]]:
    """Feed every chunk; stop at the first ProtocolError. Returns (messages, error, fds fed so far)."""
    out: list[Message] = []
    fd = 1000
    fed: list[int] = []
    for c in chunks:
        fds = list(range(fd, fd + c.nfds))
        fd += c.nfds
        fed += fds
        try:
            out += parser.feed(c.data, fds or None)
        except ProtocolError as e:
            return out, e, fed
        # Anything but ProtocolError propagates and fails the test.
    return out, None, fed


@fuzz_settings(300)
@given(st.lists(valid_message, max_size=6).flatmap(
    lambda msgs: st.tuples(st.just(msgs), chunked(b"".join(Message(r, f, pl).encode() for r, f, pl in msgs)))))
def test_fuzz_parser_valid_streams_any_split_any_fds(args):
    msgs, chunks = args
    starts = []
    off = 0
    for r, f, pl in msgs:
        starts.append(off)
        off += p.HEADER_SIZE + len(pl)
    parser = MessageParser()
    out, err, fed = feed_all(parser, chunks)
    assert err is None, f"valid stream refused: {err}"
    assert [(m.request, m.flags, m.payload) for m in out] == msgs
    want_fds, want_pending = fd_model(starts, chunks)
    assert [m.fds for m in out] == want_fds
    assert parser.pending_fds() == want_pending
    assert parser.feed(b"") == []


junk_stream = st.one_of(
    st.binary(max_size=200),
    # valid messages with corrupted header words spliced in
    st.lists(st.one_of(valid_message.map(lambda t: Message(*t).encode()),
                       st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                 st.one_of(st.integers(0, 2**32 - 1), st.integers(p.MAX_PAYLOAD - 2, p.MAX_PAYLOAD + 2)))
                       .map(lambda t: struct.pack("=III", *t)),
                       st.binary(max_size=16)), max_size=6).map(b"".join),
)


def check_parser_on_junk(stream: bytes, chunks: list[Chunk]) -> None:
    parser = MessageParser()
    out, err, fed = feed_all(parser, chunks)
    for m in out:
        assert len(m.payload) <= p.MAX_PAYLOAD
        assert m.flags & p.VHOST_USER_VERSION_MASK == p.VHOST_USER_VERSION
    # The messages returned are exactly a prefix of the stream, header by header.
    pos = 0
    for m in out:
        assert stream[pos:pos + p.HEADER_SIZE + len(m.payload)] == m.encode()
        pos += p.HEADER_SIZE + len(m.payload)
    pending = parser.pending_fds()
    attached = [fd for m in out for fd in m.fds]
    everything = attached + pending
    assert len(everything) == len(set(everything)), "an fd was handed out twice"
    assert set(everything) <= set(fed), "the parser invented an fd"
    # After the last feed (or the error), every fd received is either in a returned
    # message or still pending (for the caller to close): none may be lost.
    assert sorted(everything) == sorted(fed), f"fds lost: {sorted(set(fed) - set(everything))}"


@st.composite
def junk_case(draw) -> tuple[bytes, list[Chunk]]:
    stream = draw(junk_stream)
    return stream, draw(chunked(stream))


@fuzz_settings(300)
@given(junk_case())
def test_fuzz_parser_random_streams_only_protocol_error(case):
    check_parser_on_junk(*case)


_KICK = Message(Request.SET_VRING_KICK, 1, p.encode_u64(0)).encode()
_BAD_VERSION = struct.pack("=III", 1, 0, 0)


@fuzz_settings(30)
@example(case=(_KICK + _BAD_VERSION, [Chunk(_KICK + _BAD_VERSION, 1)]))
@example(case=(_KICK * 2 + struct.pack("=III", 1, 1, p.MAX_PAYLOAD + 1), [Chunk(_KICK, 1), Chunk(_KICK, 2),
                                                                           Chunk(struct.pack("=III", 1, 1, 4097), 1)]))
@given(junk_case())
def test_regression_parser_error_keeps_fds_of_completed_messages(case):
    """Finding 4: MessageParser.feed() moved the fds of each message it completed from its pending
    list into the message; when a later header in the same feed() was bad it raised ProtocolError,
    the completed messages were discarded with their fds, and pending_fds() no longer returned
    them: the fds leaked (the caller could neither see nor close them)."""
    check_parser_on_junk(*case)


@fuzz_settings(200)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 11),
       st.binary(max_size=40))
def test_fuzz_parser_header_checks(request, flags, size, prefix, payload):
    header = struct.pack("=III", request, flags, size)
    parser = MessageParser()
    # A truncated header is never an error and never a message.
    assert parser.feed(header[:prefix]) == []
    bad_version = flags & p.VHOST_USER_VERSION_MASK != p.VHOST_USER_VERSION
    if size > p.MAX_PAYLOAD or bad_version:
        # Refused as soon as the header is complete, before any payload arrives.
        with pytest.raises(ProtocolError):
            parser.feed(header[prefix:])
        return
    assert parser.feed(header[prefix:]) == ([] if size else [Message(request, flags, b"")])
    if size:
        got = parser.feed(payload[:size])
        if len(payload) >= size:
            assert got == [Message(request, flags, payload[:size])]
        else:
            assert got == []


# ===========================================================================
# 2. the socket edge: recv_message with real SCM_RIGHTS
# ===========================================================================
@st.composite
def wire_messages(draw) -> list[tuple[bytes, int, list[int]]]:
    """[(bytes of one message, fds attached, cut points)]: valid or broken headers, random fd counts."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            data = struct.pack("=III", draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                               draw(st.integers(0, 2**32 - 1)))
        elif kind == 1:  # payload shorter than announced, then the peer closes
            data = struct.pack("=III", 1, 1, draw(st.integers(1, 64))) + draw(st.binary(max_size=8))
        else:
            r, f, pl = draw(valid_message)
            data = Message(r, f & ~0x2 | 1, pl).encode()
        nfds = draw(st.sampled_from([0, 0, 1, 2, 8, 9, 10]))
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=2))) if len(data) > 1 else []
        out.append((data, nfds, cuts))
    return out


def is_well_formed(data: bytes) -> bool:
    if len(data) < p.HEADER_SIZE:
        return False
    _, flags, size = struct.unpack_from("=III", data)
    return flags & 3 == 1 and size <= p.MAX_PAYLOAD and len(data) == p.HEADER_SIZE + size


def reference_parse(stream: bytes) -> list[Message]:
    out = []
    pos = 0
    while pos + p.HEADER_SIZE <= len(stream):
        r, f, size = struct.unpack_from("=III", stream, pos)
        if f & 3 != 1 or size > p.MAX_PAYLOAD or pos + p.HEADER_SIZE + size > len(stream):
            break
        out.append(Message(r, f, stream[pos + p.HEADER_SIZE:pos + p.HEADER_SIZE + size]))
        pos += p.HEADER_SIZE + size
    return out


@fuzz_settings(200)
@given(wire_messages(), st.booleans())
def test_fuzz_recv_message_typed_errors_no_fd_leak(msgs, fds_on_first_piece):
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        b.settimeout(5)
        expect = []
        for data, nfds, cuts in msgs:
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
            pieces = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)]) if j > i]
            carrier = 0 if fds_on_first_piece else len(pieces) - 1
            for k, piece in enumerate(pieces):
                if k == carrier and fds:
                    try:
                        a.sendmsg([piece], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    except OSError:  # more fds than the kernel takes in one message (SCM_MAX_FD is 253)
                        a.sendall(piece)
                else:
                    a.sendall(piece)
            for fd in fds:
                os.close(fd)
            expect.append((data, nfds if fds_on_first_piece else None))
        a.close()
        got: list[Message] = []
        while True:
            try:
                m = recv_message(b)
            except (Disconnected, ProtocolError):
                break
            # Anything else (struct.error, ValueError, socket.timeout...) fails the test.
            got.append(m)
            for fd in m.fds:
                os.close(fd)
            assert len(m.fds) <= p.MAX_FDS
        # What was received is what a plain sequential parse of the byte stream gives, up to
        # the first broken header; fds sent with the first piece of a well-formed message
        # (all earlier messages well-formed too) arrive with it, at most MAX_FDS of them.
        want = reference_parse(b"".join(data for data, _ in expect))
        assert [m.encode() for m in got] == [m.encode() for m in want[:len(got)]]
        assert len(got) >= len(want) - 1 or len(got) == len(want)
        aligned = True
        for k, (data, nfds) in enumerate(expect):
            aligned = aligned and is_well_formed(data)
            if not aligned or k >= len(got) or nfds is None:
                break
            assert len(got[k].fds) == min(nfds, p.MAX_FDS)
    finally:
        a.close()
        b.close()
    assert_no_new_fds(before)


# ===========================================================================
# 3. BackendSession: random request sequences
# ===========================================================================
RAM = 1 << 20
OTHER_GPA = 0x400000
RING_BASE, RING_STRIDE = 0x1000, 0x4000  # ring i: desc, avail (+0x1000), used (+0x2000)
FD_BASE = None  # handed fds live at FD_BASE + k, above anything the process opens on its own


def _fd_base() -> int:
    global FD_BASE
    if FD_BASE is None:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        FD_BASE = max(max(open_fds()) + 64, min(512, soft - 300))
        assert FD_BASE + 250 < soft, "RLIMIT_NOFILE too low for the fd fuzzer"
    return FD_BASE


class DriverRam:
    """The 'guest': RAM the frontend shares (main at gpa 0, other at OTHER_GPA), created once."""

    _inst: Optional["DriverRam"] = None

    def __init__(self) -> None:
        self.main = GuestMemory.create_shared(RAM)
        self.other = GuestMemory.create_shared(RAM, gpa=OTHER_GPA)

    @classmethod
    def get(cls) -> "DriverRam":
        if cls._inst is None:
            cls._inst = cls()
        return cls._inst

    def close(self) -> None:
        self.main.close()
        self.other.close()

    def ring(self, i: int) -> tuple[int, int, int]:
        d = RING_BASE + RING_STRIDE * i
        return d, d + 0x1000, d + 0x2000

    def reset_rings(self, kind: str) -> None:
        m = self.main
        m.write(0, bytes(RING_BASE + RING_STRIDE * 3))
        for i in range(3):
            desc, avail, used = self.ring(i)
            buf = 0x20000 + 0x4000 * i
            if kind == "blk":
                m.write(buf, blk.OUTHDR.pack(blk.VIRTIO_BLK_T_GET_ID, 0, 0))
                segs = [(buf, 16, VIRTQ_DESC_F_NEXT, 1), (buf + 0x100, 20, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2),
                        (buf + 0x200, 1, VIRTQ_DESC_F_WRITE, 0)]
            elif i == 0:  # net rx: one receive buffer
                segs = [(buf, 2048, VIRTQ_DESC_F_WRITE, 0)]
            elif i == 1:  # net tx: one broadcast ARP frame
                frame = ns.VirtioNetHdr().pack() + pk.pad_frame(pk.arp_frame(
                    1, pk.parse_mac("52:54:00:12:34:56"), pk.ip_bytes("10.0.2.15"), bytes(6), pk.ip_bytes("10.0.2.2")))
                m.write(buf, frame)
                segs = [(buf, len(frame), 0, 0)]
            else:  # net ctrl: promiscuous on
                m.write(buf, bytes([ns.VIRTIO_NET_CTRL_RX, ns.VIRTIO_NET_CTRL_RX_PROMISC, 1]))
                segs = [(buf, 3, VIRTQ_DESC_F_NEXT, 1), (buf + 0x100, 1, VIRTQ_DESC_F_WRITE, 0)]
            for k, s in enumerate(segs):
                m.write(desc + 16 * k, struct.pack("<QIHH", *s))
            m.write(avail, struct.pack("<HHH", 0, 1, 0))


_DEVICES: dict = {}


def device(kind: str):
    if kind not in _DEVICES:
        if kind == "blk":
            _DEVICES[kind] = BlkDevice(MemoryStorage(RAM), num_queues=2, label=f"fuzz-vu-blk{next(_labels)}")
        else:
            _DEVICES[kind] = NetDevice(mac=pk.parse_mac("52:54:00:12:34:56"), label=f"fuzz-vu-net{next(_labels)}")
    return _DEVICES[kind]


@dataclass(frozen=True)
class Op:
    """One step: a request (materialised against the live session), a kick, or a peer frame."""

    kind: str
    a: int = 0
    b: int = 0
    c: int = 0
    ack: bool = False
    fds: tuple = ()
    trunc: Optional[int] = None  # cut the payload to this many bytes
    regions: tuple = ()  # SET_MEM_TABLE: region selectors (see Frontend.region)


FD_KINDS = ["eventfd", "eventfd", "pipe", "shm_main", "shm_other", "memfd_small", "socket"]
IDX = st.one_of(st.integers(0, 3), st.sampled_from([255, 256, 2**32 - 1]))
U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**64 - 1]))
some_fds = st.lists(st.sampled_from(FD_KINDS), max_size=2).map(tuple)
ring_fds = st.one_of(st.just(("eventfd",)), st.just(()), st.lists(st.sampled_from(["eventfd", "pipe"]), max_size=2).map(tuple))
trunc = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 60))

op_strategy = st.one_of(
    st.builds(Op, st.just("features"), st.integers(0, 3), U64, ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("protocol_features"), st.integers(0, 2), U64, ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("mem_table"), st.just(0), st.integers(0, 3), ack=st.booleans(),
              fds=st.lists(st.sampled_from(FD_KINDS), max_size=3).map(tuple), trunc=trunc,
              regions=st.lists(st.integers(0, 9), max_size=4).map(tuple)),
    st.builds(Op, st.just("add_mem_reg"), st.integers(0, 9), ack=st.booleans(), fds=some_fds, trunc=trunc),
    st.builds(Op, st.just("rem_mem_reg"), st.integers(0, 9), ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("vring_num"), IDX, st.one_of(st.sampled_from([8, 16, 256, 1, 2, 0, 3, 32768, 65536]),
                                                       st.integers(0, 2**32 - 1)), ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("vring_base"), IDX, st.integers(0, 2**32 - 1), ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("vring_addr"), IDX, st.integers(0, 4), ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.sampled_from(["vring_kick", "vring_call", "vring_err"]), IDX, st.booleans(), ack=st.booleans(),
              fds=ring_fds, trunc=trunc),
    st.builds(Op, st.just("vring_enable"), IDX, st.sampled_from([0, 1, 1, 2, 2**32 - 1]), ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("get_vring_base"), IDX, ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.sampled_from(["get_config", "set_config"]),
              st.one_of(st.integers(0, 300), st.sampled_from([2**32 - 1, 2**31])),
              st.one_of(st.integers(0, 300), st.sampled_from([2**32 - 1, 4096, 257])), st.integers(0, 300),
              ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("backend_req_fd"), ack=st.booleans(), fds=some_fds),
    st.builds(Op, st.sampled_from(["get_features", "get_protocol_features", "get_queue_num", "get_max_mem_slots",
                                   "set_owner", "reset_owner", "reset_device", "vring_endian"]), ack=st.booleans(),
              fds=st.one_of(st.just(()), st.just(()), some_fds), trunc=trunc),
    st.builds(Op, st.just("raw"), st.one_of(st.sampled_from([0, 6, 7, 14, 19, 20, 22, 26, 35, 39, 40, 41, 999]),
                                            st.integers(0, 2**32 - 1)),
              st.integers(0, 2**64 - 1), st.integers(0, 64), ack=st.booleans(), fds=some_fds),
    st.builds(Op, st.just("get_inflight_fd"), st.sampled_from([1, 2, 3, 0, 255]),
              st.sampled_from([8, 16, 256, 0, 3, 32768, 65535]), ack=st.booleans(), trunc=trunc),
    st.builds(Op, st.just("set_inflight_fd"), st.sampled_from([1, 2, 3, 0, 255]), st.sampled_from([8, 16, 256, 0, 3]),
              ack=st.booleans(), fds=st.one_of(st.just(()), st.just(()), st.just(()), some_fds), trunc=trunc,
              regions=st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 3), st.integers(0, 2**32 - 1))),
    st.builds(Op, st.just("setup_ring"), st.integers(0, 2), st.sampled_from([8, 16, 256]), st.integers(0, 1)),
    st.builds(Op, st.just("valid_mem_table"), st.integers(0, 1), ack=st.booleans()),
    st.builds(Op, st.just("kick"), st.integers(0, 2), st.integers(0, 1)),
    st.builds(Op, st.just("kick"), st.integers(0, 2), st.integers(0, 1)),
)


class EchoPeer:
    """A peer that answers every transmitted frame with a broadcast frame, from inside send(),
    the way the responder and the switch deliver while the transmit batch is being handled."""

    accepts_offload = False

    def __init__(self, dev: NetDevice) -> None:
        self.dev = dev

    def send(self, frames) -> None:
        self.dev.deliver([pk.BROADCAST_MAC + bytes(f)[6:] for f in frames if len(f) >= 14])


class Frontend:
    """Drives one BackendSession the way a frontend + the server's event loop would."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ram = DriverRam.get()
        self.ram.reset_rings(kind)
        self.dev = device(kind)
        if kind == "net":
            self.dev.peer = EchoPeer(self.dev)
        self.hooks = RecordingHooks(strict=False)
        self.session = BackendSession(self.dev, self.hooks)
        self.fd_next = _fd_base()
        self.handed: dict[int, str] = {}  # fd number -> what it is, for every fd given to the session
        self.unsent: dict[int, str] = {}  # made for a message not handled yet

    # -- fds ---------------------------------------------------------------
    def _high(self, fd: int, what: str) -> int:
        """Move ``fd`` to a fresh high number nothing else in the process will ever get."""
        target = self.fd_next
        self.fd_next += 1
        assert not is_open(target)
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
        self.unsent[target] = what
        return target

    def make_fd(self, kind: str) -> int:
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_NONBLOCK)
        elif kind == "pipe":
            r, w = os.pipe()
            os.close(r)
            fd = w
        elif kind == "shm_main":
            fd = os.dup(self.ram.main.regions[0].fd)
        elif kind == "shm_other":
            fd = os.dup(self.ram.other.regions[0].fd)
        elif kind == "memfd_small":
            fd = os.memfd_create("fuzz-small")
            os.ftruncate(fd, 4096)
        else:
            x, y = socket.socketpair()
            fd = os.dup(x.fileno())
            x.close()
            y.close()
        return self._high(fd, kind)

    def owned(self) -> list[int]:
        s = self.session
        fds = []
        for vr in s.vrings:
            fds += [f for f in (vr.kick_fd, vr.call_fd, vr.err_fd) if f >= 0]
        if s.backend_req_fd >= 0:
            fds.append(s.backend_req_fd)
        fds += [r.fd for r in s.mem.regions if r.fd >= 0]
        return fds

    # -- payloads ------------------------------------------------------------
    def region(self, sel: int) -> p.MemRegion:
        main, other = self.ram.main.regions[0], self.ram.other.regions[0]
        return [
            p.MemRegion(0, RAM, main.user_addr, 0),                               # the real thing
            p.MemRegion(OTHER_GPA, RAM, other.user_addr, 0),                      # the second segment
            p.MemRegion(0x100000, RAM // 2, main.user_addr + RAM // 2, RAM // 2),  # main's upper half, elsewhere
            p.MemRegion(0, RAM // 2, main.user_addr, 0),                          # overlaps the first
            p.MemRegion(0, 2 * RAM, main.user_addr, 0),                           # bigger than the file
            p.MemRegion(0, RAM, main.user_addr, RAM),                             # offset past the end
            p.MemRegion(0, 0, main.user_addr, 0),                                 # empty
            p.MemRegion(0, 2**63 - 4096, main.user_addr, 0),                      # absurd
            p.MemRegion(2**64 - 4096, 4096, 2**64 - 4096, 0),                     # at the top of the address space
            p.MemRegion(0, RAM, main.user_addr, 2**64 - 4096),                    # offset overflow
        ][sel % 10]

    def inflight_area(self, op: Op) -> tuple[bytes, tuple]:
        """SET_INFLIGHT_FD payload and fds: an area like GET_INFLIGHT_FD's, of good or bad size, offset
        and content (zeros, a crashed backend's state, random bytes, an entry that is neither 0 nor 1)."""
        num_queues, queue_size = op.a, op.b
        size_sel, off_sel, content, seed = op.regions
        need = inflight.area_size(num_queues, queue_size) if queue_size else 0
        mmap_size = [need, max(0, need - 1), 2 * need + 4096, (64 << 20) + 4096, 0][size_sel]
        offset = [0, 4096, 1, 1 << 63, 2**64 - 4096][off_sel]
        payload = inflight.encode_payload(mmap_size, offset, num_queues, queue_size)
        if op.fds:
            return payload, op.fds
        rnd = random.Random(seed)
        file_size = min(mmap_size, 1 << 20) + (offset if offset < (1 << 20) else 0)
        area = bytearray(file_size)
        region = inflight.queue_region_size(queue_size) if queue_size else 0
        for q in range(num_queues if region else 0):
            base = (offset if offset < (1 << 20) else 0) + q * region
            if base + region > len(area):
                break
            if content == 1:  # a backend died with some heads taken
                inflight.REGION_HDR.pack_into(area, base, 0, inflight.INFLIGHT_VERSION, queue_size,
                                              rnd.randrange(queue_size + 2), rnd.randrange(4))
                for h in rnd.sample(range(queue_size), min(queue_size, rnd.randrange(4))):
                    inflight.DESC_STATE.pack_into(area, base + inflight.REGION_HDR.size + 16 * h, 1, 0, rnd.randrange(9))
            elif content == 2:
                area[base:base + region] = rnd.randbytes(region)
            elif content == 3:  # well-formed header, an entry that is neither 0 nor 1
                inflight.REGION_HDR.pack_into(area, base, 0, inflight.INFLIGHT_VERSION, queue_size, 0, 0)
                area[base + inflight.REGION_HDR.size + 16 * rnd.randrange(queue_size)] = rnd.randrange(2, 256)
        fd = os.memfd_create("fuzz-inflight")
        os.write(fd, bytes(area)) if area else None
        return payload, (self._high(fd, "inflight memfd"),)

    def vring_addr(self, index: int, sel: int) -> p.VringAddr:
        u = self.ram.main.gpa_to_user
        i = index if index < 3 else 0
        desc, avail, used = self.ring(i)
        if sel == 0:
            return p.VringAddr(index, 0, u(desc), u(used), u(avail), 0)
        if sel == 1:  # a ring in the other segment
            o = self.ram.other.gpa_to_user
            return p.VringAddr(index, 0, o(OTHER_GPA), o(OTHER_GPA + 0x2000), o(OTHER_GPA + 0x1000), 0)
        if sel == 2:  # ring areas hanging off the end of RAM
            return p.VringAddr(index, 1, u(RAM - 16), u(RAM - 8), u(RAM - 4), 2**64 - 1)
        if sel == 3:  # guest-physical numbers where user addresses belong
            return p.VringAddr(index, 0, desc, used, avail, 0)
        return p.VringAddr(index, 2**32 - 1, 2**64 - 1, 0, 2**63, 2**64 - 1)

    def ring(self, i: int) -> tuple[int, int, int]:
        return self.ram.ring(i)

    def materialise(self, op: Op) -> list[Message]:
        """The messages for ``op`` (macros expand to several)."""
        k = op.kind
        flags = p.VHOST_USER_VERSION | (p.VHOST_USER_NEED_REPLY_MASK if op.ack else 0)

        def m(req, payload=b"", fds=op.fds, fl=flags):
            if op.trunc is not None:
                payload = payload[:op.trunc]
            return Message(int(req), fl, payload, [f if isinstance(f, int) else self.make_fd(f) for f in fds])

        offered = self.dev.device_features()
        if k == "features":
            v = [offered, offered & op.b, offered & ~(1 << 30), op.b][op.a]
            return [m(Request.SET_FEATURES, p.encode_u64(v))]
        if k == "protocol_features":
            v = [self.session.offered_protocol_features, op.b, 1 << ProtocolFeature.REPLY_ACK][op.a]
            return [m(Request.SET_PROTOCOL_FEATURES, p.encode_u64(v))]
        if k == "mem_table":  # b: 0 = one matching fd per region, 3 = region count says 9, else op.fds
            regions = [self.region(sel) for sel in op.regions]
            n = len(regions)
            payload = struct.pack("=II", n if op.b != 3 else 9, 0) + b"".join(p.MEM_REGION.pack(*r) for r in regions)
            fds = op.fds
            if op.b == 0:  # one fd per region, of the matching segment
                fds = tuple("shm_other" if r.guest_phys_addr == OTHER_GPA else "shm_main" for r in regions)
            return [m(Request.SET_MEM_TABLE, payload, fds)]
        if k == "valid_mem_table":  # main segment (a = 0), or main + other (a = 1)
            rs = [self.region(0)] + ([self.region(1)] if op.a else [])
            return [Message(int(Request.SET_MEM_TABLE), flags, p.encode_mem_table(rs),
                            [self.make_fd("shm_main")] + ([self.make_fd("shm_other")] if op.a else []))]
        if k in ("add_mem_reg", "rem_mem_reg"):
            r = self.region(op.a)
            payload = struct.pack("=Q", 0) + p.MEM_REGION.pack(*r)
            if k == "add_mem_reg":
                fds = op.fds or ("shm_other" if r.guest_phys_addr == OTHER_GPA else "shm_main",)
                return [m(Request.ADD_MEM_REG, payload, fds)]
            return [m(Request.REM_MEM_REG, payload, ())]
        if k == "vring_num":
            return [m(Request.SET_VRING_NUM, p.VRING_STATE.pack(op.a, op.b & 0xFFFFFFFF), ())]
        if k == "vring_base":
            return [m(Request.SET_VRING_BASE, p.VRING_STATE.pack(op.a, op.b), ())]
        if k == "vring_addr":
            return [m(Request.SET_VRING_ADDR, p.encode_vring_addr(self.vring_addr(op.a, op.b)), ())]
        if k in ("vring_kick", "vring_call", "vring_err"):
            req = {"vring_kick": Request.SET_VRING_KICK, "vring_call": Request.SET_VRING_CALL,
                   "vring_err": Request.SET_VRING_ERR}[k]
            v = op.a | (p.VHOST_USER_VRING_NOFD_MASK if op.b else 0)
            return [m(req, p.encode_u64(v))]
        if k == "vring_enable":
            return [m(Request.SET_VRING_ENABLE, p.VRING_STATE.pack(op.a, op.b), ())]
        if k == "get_vring_base":
            return [m(Request.GET_VRING_BASE, p.VRING_STATE.pack(op.a, 0), ())]
        if k == "get_config":
            return [m(Request.GET_CONFIG, p.CONFIG_HDR.pack(op.a, op.b, 0) + bytes(min(op.c, 300)), ())]
        if k == "set_config":
            return [m(Request.SET_CONFIG, p.CONFIG_HDR.pack(op.a, op.b, 0) + bytes(min(op.c, 300)), ())]
        if k == "backend_req_fd":
            return [m(Request.SET_BACKEND_REQ_FD, b"")]
        if k == "raw":
            return [m(op.a, random.Random(op.b).randbytes(op.c))]
        if k == "get_inflight_fd":
            return [m(Request.GET_INFLIGHT_FD, inflight.encode_payload(0, 0, op.a, op.b), ())]
        if k == "set_inflight_fd":  # regions = (size selector, offset selector, content selector, seed)
            return [m(Request.SET_INFLIGHT_FD, *self.inflight_area(op))]
        if k == "setup_ring":  # a well-formed ring bring-up, as QEMU does it
            i, num = op.a, op.b
            u = self.ram.main.gpa_to_user
            desc, avail, used = self.ring(i)
            ack = p.VHOST_USER_VERSION | p.VHOST_USER_NEED_REPLY_MASK
            out = [Message(int(Request.SET_VRING_NUM), ack, p.encode_vring_state(i, num)),
                   Message(int(Request.SET_VRING_BASE), ack, p.encode_vring_state(i, 0)),
                   Message(int(Request.SET_VRING_ADDR), ack, p.encode_vring_addr(p.VringAddr(i, 0, u(desc), u(used), u(avail), 0))),
                   Message(int(Request.SET_VRING_CALL), ack, p.encode_u64(i), [self.make_fd("eventfd")]),
                   Message(int(Request.SET_VRING_KICK), ack, p.encode_u64(i), [self.make_fd("eventfd")])]
            if op.c:
                out.append(Message(int(Request.SET_VRING_ENABLE), ack, p.encode_vring_state(i, 1)))
            return out
        simple = {"get_features": Request.GET_FEATURES, "get_protocol_features": Request.GET_PROTOCOL_FEATURES,
                  "get_queue_num": Request.GET_QUEUE_NUM, "get_max_mem_slots": Request.GET_MAX_MEM_SLOTS,
                  "set_owner": Request.SET_OWNER, "reset_owner": Request.RESET_OWNER,
                  "reset_device": Request.RESET_DEVICE, "vring_endian": Request.SET_VRING_ENDIAN}
        return [m(simple[k], b"" if k != "vring_endian" else p.encode_vring_state(0, 1))]

    # -- checks ------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """handle() one message and check every property that must hold after it."""
        s = self.session
        name = msg.name
        fds_in = list(msg.fds)
        for fd in fds_in:
            self.handed[fd] = self.unsent.pop(fd)
        note(f"-> {name} flags={msg.flags:#x} fds={[self.handed[fd] for fd in fds_in]} payload={msg.payload.hex()[:96]}")
        try:
            replies = s.handle(msg)
            raised = None
        except ProtocolError as e:
            replies, raised = [], e
        # Anything else escapes here and fails the test: server.py logs it as an internal error
        # ("a bug must not kill the device process") and drops the frontend.
        reply_ack = s.has_protocol(ProtocolFeature.REPLY_ACK)
        with_reply = msg.request in p.REQUESTS_WITH_REPLY
        if raised is not None:
            assert msg.request != Request.GET_CONFIG, "GET_CONFIG failures must be answered with size 0"
            assert with_reply or not (msg.need_reply and reply_ack), (
                f"{name}: raised {raised!r} although the frontend asked for an ack (REPLY_ACK negotiated)")
        self.check_replies(msg, replies, with_reply, reply_ack, raised)
        self.check_fds(name, fds_in)
        self.check_watchers(name)

    def check_replies(self, msg: Message, replies: list[Message], with_reply: bool, reply_ack: bool,
                      raised: Optional[Exception]) -> None:
        name = msg.name
        assert len(replies) <= 1, f"{name}: {len(replies)} replies"
        for r in replies:
            assert r.request == msg.request and r.flags == (p.VHOST_USER_VERSION | p.VHOST_USER_REPLY_MASK), (
                f"{name}: malformed reply header {r.request} {r.flags:#x}")
            assert len(r.payload) <= p.MAX_PAYLOAD
            fds, r.fds = r.fds, []
            try:
                if msg.request == Request.GET_INFLIGHT_FD:
                    # The area handed to the frontend: one memfd holding what the payload says.
                    assert len(fds) == 1, f"{name}: reply carries {len(fds)} fds"
                    mmap_size, mmap_offset, nq, qs = inflight.decode_payload(r.payload)
                    assert os.fstat(fds[0]).st_size >= mmap_offset + mmap_size > 0
                    assert mmap_size == inflight.area_size(nq, qs)
                else:
                    assert fds == [], f"{name}: reply carries fds"
            finally:
                for fd in fds:  # the server sends them and closes its copies
                    os.close(fd)
        if raised is not None:
            return
        if with_reply:
            assert len(replies) == 1, f"{name}: request with a reply got {len(replies)}"
            pl = replies[0].payload
            if msg.request in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                               Request.GET_MAX_MEM_SLOTS):
                assert len(pl) == 8
            elif msg.request == Request.GET_INFLIGHT_FD:
                assert len(pl) == inflight.PAYLOAD.size
            elif msg.request == Request.GET_VRING_BASE:
                assert len(pl) == 8 and p.decode_vring_state(pl).index == p.decode_vring_state(msg.payload).index
            elif msg.request == Request.GET_CONFIG:
                off, size, _flags = p.CONFIG_HDR.unpack_from(pl)
                assert len(pl) == p.CONFIG_HDR.size + size
                if size:
                    req_off, req_size, _ = p.CONFIG_HDR.unpack_from(msg.payload)
                    assert (off, size) == (req_off, req_size)
        elif msg.need_reply and reply_ack:
            assert len(replies) == 1, f"{name}: NEED_REPLY with REPLY_ACK got {len(replies)} replies"
            assert len(replies[0].payload) == 8 and p.decode_u64(replies[0].payload) in (0, 1)
        else:
            assert replies == [], f"{name}: unsolicited reply"

    def check_fds(self, name: str, fds_in: list[int]) -> None:
        owned = self.owned()
        assert len(owned) == len(set(owned)), f"{name}: one fd owned twice by the session: {owned}"
        for fd in owned:
            assert fd in self.handed, f"{name}: session holds fd {fd} it was never given"
            assert is_open(fd), f"{name}: session holds fd {fd} ({self.handed[fd]}) which is closed"
        for fd, what in self.handed.items():
            if is_open(fd):
                assert fd in owned, f"{name}: fd {fd} ({what}) leaked: open but not owned by the session"

    def check_watchers(self, name: str) -> None:
        assert not self.hooks.violations, f"{name}: {self.hooks.violations}"
        for index, fd in self.hooks.watched.items():
            vr = self.session.vrings[index]
            assert fd == vr.kick_fd and is_open(fd), (
                f"{name}: the event loop would still watch fd {fd} for ring {index}, whose kick fd is "
                f"{vr.kick_fd} ({'open' if is_open(fd) else 'closed'})")
        # Liveness: a ring the session processes (started, enabled, mapped) has its kick fd watched,
        # otherwise the driver's kicks are never seen.
        for vr in self.session.vrings:
            if vr.active:
                assert self.hooks.watched.get(vr.index) == vr.kick_fd, (
                    f"{name}: ring {vr.index} is active but its kick fd {vr.kick_fd} is not watched")
                # server.py's _on_kick asserts this for every active ring it is woken for.
                assert vr.stats is not None, f"{name}: ring {vr.index} is active without stats"

    def kick(self, op: Op) -> None:
        """What the server does on kicks (rings in forward or reverse order), with a frame from the
        peer arriving before, after or instead of them (net; the echo peer also answers transmits)."""
        s, dev = self.session, self.dev
        if self.kind == "net" and op.a in (1, 2):
            self.deliver()
        if op.a == 2:
            return
        for vr in (reversed(s.vrings) if op.b else list(s.vrings)):
            if not vr.active:
                continue
            try:
                dev.process_queue(vr.index, vr.queue, vr.stats)
            except VirtqueueError:
                if not dev.passive_ring(vr.index):
                    s._stop(vr)  # the server's "queue broken" path
                continue
            # Anything else escapes and fails the test.
            vr.queue.needs_notification()
            self.check_watchers("kick")
        if self.kind == "net" and op.a == 0:
            self.deliver()

    def deliver(self) -> None:
        frame = pk.BROADCAST_MAC + pk.parse_mac("52:55:0a:00:02:02") + b"\x08\x06" + bytes(46)
        self.dev.deliver([frame])  # must not raise, whatever the rings look like

    def close(self) -> None:
        self.session.close()
        self.check_fds("close", [])
        for fd, what in self.handed.items():
            assert not is_open(fd), f"close: fd {fd} ({what}) still open after the session closed"
        assert self.hooks.watched == {}, f"close: kick fds still watched: {self.hooks.watched}"
        assert not self.hooks.violations, self.hooks.violations


def run_session(kind: str, ops: list[Op]) -> None:
    DriverRam.get()  # created once, before the fd baseline
    device(kind)
    _fd_base()
    before = open_fds()
    fe = Frontend(kind)
    try:
        for op in ops:
            if op.kind == "kick":
                fe.kick(op)
                continue
            for msg in fe.materialise(op):
                fe.send(msg)
        fe.close()
    finally:
        try:
            fe.session.close()
        except Exception:
            pass
        for fd in [*fe.handed, *fe.unsent]:
            try:
                os.close(fd)
            except OSError:
                pass
    assert_no_new_fds(before)


@st.composite
def session_ops(draw) -> list[Op]:
    """Half the sequences start like QEMU (protocol features, features, memory table, some rings
    brought up and enabled) so that the random requests that follow also land on live rings."""
    ops: list[Op] = []
    if draw(st.booleans()):
        ops += [Op("protocol_features", 0), Op("features", draw(st.sampled_from([0, 2])), ack=True),
                Op("valid_mem_table", ack=True)]
        # vhost-user-blk's start: GET_INFLIGHT_FD (first connection) or SET_INFLIGHT_FD (reconnect,
        # with whatever state the previous backend left) before the rings.
        which = draw(st.integers(0, 3))
        if which == 1:
            ops.append(Op("get_inflight_fd", 2, draw(st.sampled_from([8, 16, 256])), ack=True))
        elif which >= 2:
            ops.append(Op("set_inflight_fd", draw(st.sampled_from([2, 3])), draw(st.sampled_from([8, 16, 256])), ack=True,
                          regions=(0, draw(st.sampled_from([0, 1])), draw(st.integers(0, 3)), draw(st.integers(0, 2**32 - 1)))))
        for i, num, en in draw(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([8, 16, 256]),
                                                  st.sampled_from([1, 1, 0])), max_size=3)):
            ops.append(Op("setup_ring", i, num, en))
        ops.append(Op("kick"))
    return ops + draw(st.lists(op_strategy, max_size=15))


@fuzz_settings(300)
@given(st.sampled_from(["blk", "net"]), session_ops())
def test_fuzz_backend_session_random_requests(kind, ops):
    run_session(kind, ops)


# Findings 5-8 (all fixed in fa23eb6), each with its minimal sequence pinned.
@fuzz_settings(20)
@example(kind="net", ops=[Op("features", 2), Op("valid_mem_table"), Op("setup_ring", 0, 8, 1),
                          Op("valid_mem_table"), Op("kick", 2)])
@given(st.just("net"), session_ops())
def test_regression_memory_change_refreshes_device_queues(kind, ops):
    """Finding 5: BackendSession._remap_rings() (every SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG;
    QEMU re-sends tables while rings run) released each live Queue and built a new one without
    telling the device. NetDevice kept the released Queue in rx_queues, so the next frame from the
    peer raised ValueError ('operation forbidden on released memoryview object') out of deliver()
    -- through peer.send(), also out of the transmit path of the sending device, whose popped
    chains were then never returned. (BalloonDevice._stats_held had the same problem.)"""
    run_session(kind, ops)


@fuzz_settings(20)
@example(kind="blk", ops=[Op("features", 2), Op("valid_mem_table"), Op("setup_ring", 0, 8, 1), Op("rem_mem_reg", 0)])
@given(st.sampled_from(["blk", "net"]), session_ops())
def test_regression_unmapped_ring_is_unwatched(kind, ops):
    """Finding 6: when a memory-table change no longer mapped a live ring, _remap_rings() set
    vring.queue = None but left its kick fd watched. Vring.active then being False, _stop()
    (GET_VRING_BASE, RESET_*, disconnect) and SET_VRING_KICK skipped unwatch_kick() and closed the
    kick fd while the event loop still watched it (a stale reader on a closed, reusable fd)."""
    run_session(kind, ops)


@fuzz_settings(20)
@example(kind="blk", ops=[Op("protocol_features", 0), Op("features", 0), Op("valid_mem_table"),
                          Op("setup_ring", 0, 8, 0), Op("features", 2)])
@given(st.sampled_from(["blk", "net"]), session_ops())
def test_regression_set_features_without_protocol_features_watches_started_rings(kind, ops):
    """Finding 7: _on_set_features() implemented "SET_FEATURES without F_PROTOCOL_FEATURES: enable
    all rings" by setting vring.enabled only. A ring already started (kick fd received, waiting for
    SET_VRING_ENABLE) became active with no watch_kick(): its kicks were never seen, and _stop()
    later unwatched an fd that was never watched."""
    run_session(kind, ops)


@fuzz_settings(20)
@example(kind="blk", ops=[Op("features", 2), Op("valid_mem_table"), Op("setup_ring", 0, 8, 1), Op("vring_kick", 0, 1)])
@given(st.sampled_from(["blk", "net"]), session_ops())
def test_regression_refused_nofd_kick_changes_nothing(kind, ops):
    """Finding 8: SET_VRING_KICK with VHOST_USER_VRING_NOFD_MASK (polling mode) first unwatched and
    closed the running ring's kick fd, stored -1, and only then refused the request: the ring stayed
    active with no kick fd and no watcher, never served again, although the frontend was told the
    request failed."""
    run_session(kind, ops)


@fuzz_settings(20)
@example(kind="blk", ops=[Op("protocol_features", 0), Op("set_inflight_fd", 1, 8, ack=True, regions=(0, 3, 0, 0))])
@given(st.sampled_from(["blk", "net"]), session_ops())
def test_regression_set_inflight_fd_huge_offset(kind, ops):
    run_session(kind, ops)


@fuzz_settings(20)
@example(kind="blk", ops=[Op("protocol_features", 0), Op("features", 2, ack=True), Op("valid_mem_table", ack=True),
                          Op("set_inflight_fd", 2, 8, ack=True, regions=(0, 0, 3, 0)), Op("setup_ring", 0, 8, 1)])
@given(st.sampled_from(["blk", "net"]), session_ops())
def test_regression_corrupt_inflight_area(kind, ops):
    run_session(kind, ops)
