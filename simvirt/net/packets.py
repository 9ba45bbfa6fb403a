"""Parse and build the headers a virtio-net lab meets: Ethernet (+802.1Q), ARP,
IPv4, IPv6 (extension headers walked to find L4), ICMP echo, UDP and TCP.

Parsers take ``bytes``/``bytearray``/``memoryview`` plus an offset and return
NamedTuples; they validate lengths (a guest controls every byte) and raise
:class:`PacketError` instead of reading past the end.  Builders return
``bytes`` with lengths and checksums filled in, so tests and the responder
never hand-assemble packets.

The checksum primitives live in :mod:`simvirt.net.checksum` and the
device-side offload emulation (``complete_checksum``, ``segment``) in
:mod:`simvirt.net.offload`; both are re-exported here so callers can keep
to one import.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple, Union

from simvirt.net.checksum import (  # noqa: F401  (re-exported)
    finish,
    fold,
    internet_checksum,
    ones_sum,
    pseudo_header_sum,
)

Buffer = Union[bytes, bytearray, memoryview]


class PacketError(ValueError):
    """A frame is too short or a header field is inconsistent."""


# --------------------------------------------------------------------------
# MAC addresses
# --------------------------------------------------------------------------
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\0" * 6


def parse_mac(text: str) -> bytes:
    """``"52:55:0a:00:02:02"`` (or ``-`` separated) to 6 bytes."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


def mac_str(mac: Buffer) -> str:
    """6 bytes to lowercase ``aa:bb:cc:dd:ee:ff``."""
    if len(mac) != 6:
        raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
    return bytes(mac).hex(":")


def is_multicast(mac: Buffer) -> bool:
    """Group bit (I/G, bit 0 of the first octet); broadcast is multicast too."""
    return bool(mac[0] & 1)


def is_broadcast(mac: Buffer) -> bool:
    return bytes(mac) == BROADCAST_MAC


def is_unicast(mac: Buffer) -> bool:
    return not mac[0] & 1


def is_locally_administered(mac: Buffer) -> bool:
    """U/L bit: what a driver without VIRTIO_NET_F_MAC should generate."""
    return bool(mac[0] & 2)


def ip_bytes(text: str) -> bytes:
    """``"10.0.2.15"`` or ``"fe80::1"`` to packed bytes (4 or 16)."""
    return ipaddress.ip_address(text).packed


def ip_str(addr: Buffer) -> str:
    return str(ipaddress.ip_address(bytes(addr)))


# --------------------------------------------------------------------------
# Ethernet / 802.1Q
# --------------------------------------------------------------------------
ETH_HLEN = 14
VLAN_HLEN = 4
ETH_ZLEN = 60  # minimum frame without FCS
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8  # QinQ outer tag
ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)
MAX_VLAN_TAGS = 2

_ETH = struct.Struct("!6s6sH")
_H = struct.Struct("!H")
_HH = struct.Struct("!HH")


class Ethernet(NamedTuple):
    dst: bytes
    src: bytes
    ethertype: int  # after any VLAN tags: the L3 protocol
    vlans: tuple[int, ...] = ()  # TCIs, outermost first
    header_len: int = ETH_HLEN

    @property
    def vlan_id(self) -> int | None:
        """VID of the outermost tag, or None when untagged."""
        return self.vlans[0] & 0xFFF if self.vlans else None

    def pack(self) -> bytes:
        return build_ethernet(self.dst, self.src, self.ethertype, self.vlans)


def parse_ethernet(frame: Buffer) -> Ethernet:
    """Ethernet II header, skipping up to two 802.1Q/802.1ad tags."""
    if len(frame) < ETH_HLEN:
        raise PacketError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
    dst, src, ethertype = _ETH.unpack_from(frame)
    off = ETH_HLEN
    tcis: list[int] = []
    while ethertype in _VLAN_TPIDS:
        if len(tcis) == MAX_VLAN_TAGS:
            raise PacketError("more than two VLAN tags")
        if len(frame) < off + VLAN_HLEN:
            raise PacketError("truncated VLAN tag")
        tci, ethertype = _HH.unpack_from(frame, off)
        tcis.append(tci)
        off += VLAN_HLEN
    return Ethernet(dst, src, ethertype, tuple(tcis), off)


