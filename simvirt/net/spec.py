"""virtio-net constants and wire structures, named as the virtio spec names them.

Source: virtio 1.2 (cs01), section 5.1 "Network Device", checked against
``content.tex`` at tag ``v1.2-cs01`` of github.com/oasis-tcs/virtio-spec.
A handful of bits from later drafts (1.3: USO4/USO6, notification
coalescing, device stats) are included and marked, because Linux guests
negotiate them and we want readable feature dumps.

Everything here is pure data plus tiny pack/unpack helpers, so the device
process, the guest driver and the tests can share one definition of every
byte on the wire.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from simvirt.virtio.spec import VIRTIO_F_VERSION_1

# --------------------------------------------------------------------------
# Feature bits (5.1.3).  Values are bit numbers, not masks.
# --------------------------------------------------------------------------
VIRTIO_NET_F_CSUM = 0  # device handles packets with partial checksum
VIRTIO_NET_F_GUEST_CSUM = 1  # driver handles packets with partial checksum
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
# 1.2 *uses* CTRL_RX_EXTRA in normative text (ALLUNI/NOMULTI/NOUNI/NOBCAST)
# but forgot to list it among the feature bits; bit 20 is what Linux and
# QEMU use and what later drafts list.
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_HOST_USO = 56
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_GUEST_HDRLEN = 59
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_RSC_EXT = 61
VIRTIO_NET_F_STANDBY = 62
VIRTIO_NET_F_SPEED_DUPLEX = 63

# Legacy-interface bits (5.1.3.2): never offered by a modern device.
VIRTIO_NET_F_GSO = 6
VIRTIO_NET_F_GUEST_RSC4 = 41
VIRTIO_NET_F_GUEST_RSC6 = 42

# Later drafts (virtio 1.3); listed so feature dumps from Linux guests read well.
VIRTIO_NET_F_DEVICE_STATS = 50
VIRTIO_NET_F_VQ_NOTF_COAL = 52
VIRTIO_NET_F_NOTF_COAL = 53
VIRTIO_NET_F_GUEST_USO4 = 54
VIRTIO_NET_F_GUEST_USO6 = 55

FEATURE_NAMES: dict[int, str] = {
    value: name
    for name, value in list(globals().items())
    if name.startswith("VIRTIO_NET_F_") and isinstance(value, int)
}

# 5.1.3.1 "Feature bit requirements": feature -> the features it needs,
# *any one* of which satisfies it (every 1.2 rule is "A requires B" or
# "A requires B or C").
FEATURE_REQUIRES: dict[int, frozenset[int]] = {
    VIRTIO_NET_F_GUEST_TSO4: frozenset({VIRTIO_NET_F_GUEST_CSUM}),
    VIRTIO_NET_F_GUEST_TSO6: frozenset({VIRTIO_NET_F_GUEST_CSUM}),
    VIRTIO_NET_F_GUEST_ECN: frozenset({VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6}),
    VIRTIO_NET_F_GUEST_UFO: frozenset({VIRTIO_NET_F_GUEST_CSUM}),
    VIRTIO_NET_F_GUEST_USO4: frozenset({VIRTIO_NET_F_GUEST_CSUM}),
    VIRTIO_NET_F_GUEST_USO6: frozenset({VIRTIO_NET_F_GUEST_CSUM}),
    VIRTIO_NET_F_HOST_TSO4: frozenset({VIRTIO_NET_F_CSUM}),
    VIRTIO_NET_F_HOST_TSO6: frozenset({VIRTIO_NET_F_CSUM}),
    VIRTIO_NET_F_HOST_ECN: frozenset({VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6}),
    VIRTIO_NET_F_HOST_UFO: frozenset({VIRTIO_NET_F_CSUM}),
    VIRTIO_NET_F_HOST_USO: frozenset({VIRTIO_NET_F_CSUM}),
    VIRTIO_NET_F_CTRL_RX: frozenset({VIRTIO_NET_F_CTRL_VQ}),
    VIRTIO_NET_F_CTRL_VLAN: frozenset({VIRTIO_NET_F_CTRL_VQ}),
    VIRTIO_NET_F_GUEST_ANNOUNCE: frozenset({VIRTIO_NET_F_CTRL_VQ}),
    VIRTIO_NET_F_MQ: frozenset({VIRTIO_NET_F_CTRL_VQ}),
    VIRTIO_NET_F_CTRL_MAC_ADDR: frozenset({VIRTIO_NET_F_CTRL_VQ}),
    VIRTIO_NET_F_RSC_EXT: frozenset({VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6}),
    VIRTIO_NET_F_RSS: frozenset({VIRTIO_NET_F_CTRL_VQ}),
    VIRTIO_NET_F_NOTF_COAL: frozenset({VIRTIO_NET_F_CTRL_VQ}),
    VIRTIO_NET_F_VQ_NOTF_COAL: frozenset({VIRTIO_NET_F_CTRL_VQ}),
}


def unmet_requirements(features: int) -> list[tuple[int, frozenset[int]]]:
    """Return ``(feature, needs_any_of)`` for every set feature whose requirement is unmet.

    A driver must not accept (and a device should refuse at FEATURES_OK) a set
    with any entry here; returning all of them makes the error message useful.
    """
    unmet = []
    for feature, needs in FEATURE_REQUIRES.items():
        if features >> feature & 1 and not any(features >> n & 1 for n in needs):
            unmet.append((feature, needs))
    return unmet


# --------------------------------------------------------------------------
# struct virtio_net_hdr (5.1.6)
# --------------------------------------------------------------------------
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4

VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3  # UFO: IP fragmentation of one big UDP datagram
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5  # USO: one UDP header per segment
VIRTIO_NET_HDR_GSO_ECN = 0x80  # flag bit, combined with a TCP gso_type

_HDR = struct.Struct("<BBHHHHH")
VIRTIO_NET_HDR_SIZE = _HDR.size  # 12: modern devices always carry num_buffers
VIRTIO_NET_HDR_LEGACY_SIZE = 10  # legacy without MRG_RXBUF: no num_buffers
VIRTIO_NET_HDR_HASH_SIZE = 20  # with VIRTIO_NET_F_HASH_REPORT


class VirtioNetHdr(NamedTuple):
    """The 12-byte header in front of every packet on receiveq/transmitq.

    With ``VIRTIO_NET_HDR_F_RSC_INFO`` (receive side only) ``csum_start`` and
    ``csum_offset`` carry the coalesced-segment and duplicate-ACK counts
    instead of checksum positions; the field names stay the spec's.
    """

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(*self)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _HDR.pack_into(buf, offset, *self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VirtioNetHdr:
        """Decode the first 12 bytes of ``data`` (a 10-byte legacy header reads num_buffers=0)."""
        if len(data) >= _HDR.size:
            return cls._make(_HDR.unpack_from(data))
        if len(data) >= VIRTIO_NET_HDR_LEGACY_SIZE:
            return cls._make(_HDR.unpack(bytes(data[:VIRTIO_NET_HDR_LEGACY_SIZE]) + b"\0\0"))
        raise ValueError(f"virtio_net_hdr needs {VIRTIO_NET_HDR_LEGACY_SIZE}+ bytes, got {len(data)}")

    @property
    def gso_protocol(self) -> int:
        """``gso_type`` without the ECN flag: the segmentation to perform."""
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)


def net_hdr_size(features: int) -> int:
    """Header length in front of each packet for a negotiated feature set.

    Modern devices (VERSION_1) always use 12 bytes; legacy ones only with
    MRG_RXBUF, otherwise 10 (5.1.6.1).  HASH_REPORT appends hash_value,
    hash_report and padding (20 bytes).  This mirrors Linux virtnet_probe.
    """
    if features >> VIRTIO_NET_F_HASH_REPORT & 1:
        return VIRTIO_NET_HDR_HASH_SIZE
    if features >> VIRTIO_F_VERSION_1 & 1 or features >> VIRTIO_NET_F_MRG_RXBUF & 1:
        return VIRTIO_NET_HDR_SIZE
    return VIRTIO_NET_HDR_LEGACY_SIZE


# --------------------------------------------------------------------------
# struct virtio_net_config (5.1.4).  Offsets are fixed even when a field
# "does not exist" (its feature was not offered): it then reads as whatever
# the device put there, conventionally zero.
# --------------------------------------------------------------------------
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# The 1.2 text contradicts itself on duplex: the field description says
# 0x01 full / 0x00 half, the device-normative section says 0x00 full /
# 0x01 half.  Linux (DUPLEX_FULL=1) and QEMU follow the former.
VIRTIO_NET_DUPLEX_HALF = 0x00
VIRTIO_NET_DUPLEX_FULL = 0x01
VIRTIO_NET_DUPLEX_UNKNOWN = 0xFF
VIRTIO_NET_SPEED_UNKNOWN = 0xFFFFFFFF

_CONFIG = struct.Struct("<6sHHHIBBHI")
VIRTIO_NET_CONFIG_SIZE = _CONFIG.size  # 24

CONFIG_OFFSET_MAC = 0
CONFIG_OFFSET_STATUS = 6
CONFIG_OFFSET_MAX_VIRTQUEUE_PAIRS = 8
CONFIG_OFFSET_MTU = 10
CONFIG_OFFSET_SPEED = 12
CONFIG_OFFSET_DUPLEX = 16
CONFIG_OFFSET_RSS_MAX_KEY_SIZE = 17
CONFIG_OFFSET_RSS_MAX_INDIRECTION_TABLE_LENGTH = 18
CONFIG_OFFSET_SUPPORTED_HASH_TYPES = 20

VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
VIRTIO_NET_MTU_MIN = 68  # device-normative bounds when offering MTU
VIRTIO_NET_MTU_MAX = 65535


class NetConfig(NamedTuple):
    """``struct virtio_net_config`` as of virtio 1.2 (24 bytes)."""

    mac: bytes = b"\0" * 6
    status: int = VIRTIO_NET_S_LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500
    speed: int = VIRTIO_NET_SPEED_UNKNOWN
    duplex: int = VIRTIO_NET_DUPLEX_UNKNOWN
    rss_max_key_size: int = 0
    rss_max_indirection_table_length: int = 0
    supported_hash_types: int = 0

    def pack(self) -> bytes:
        if len(self.mac) != 6:
            raise ValueError("mac must be 6 bytes")
        return _CONFIG.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> NetConfig:
        """Decode a (possibly short) config read; missing trailing fields read as zero."""
        raw = bytes(data[:_CONFIG.size]).ljust(_CONFIG.size, b"\0")
        return cls._make(_CONFIG.unpack(raw))


# --------------------------------------------------------------------------
# Virtqueues (5.1.2): receiveq k at 2k, transmitq k at 2k+1, controlq at 2N,
# where k counts from 0 (the spec's receiveq1 is index 0) and N is
# max_virtqueue_pairs with MQ (or RSS), else 1 -- never the number of pairs
# currently enabled by VQ_PAIRS_SET.
# --------------------------------------------------------------------------


def rx_queue_index(pair: int) -> int:
    return 2 * pair


def tx_queue_index(pair: int) -> int:
    return 2 * pair + 1


def ctrl_queue_index(max_pairs: int) -> int:
    return 2 * max_pairs


def queue_count(max_pairs: int, ctrl_vq: bool) -> int:
    return 2 * max_pairs + (1 if ctrl_vq else 0)


def queue_role(index: int, max_pairs: int, ctrl_vq: bool) -> tuple[str, int]:
    """Classify a virtqueue index: ``("rx", pair)``, ``("tx", pair)`` or ``("ctrl", 0)``."""
    if 0 <= index < 2 * max_pairs:
        return ("tx" if index & 1 else "rx", index // 2)
    if ctrl_vq and index == 2 * max_pairs:
        return ("ctrl", 0)
    raise ValueError(f"queue {index} does not exist with {max_pairs} pair(s), ctrl_vq={ctrl_vq}")


# --------------------------------------------------------------------------
# Control virtqueue (5.1.6.5): {u8 class; u8 command; data...} then the
# device writes one ack byte into a device-writable buffer.
# --------------------------------------------------------------------------
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5

VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1

VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_VLAN_DEL = 1

VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0

VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1
VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2

VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0

_CTRL_HDR = struct.Struct("<BB")
VIRTIO_NET_CTRL_HDR_SIZE = _CTRL_HDR.size
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class CtrlCommand(NamedTuple):
    """One control-queue command: what the driver put in its readable buffers."""

    class_: int
    command: int
    data: bytes = b""

    def pack(self) -> bytes:
        return _CTRL_HDR.pack(self.class_, self.command) + self.data

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> CtrlCommand:
        if len(buf) < _CTRL_HDR.size:
            raise ValueError("control command shorter than its 2-byte header")
        class_, command = _CTRL_HDR.unpack_from(buf)
        return cls(class_, command, bytes(buf[_CTRL_HDR.size:]))


def pack_mac_table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET data: two ``{le32 entries; u8 macs[entries][6]}`` tables."""
    out = [_U32.pack(len(unicast)), *unicast, _U32.pack(len(multicast)), *multicast]
    if any(len(m) != 6 for m in (*unicast, *multicast)):
        raise ValueError("every MAC must be 6 bytes")
    return b"".join(out)


