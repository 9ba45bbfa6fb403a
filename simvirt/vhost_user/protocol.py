"""vhost-user wire format, sans-IO.

Names and numbers follow QEMU's docs/interop/vhost-user.rst. The header is
three native-endian u32 (request, flags, size) followed by ``size`` bytes of
payload; file descriptors ride along as SCM_RIGHTS ancillary data of the
same ``sendmsg``. :class:`MessageParser` turns a byte stream plus received
fds into :class:`Message` objects; payload (de)serialisers are plain
functions so both the backend and the frontend share one definition.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3
# Largest payload we accept: a full SET_MEM_TABLE is 8 + 8 * 32 bytes; a config
# space read is at most 256. Anything much larger is garbage or an attack.
MAX_PAYLOAD = 4096
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
VHOST_MEMORY_MAX_NREGIONS = 8
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8


class Request(enum.IntEnum):
    """Frontend -> backend requests (VHOST_USER_*)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests on the SET_BACKEND_REQ_FD channel (QEMU 7.2: "slave")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


# Requests whose reply is part of the protocol (not a REPLY_ACK).
REQUESTS_WITH_REPLY = frozenset({
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
    Request.SET_LOG_BASE,
    Request.POSTCOPY_ADVISE,
    Request.IOTLB_MSG,
})


class ProtocolError(Exception):
    """A malformed or unacceptable vhost-user message."""


@dataclass
class Message:
    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"UNKNOWN({self.request})"

    def encode(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload


def reply_to(msg: Message, payload: bytes) -> Message:
    """A reply has the request's number and flags = version | REPLY (exactly 0x5)."""
    return Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload)


class MessageParser:
    """Incremental parser: feed bytes and fds, get complete messages.

    fds belong to the message whose header starts at or after the stream
    offset where they arrived (SCM_RIGHTS data rides on the first byte of the
    sendmsg that carried them), which is how vhost-user pairs them even when
    one read returns the tail of a message and the whole next one.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._consumed = 0  # stream offset of _buf[0]
        self._fds: list[tuple[int, list[int]]] = []  # (stream offset, fds)

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Message]:
        if fds:
            self._fds.append((self._consumed + len(self._buf), list(fds)))
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER_SIZE:
            request, flags, size = HEADER.unpack_from(self._buf)
            bad = None
            if size > MAX_PAYLOAD:
                bad = f"payload size {size} of request {request} exceeds {MAX_PAYLOAD}"
            elif (flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION:
                bad = f"bad protocol version in flags {flags:#x}"
            if bad is not None:
                # The stream is broken: the messages completed in this call are lost with it, but
                # their fds must not be -- pending_fds() hands them to the caller to close.
                self._fds[:0] = [(-1, m.fds) for m in out if m.fds]
                raise ProtocolError(bad)
            if len(self._buf) < HEADER_SIZE + size:
                break
            start = self._consumed
            end = start + HEADER_SIZE + size
            payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + size])
            del self._buf[:HEADER_SIZE + size]
            self._consumed = end
            mine: list[int] = []
            rest = []
            for off, fl in self._fds:
                if off <= start:
                    mine.extend(fl)
                else:
                    rest.append((off, fl))
            self._fds = rest
            out.append(Message(request, flags, payload, mine))
        return out

    def pending_fds(self) -> list[int]:
        fds = [fd for _, fl in self._fds for fd in fl]
        self._fds = []
        return fds


# -- payloads ---------------------------------------------------------------
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("=QQQQ")  # guest_addr, size, user_addr, mmap_offset
CONFIG_HDR = struct.Struct("=III")  # offset, size, flags
INFLIGHT = struct.Struct("=QQHH4x")  # mmap_size, mmap_offset, num_queues, queue_size (24 bytes, as QEMU checks)


class VringState(NamedTuple):
    index: int
    num: int


class VringAddr(NamedTuple):
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


class MemRegion(NamedTuple):
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes, need {size}")


def decode_u64(payload: bytes, what: str = "u64") -> int:
    _need(payload, 8, what)
    return U64.unpack_from(payload)[0]


def encode_u64(v: int) -> bytes:
    return U64.pack(v & 0xFFFFFFFFFFFFFFFF)


def decode_vring_state(payload: bytes) -> VringState:
    _need(payload, VRING_STATE.size, "vring state")
    return VringState(*VRING_STATE.unpack_from(payload))


def encode_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, VRING_ADDR.size, "vring addr")
    return VringAddr(*VRING_ADDR.unpack_from(payload))


def encode_vring_addr(a: VringAddr) -> bytes:
    return VRING_ADDR.pack(*a)


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    _need(payload, 8, "memory table")
    nregions = struct.unpack_from("=I", payload)[0]
    if nregions == 0 or nregions > VHOST_MEMORY_MAX_NREGIONS:
        raise ProtocolError(f"memory table with {nregions} regions")
    _need(payload, 8 + nregions * MEM_REGION.size, "memory table")
    return [MemRegion(*MEM_REGION.unpack_from(payload, 8 + i * MEM_REGION.size)) for i in range(nregions)]


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    return struct.pack("=II", len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)


def decode_single_region(payload: bytes) -> MemRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding then one region."""
    _need(payload, 8 + MEM_REGION.size, "memory region")
    return MemRegion(*MEM_REGION.unpack_from(payload, 8))


def decode_config(payload: bytes) -> tuple[int, int, int, bytes]:
    _need(payload, CONFIG_HDR.size, "device config")
    offset, size, flags = CONFIG_HDR.unpack_from(payload)
    data = payload[CONFIG_HDR.size:]
    if size > 256 or len(data) < size:
        raise ProtocolError(f"device config of size {size} with {len(data)} bytes of data")
    return offset, size, flags, data[:size]


def encode_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return CONFIG_HDR.pack(offset, len(data), flags) + data


def vring_fd_index(payload: bytes) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR: (ring index, fd present)."""
    v = decode_u64(payload, "vring fd")
    return v & VHOST_USER_VRING_IDX_MASK, not (v & VHOST_USER_VRING_NOFD_MASK)