def build_ethernet(dst: bytes, src: bytes, ethertype: int, vlans: tuple[int, ...] | int | None = None) -> bytes:
    """Header bytes; ``vlans`` is a TCI (or tuple of TCIs, outermost first) to tag with 802.1Q."""
    if vlans is None:
        return _ETH.pack(dst, src, ethertype)
    if isinstance(vlans, int):
        vlans = (vlans,)
    out = [dst, src]
    for i, tci in enumerate(vlans):
        tpid = ETH_P_8021AD if len(vlans) > 1 and i == 0 else ETH_P_8021Q
        out.append(_HH.pack(tpid, tci))
    out.append(_H.pack(ethertype))
    return b"".join(out)


# --------------------------------------------------------------------------
# ARP (IPv4 over Ethernet only: htype 1, ptype 0x0800, hlen 6, plen 4)
# --------------------------------------------------------------------------
ARP_REQUEST = 1
ARP_REPLY = 2
ARP_LEN = 28
_ARP = struct.Struct("!HHBBH6s4s6s4s")


class Arp(NamedTuple):
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    def pack(self) -> bytes:
        return _ARP.pack(1, ETH_P_IP, 6, 4, self.op, self.sha, self.spa, self.tha, self.tpa)


def parse_arp(buf: Buffer, offset: int = 0) -> Arp:
    if len(buf) < offset + ARP_LEN:
        raise PacketError("truncated ARP packet")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(buf, offset)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        raise PacketError(f"ARP for htype={htype} ptype={ptype:#x} hlen={hlen} plen={plen} is not IPv4/Ethernet")
    return Arp(op, sha, spa, tha, tpa)


# --------------------------------------------------------------------------
# IPv4
# --------------------------------------------------------------------------
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPV4_HLEN = 20
IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF
_IPV4 = struct.Struct("!BBHHHBBH4s4s")


class IPv4(NamedTuple):
    tos: int
    total_length: int
    ident: int
    frag: int  # flags (DF/MF) and offset, as on the wire
    ttl: int
    proto: int
    checksum: int
    src: bytes
    dst: bytes
    header_len: int

    @property
    def df(self) -> bool:
        return bool(self.frag & IP_DF)

    @property
    def is_fragment(self) -> bool:
        return bool(self.frag & (IP_MF | IP_OFFMASK))


def parse_ipv4(buf: Buffer, offset: int = 0) -> IPv4:
    """IPv4 header at ``offset``; the header (options included) must be present."""
    if len(buf) < offset + IPV4_HLEN:
        raise PacketError("truncated IPv4 header")
    vihl, tos, total, ident, frag, ttl, proto, csum, src, dst = _IPV4.unpack_from(buf, offset)
    if vihl >> 4 != 4:
        raise PacketError(f"IP version {vihl >> 4} in an IPv4 header")
    hl = (vihl & 0xF) * 4
    if hl < IPV4_HLEN:
        raise PacketError(f"IPv4 header length {hl} < 20")
    if len(buf) < offset + hl:
        raise PacketError("truncated IPv4 options")
    if total < hl:
        raise PacketError(f"IPv4 total length {total} < header length {hl}")
    return IPv4(tos, total, ident, frag, ttl, proto, csum, src, dst, hl)


def ipv4_header_valid(buf: Buffer, offset: int, header_len: int) -> bool:
    return ones_sum(memoryview(buf)[offset : offset + header_len]) == 0xFFFF


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ident: int = 0,
    ttl: int = 64,
    tos: int = 0,
    df: bool = True,
    options: bytes = b"",
) -> bytes:
    """IPv4 header (checksum filled) for a payload of ``payload_len`` bytes."""
    if len(options) % 4:
        raise ValueError("IPv4 options must be padded to a multiple of 4 bytes")
    hl = IPV4_HLEN + len(options)
    total = hl + payload_len
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet of {total} bytes exceeds 65535")
    hdr = bytearray(_IPV4.pack(0x40 | hl // 4, tos, total, ident & 0xFFFF, IP_DF if df else 0, ttl, proto, 0, src, dst))
    hdr += options
    struct.pack_into("!H", hdr, 10, internet_checksum(hdr))
    return bytes(hdr)


# --------------------------------------------------------------------------
# IPv6
# --------------------------------------------------------------------------
IPV6_HLEN = 40
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
_EXT_HEADERS = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS})
MAX_EXT_HEADERS = 8  # a guest can chain many; stop walking early
_IPV6 = struct.Struct("!IHBB16s16s")