def unpack_mac_table(data: bytes | bytearray | memoryview) -> tuple[list[bytes], list[bytes]]:
    """Parse MAC_TABLE_SET data into (unicast, multicast); raise ValueError on a bad length.

    The entry counts come from the guest, so each is checked against the bytes
    actually present before slicing (a huge count must not allocate).
    """
    mv = memoryview(data)
    tables: list[list[bytes]] = []
    pos = 0
    for _ in range(2):
        if len(mv) - pos < 4:
            raise ValueError("MAC table truncated before its entry count")
        (entries,) = _U32.unpack_from(mv, pos)
        pos += 4
        if entries > (len(mv) - pos) // 6:
            raise ValueError(f"MAC table claims {entries} entries, data holds fewer")
        raw = bytes(mv[pos : pos + 6 * entries])
        tables.append([raw[i : i + 6] for i in range(0, len(raw), 6)])
        pos += 6 * entries
    if pos != len(mv):
        raise ValueError(f"{len(mv) - pos} trailing bytes after the MAC tables")
    return tables[0], tables[1]


def pack_vq_pairs(pairs: int) -> bytes:
    """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET data (``le16 virtqueue_pairs``)."""
    return _U16.pack(pairs)


def unpack_vq_pairs(data: bytes | bytearray | memoryview) -> int:
    if len(data) != 2:
        raise ValueError("VQ_PAIRS_SET data must be 2 bytes")
    (pairs,) = _U16.unpack(data)
    return int(pairs)


def pack_guest_offloads(offloads: int) -> bytes:
    """VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET data (``le64``, a mask of GUEST_* feature bits)."""
    return _U64.pack(offloads)


def unpack_guest_offloads(data: bytes | bytearray | memoryview) -> int:
    if len(data) != 8:
        raise ValueError("GUEST_OFFLOADS_SET data must be 8 bytes")
    (offloads,) = _U64.unpack(data)
    return int(offloads)


# Offloads GUEST_OFFLOADS_SET can toggle: the GUEST_* receive offloads
# (1.2 lists CSUM/TSO4/TSO6/ECN/UFO; later drafts add USO4/USO6).  The
# driver MUST NOT enable one whose feature was not negotiated.
GUEST_OFFLOAD_FEATURES = frozenset(
    {
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_GUEST_USO6,
    }
)