class IPv6(NamedTuple):
    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int  # the fixed header's field
    hop_limit: int
    src: bytes
    dst: bytes
    l4_proto: int  # after walking extension headers
    header_len: int  # 40 + extension headers
    fragment_offset: int  # -1 without a Fragment header, else its offset in bytes

    @property
    def total_length(self) -> int:
        return IPV6_HLEN + self.payload_length


def parse_ipv6(buf: Buffer, offset: int = 0) -> IPv6:
    """Fixed header plus extension headers, enough to find the transport header."""
    if len(buf) < offset + IPV6_HLEN:
        raise PacketError("truncated IPv6 header")
    vtcfl, plen, nh, hlim, src, dst = _IPV6.unpack_from(buf, offset)
    if vtcfl >> 28 != 6:
        raise PacketError(f"IP version {vtcfl >> 28} in an IPv6 header")
    proto = nh
    off = offset + IPV6_HLEN
    fragment_offset = -1
    for _ in range(MAX_EXT_HEADERS + 1):
        if proto not in _EXT_HEADERS:
            break
        if len(buf) < off + 8:
            raise PacketError("truncated IPv6 extension header")
        nxt, hlen = buf[off], buf[off + 1]
        if proto == IPPROTO_FRAGMENT:
            fragment_offset = _H.unpack_from(buf, off + 2)[0] & 0xFFF8
            size = 8
        elif proto == IPPROTO_AH:
            size = (hlen + 2) * 4
        else:
            size = (hlen + 1) * 8
        proto = nxt
        off += size
    else:
        raise PacketError("too many IPv6 extension headers")
    if len(buf) < off:
        raise PacketError("truncated IPv6 extension header")
    return IPv6((vtcfl >> 20) & 0xFF, vtcfl & 0xFFFFF, plen, nh, hlim, src, dst, proto, off - offset, fragment_offset)


def build_ipv6(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    if payload_len > 0xFFFF:
        raise ValueError("IPv6 payload over 65535 needs a jumbogram option")
    return _IPV6.pack(6 << 28 | traffic_class << 20 | flow_label, payload_len, next_header, hop_limit, src, dst)


# --------------------------------------------------------------------------
# UDP / TCP / ICMP echo
# --------------------------------------------------------------------------
UDP_HLEN = 8
TCP_HLEN = 20
ICMP_ECHO_HLEN = 8
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP_ECHO = struct.Struct("!BBHHH")

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

UDP_CSUM_OFFSET = 6
TCP_CSUM_OFFSET = 16
ICMP_CSUM_OFFSET = 2


class Udp(NamedTuple):
    sport: int
    dport: int
    length: int
    checksum: int


class Tcp(NamedTuple):
    sport: int
    dport: int
    seq: int
    ack: int
    header_len: int
    flags: int
    window: int
    checksum: int
    urgent: int


class IcmpEcho(NamedTuple):
    type: int
    code: int
    checksum: int
    ident: int
    seq: int


def parse_udp(buf: Buffer, offset: int = 0) -> Udp:
    if len(buf) < offset + UDP_HLEN:
        raise PacketError("truncated UDP header")
    return Udp._make(_UDP.unpack_from(buf, offset))


def parse_tcp(buf: Buffer, offset: int = 0) -> Tcp:
    if len(buf) < offset + TCP_HLEN:
        raise PacketError("truncated TCP header")
    sport, dport, seq, ack, doff, flags, win, csum, urg = _TCP.unpack_from(buf, offset)
    hl = (doff >> 4) * 4
    if hl < TCP_HLEN:
        raise PacketError(f"TCP data offset {hl} < 20")
    if len(buf) < offset + hl:
        raise PacketError("truncated TCP options")
    return Tcp(sport, dport, seq, ack, hl, flags, win, csum, urg)


def parse_icmp_echo(buf: Buffer, offset: int = 0) -> IcmpEcho:
    if len(buf) < offset + ICMP_ECHO_HLEN:
        raise PacketError("truncated ICMP echo header")
    return IcmpEcho._make(_ICMP_ECHO.unpack_from(buf, offset))


def l4_checksum_ok(src: bytes, dst: bytes, proto: int, segment: Buffer) -> bool:
    """Verify a TCP/UDP/ICMPv6 segment (header + payload) against its pseudo header."""
    return ones_sum(segment, pseudo_header_sum(src, dst, proto, len(segment))) == 0xFFFF


def build_udp(
    sport: int, dport: int, payload: Buffer, src_ip: bytes, dst_ip: bytes, *, checksum: bool | str = True
) -> bytes:
    """UDP header + payload.

    ``checksum``: True computes it, False leaves 0 ("none", IPv4 only),
    ``"partial"`` stores the folded pseudo-header sum the way a driver does
    for VIRTIO_NET_HDR_F_NEEDS_CSUM (csum_offset 6).
    """
    length = UDP_HLEN + len(payload)
    if length > 0xFFFF:
        raise ValueError("UDP datagram over 65535 bytes")
    seg = bytearray(_UDP.pack(sport, dport, length, 0))
    seg += payload
    _store_l4_checksum(seg, UDP_CSUM_OFFSET, src_ip, dst_ip, IPPROTO_UDP, checksum)
    return bytes(seg)


def build_tcp(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: Buffer,
    src_ip: bytes,
    dst_ip: bytes,
    *,
    window: int = 65535,
    options: bytes = b"",
    urgent: int = 0,
    checksum: bool | str = True,
) -> bytes:
    """TCP header (+options) + payload; ``checksum`` as for :func:`build_udp`."""
    if len(options) % 4:
        raise ValueError("TCP options must be padded to a multiple of 4 bytes")
    hl = TCP_HLEN + len(options)
    seg = bytearray(_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hl // 4) << 4, flags, window, 0, urgent))
    seg += options
    seg += payload
    _store_l4_checksum(seg, TCP_CSUM_OFFSET, src_ip, dst_ip, IPPROTO_TCP, checksum)
    return bytes(seg)


def build_icmp_echo(type_: int, ident: int, seq: int, payload: Buffer, *, v6_addrs: tuple[bytes, bytes] | None = None) -> bytes:
    """ICMP (or, with ``v6_addrs=(src, dst)``, ICMPv6) echo message with checksum."""
    msg = bytearray(_ICMP_ECHO.pack(type_, 0, 0, ident, seq))
    msg += payload
    initial = 0 if v6_addrs is None else pseudo_header_sum(v6_addrs[0], v6_addrs[1], IPPROTO_ICMPV6, len(msg))
    struct.pack_into("!H", msg, ICMP_CSUM_OFFSET, internet_checksum(msg, initial))
    return bytes(msg)


def _store_l4_checksum(seg: bytearray, at: int, src: bytes, dst: bytes, proto: int, mode: bool | str) -> None:
    if mode is False:
        return
    pseudo = pseudo_header_sum(src, dst, proto, len(seg))
    if mode == "partial":
        value = pseudo
    elif mode is True:
        value = finish(ones_sum(seg, pseudo), zero_as_ffff=proto == IPPROTO_UDP)
    else:
        raise ValueError(f"checksum mode {mode!r}")
    struct.pack_into("!H", seg, at, value)


# --------------------------------------------------------------------------
# Whole frames
# --------------------------------------------------------------------------


class FrameInfo(NamedTuple):
    """Where the layers of one frame are.  ``l4_offset``/``l4_proto`` are -1 without L4."""

    eth: Ethernet
    l3_offset: int
    ip: IPv4 | IPv6 | None
    l3_end: int  # end of the IP packet per its length field (excludes Ethernet padding)
    l4_offset: int
    l4_proto: int


def parse_frame(frame: Buffer) -> FrameInfo:
    """Locate L3 and L4 in an Ethernet frame.

    ``l3_end`` trusts the IP length field only when it fits in the frame
    (it is shorter when the frame was padded to 60 bytes); a length field
    pointing past the end raises.
    """
    eth = parse_ethernet(frame)
    off = eth.header_len
    n = len(frame)
    ip: IPv4 | IPv6 | None
    if eth.ethertype == ETH_P_IP:
        ip = parse_ipv4(frame, off)
        end = off + ip.total_length
        l4_off = off + ip.header_len
        proto = -1 if ip.frag & IP_OFFMASK else ip.proto
    elif eth.ethertype == ETH_P_IPV6:
        ip = parse_ipv6(frame, off)
        end = off + ip.total_length
        l4_off = off + ip.header_len
        proto = -1 if ip.fragment_offset > 0 or ip.l4_proto == IPPROTO_NONE else ip.l4_proto
    else:
        return FrameInfo(eth, off, None, n, -1, -1)
    if end > n:
        raise PacketError(f"IP length says {end - off} bytes, frame holds {n - off}")
    if l4_off > end:
        raise PacketError("IP headers extend past the IP length")
    if proto < 0:
        l4_off = -1
    return FrameInfo(eth, off, ip, end, l4_off, proto)


def ip_packet(
    src: bytes, dst: bytes, proto: int, l4: Buffer, *, ident: int = 0, ttl: int = 64, df: bool = True
) -> bytes:
    """IPv4 or IPv6 header (chosen by address length) followed by ``l4``."""
    if len(src) == 4:
        return build_ipv4(src, dst, proto, len(l4), ident=ident, ttl=ttl, df=df) + bytes(l4)
    return build_ipv6(src, dst, proto, len(l4), hop_limit=ttl) + bytes(l4)


def _ethertype_for(src_ip: bytes) -> int:
    return ETH_P_IP if len(src_ip) == 4 else ETH_P_IPV6


def udp_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    sport: int,
    dport: int,
    payload: Buffer,
    *,
    ident: int = 0,
    ttl: int = 64,
    vlan: int | None = None,
    checksum: bool | str = True,
) -> bytes:
    """A complete Ethernet/IP/UDP frame (IPv4 or IPv6 by address length)."""
    l4 = build_udp(sport, dport, payload, src_ip, dst_ip, checksum=checksum)
    return build_ethernet(dst_mac, src_mac, _ethertype_for(src_ip), vlan) + ip_packet(
        src_ip, dst_ip, IPPROTO_UDP, l4, ident=ident, ttl=ttl
    )


def tcp_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: Buffer,
    *,
    ident: int = 0,
    ttl: int = 64,
    window: int = 65535,
    options: bytes = b"",
    vlan: int | None = None,
    checksum: bool | str = True,
) -> bytes:
    """A complete Ethernet/IP/TCP frame; IPv4 total length may exceed a normal MTU (TSO super-frames)."""
    l4 = build_tcp(sport, dport, seq, ack, flags, payload, src_ip, dst_ip, window=window, options=options, checksum=checksum)
    return build_ethernet(dst_mac, src_mac, _ethertype_for(src_ip), vlan) + ip_packet(
        src_ip, dst_ip, IPPROTO_TCP, l4, ident=ident, ttl=ttl
    )


def icmp_echo_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    type_: int,
    ident: int,
    seq: int,
    payload: Buffer,
    *,
    ip_ident: int = 0,
    ttl: int = 64,
) -> bytes:
    if len(src_ip) == 4:
        l4 = build_icmp_echo(type_, ident, seq, payload)
        proto = IPPROTO_ICMP
    else:
        l4 = build_icmp_echo(type_, ident, seq, payload, v6_addrs=(src_ip, dst_ip))
        proto = IPPROTO_ICMPV6
    return build_ethernet(dst_mac, src_mac, _ethertype_for(src_ip)) + ip_packet(
        src_ip, dst_ip, proto, l4, ident=ip_ident, ttl=ttl
    )


def arp_frame(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes, *, eth_dst: bytes | None = None) -> bytes:
    """ARP request/reply in an Ethernet frame (unpadded, 42 bytes).

    Requests go to broadcast, replies to ``tha``, unless ``eth_dst`` says otherwise.
    """
    if eth_dst is None:
        eth_dst = BROADCAST_MAC if op == ARP_REQUEST else tha
    return build_ethernet(eth_dst, sha, ETH_P_ARP) + Arp(op, sha, spa, tha, tpa).pack()


def pad_frame(frame: bytes, minimum: int = ETH_ZLEN) -> bytes:
    """Zero-pad to the Ethernet minimum (60 bytes without FCS)."""
    return frame if len(frame) >= minimum else frame + bytes(minimum - len(frame))


def __getattr__(name: str) -> object:
    # offload.py imports this module, so its names are re-exported lazily.
    if name in ("complete_checksum", "complete_checksum_into", "segment", "OffloadError"):
        from simvirt.net import offload

        return getattr(offload, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
