"""Device-side emulation of transmit offloads: checksum completion and GSO.

A virtio-net device that offers VIRTIO_NET_F_CSUM / HOST_TSO4 / HOST_TSO6 /
HOST_UFO / HOST_USO receives frames that are not yet valid on a wire: their
L4 checksum holds only the pseudo-header sum (NEEDS_CSUM), or they are
"super-frames" of up to 64 KiB that the header says to cut at ``gso_size``.
When the peer cannot take such frames (a pcap file, a ``-netdev stream``
socket, our slirp-like responder), the device has to finish the job in
software, exactly as Linux's ``skb_checksum_help`` / ``skb_segment`` (with
``tcp_gso_segment`` / ``__udp_gso_segment`` / ``inet_gso_segment``) or
QEMU's ``net_tx_pkt`` would.

Per segment, :func:`segment` rewrites: IPv4 total length, identification
(+1 per segment, from the super-frame's value), header checksum; IPv6
payload length; TCP sequence number (+bytes before it), flags (CWR only on
the first segment, FIN and PSH only on the last -- Linux semantics; QEMU's
net_tx_pkt clears FIN/PSH on *every* segment), UDP length; and a full L4
checksum over the pseudo header.  ``hdr_len`` is ignored: the spec says it
is only a hint unless VIRTIO_NET_F_GUEST_HDRLEN was negotiated, so header
lengths come from parsing the frame.

Cost is one ``ones_sum`` over each segment's payload plus a small header
copy; no per-byte Python.
"""
from __future__ import annotations

import struct

from simvirt.net.checksum import finish, internet_checksum, ones_sum, pseudo_header_sum
from simvirt.net.packets import (
    ETH_P_IP,
    ETH_P_IPV6,
    IP_MF,
    IP_OFFMASK,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_HLEN,
    TCP_CSUM_OFFSET,
    TCP_CWR,
    TCP_FIN,
    TCP_PSH,
    UDP_CSUM_OFFSET,
    UDP_HLEN,
    Buffer,
    PacketError,
    parse_ethernet,
    parse_ipv4,
    parse_ipv6,
    parse_tcp,
)
from simvirt.net.spec import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VirtioNetHdr,
)

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_HH = struct.Struct("!HH")
IPV4_MAX_LEN = 0xFFFF


class OffloadError(PacketError):
    """The virtio_net_hdr and the frame disagree, or the request is unsupported."""


def complete_checksum_into(buf: bytearray | memoryview, csum_start: int, csum_offset: int, length: int | None = None) -> None:
    """Finish a NEEDS_CSUM checksum in place.

    Sums ``buf[csum_start:length]`` -- which already includes the
    pseudo-header sum the driver stored in the checksum field -- and stores
    the complement at ``csum_start + csum_offset`` (0 is written as 0xFFFF,
    as Linux does).  Offsets come from the guest, so they are bounds-checked.
    """
    n = len(buf) if length is None else length
    at = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or at + 2 > n:
        raise OffloadError(f"csum_start {csum_start} + csum_offset {csum_offset} outside a {n}-byte frame")
    s = ones_sum(memoryview(buf)[csum_start:n])
    _U16.pack_into(buf, at, finish(s))


def complete_checksum(frame: Buffer, csum_start: int, csum_offset: int) -> bytes:
    """Copy of ``frame`` with its partial (NEEDS_CSUM) checksum completed."""
    buf = bytearray(frame)
    complete_checksum_into(buf, csum_start, csum_offset)
    return bytes(buf)


class PartialCsumFrame:
    """A transmitted frame whose transport checksum is still partial (VIRTIO_NET_HDR_F_NEEDS_CSUM).

    Handed only to peers that say ``accepts_partial_csum``: local endpoints
    that, like the Linux stack receiving a CHECKSUM_PARTIAL skb from a local
    guest, trust the guest's data instead of summing every byte.  ``data``
    may be a view of guest RAM that is only valid during the peer's
    ``send()`` (the chain is returned to the driver afterwards); a peer
    that keeps a frame keeps :meth:`completed`, the wire form.
    """

    __slots__ = ("data", "csum_start", "csum_offset")

    def __init__(self, data: Buffer, csum_start: int, csum_offset: int) -> None:
        if csum_start < 0 or csum_offset < 0 or csum_start + csum_offset + 2 > len(data):
            raise OffloadError(f"csum_start {csum_start} + csum_offset {csum_offset} outside a {len(data)}-byte frame")
        self.data = data
        self.csum_start = csum_start
        self.csum_offset = csum_offset

    def __len__(self) -> int:
        return len(self.data)

    def completed(self) -> bytes:
        """The frame as it would appear on a wire: checksum filled in."""
        return complete_checksum(self.data, self.csum_start, self.csum_offset)


class _Layout:
    """Where the headers of a super-frame are, derived from its bytes."""

    __slots__ = ("l3_off", "l4_off", "hdr_end", "v4", "src", "dst", "ident", "frag", "proto", "tcp_seq", "tcp_flags")

    def __init__(self, frame: Buffer, gso: int) -> None:
        eth = parse_ethernet(frame)
        self.l3_off = off = eth.header_len
        if eth.ethertype == ETH_P_IP:
            ip4 = parse_ipv4(frame, off)
            if ip4.is_fragment:
                raise OffloadError("GSO super-frame is an IPv4 fragment")
            self.v4 = True
            self.src, self.dst, self.ident, self.frag = ip4.src, ip4.dst, ip4.ident, ip4.frag
            self.proto = ip4.proto
            self.l4_off = off + ip4.header_len
        elif eth.ethertype == ETH_P_IPV6:
            ip6 = parse_ipv6(frame, off)
            if ip6.fragment_offset >= 0:
                raise OffloadError("GSO super-frame carries an IPv6 Fragment header")
            self.v4 = False
            self.src, self.dst, self.ident, self.frag = ip6.src, ip6.dst, 0, 0
            self.proto = ip6.l4_proto
            self.l4_off = off + ip6.header_len
        else:
            raise OffloadError(f"GSO on ethertype {eth.ethertype:#06x}")

        want_v4 = {VIRTIO_NET_HDR_GSO_TCPV4: True, VIRTIO_NET_HDR_GSO_TCPV6: False, VIRTIO_NET_HDR_GSO_UDP: True}
        if gso in want_v4 and want_v4[gso] != self.v4:
            raise OffloadError(f"gso_type {gso} does not match IPv{4 if self.v4 else 6}")
        want_proto = IPPROTO_TCP if gso in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) else IPPROTO_UDP
        if self.proto != want_proto:
            raise OffloadError(f"gso_type {gso} on IP protocol {self.proto}")
        if want_proto == IPPROTO_TCP:
            tcp = parse_tcp(frame, self.l4_off)
            self.hdr_end = self.l4_off + tcp.header_len
            self.tcp_seq, self.tcp_flags = tcp.seq, tcp.flags
        else:
            if len(frame) < self.l4_off + UDP_HLEN:
                raise PacketError("truncated UDP header")
            self.hdr_end = self.l4_off + UDP_HLEN
            self.tcp_seq = self.tcp_flags = 0


def segment(frame: Buffer, hdr: VirtioNetHdr, *, ecn_negotiated: bool = True) -> list[bytes]:
    """Cut a transmitted frame into wire-ready frames as its virtio_net_hdr asks.

    * ``gso_type`` NONE: one frame, its checksum completed if NEEDS_CSUM.
    * TCPV4 / TCPV6: TSO, ``gso_size`` payload bytes per segment.
    * UDP_L4: USO, one UDP header (length, checksum) per segment.
    * UDP: UFO, IPv4 fragments of ``gso_size & ~7`` bytes of the datagram
      (UDP header inside the first), full UDP checksum, same IP id, DF
      cleared as Linux's inet_gso_segment does.  UFO over IPv6 is refused.

    The ECN flag (0x80) is accepted with TCP types and changes nothing in
    the output: CWR stays on the first segment only, as in Linux
    (``tcp_gso_segment``) and QEMU.  With ``ecn_negotiated=False`` (the
    device did not accept HOST_ECN) the flag is a driver error.

    A payload of at most ``gso_size`` yields a single frame with lengths and
    checksums rewritten but sequence, id and flags untouched.  Raises
    :class:`OffloadError` (a ``ValueError``) for anything inconsistent.
    """
    gso = hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN:
            raise OffloadError("ECN flag without a GSO type")
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [complete_checksum(frame, hdr.csum_start, hdr.csum_offset)]
        return [bytes(frame)]
    if gso not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4):
        raise OffloadError(f"unknown gso_type {hdr.gso_type:#x}")
    if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN:
        if not ecn_negotiated:
            raise OffloadError("GSO ECN flag set but HOST_ECN was not negotiated")
        if gso not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
            raise OffloadError("GSO ECN flag on a UDP gso_type")
    if hdr.gso_size == 0:
        raise OffloadError("gso_size 0 with a GSO type")
    try:
        lay = _Layout(frame, gso)
    except OffloadError:
        raise
    except PacketError as e:  # truncated/garbled headers: same error type for callers
        raise OffloadError(str(e)) from None
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        want_off = TCP_CSUM_OFFSET if lay.proto == IPPROTO_TCP else UDP_CSUM_OFFSET
        if (hdr.csum_start, hdr.csum_offset) != (lay.l4_off, want_off):
            raise OffloadError(
                f"csum_start/offset {hdr.csum_start}/{hdr.csum_offset} but the transport header is at "
                f"{lay.l4_off} (checksum +{want_off})"
            )
    if gso == VIRTIO_NET_HDR_GSO_UDP:
        return _ufo(frame, lay, hdr.gso_size)
    return _segment_l4(frame, lay, hdr.gso_size)


def _segment_l4(frame: Buffer, lay: _Layout, mss: int) -> list[bytes]:
    """TSO and USO: replicate headers, one transport header per segment.

    The header sums are computed once, with every per-segment field (IP
    length/id, TCP seq/flags, UDP length, checksums) zeroed; each segment
    then adds its own field values, which is valid because a ones'-complement
    sum only cares about word values, not positions (a 32-bit seq is
    congruent to the sum of its two halves).  Per segment that leaves one
    pass over the payload chunk.
    """
    mv = memoryview(frame)
    l3, l4, hdr_end = lay.l3_off, lay.l4_off, lay.hdr_end
    is_tcp = lay.proto == IPPROTO_TCP
    v4 = lay.v4
    csum_at = l4 + (TCP_CSUM_OFFSET if is_tcp else UDP_CSUM_OFFSET)
    template = bytearray(mv[:hdr_end])
    template[csum_at : csum_at + 2] = b"\0\0"
    if is_tcp:
        template[l4 + 4 : l4 + 8] = b"\0\0\0\0"  # seq
        template[l4 + 13] = 0  # flags
    else:
        template[l4 + 4 : l4 + 6] = b"\0\0"  # UDP length
    if v4:
        template[l3 + 2 : l3 + 6] = b"\0\0\0\0"  # total length, id
        template[l3 + 10 : l3 + 12] = b"\0\0"  # header checksum
    ip_base = ones_sum(memoryview(template)[l3:l4]) if v4 else 0
    l4_base = ones_sum(memoryview(template)[l4:hdr_end], pseudo_header_sum(lay.src, lay.dst, lay.proto, 0))
    payload = mv[hdr_end:]
    plen = len(payload)
    hdrs_len = hdr_end - l3  # IP header(s) + transport header
    l3_hlen = l4 - l3
    if hdrs_len + min(mss, plen) > IPV4_MAX_LEN:
        raise OffloadError(f"gso_size {mss} gives IP packets over 65535 bytes")
    seq0, flags0, ident0 = lay.tcp_seq, lay.tcp_flags, lay.ident
    zero_as_ffff = not is_tcp
    out: list[bytes] = []
    for i, start in enumerate(range(0, plen or 1, mss)):
        chunk = payload[start : start + mss]
        ip_len = hdrs_len + len(chunk)
        l4_len = ip_len - l3_hlen
        h = bytearray(template)
        if is_tcp:
            flags = flags0
            if i:
                flags &= ~TCP_CWR
            if start + mss < plen:
                flags &= ~(TCP_FIN | TCP_PSH)
            seq = (seq0 + start) & 0xFFFFFFFF
            _U32.pack_into(h, l4 + 4, seq)
            h[l4 + 13] = flags
            fields = l4_len + seq + flags  # pseudo-header length, seq, flags byte (low half of its word)
        else:
            _U16.pack_into(h, l4 + 4, l4_len)
            fields = 2 * l4_len  # in the pseudo header and in the UDP header
        if v4:
            ident = (ident0 + i) & 0xFFFF
            _HH.pack_into(h, l3 + 2, ip_len, ident)
            _U16.pack_into(h, l3 + 10, finish(ip_base + ip_len + ident, zero_as_ffff=False))
        else:
            _U16.pack_into(h, l3 + 4, ip_len - IPV6_HLEN)
        # TCP/UDP headers are a multiple of 4 bytes, so the payload starts on
        # a 16-bit word boundary and its sum simply adds on.
        _U16.pack_into(h, csum_at, finish(ones_sum(chunk, l4_base + fields), zero_as_ffff=zero_as_ffff))
        out.append(b"".join((h, chunk)))
    return out


def _ufo(frame: Buffer, lay: _Layout, gso_size: int) -> list[bytes]:
    """UFO: checksum the whole UDP datagram, then IPv4-fragment it."""
    mv = memoryview(frame)
    l3, l4 = lay.l3_off, lay.l4_off
    dgram = bytearray(mv[l4:])
    dlen = len(dgram)
    _U16.pack_into(dgram, 4, dlen)
    dgram[UDP_CSUM_OFFSET : UDP_CSUM_OFFSET + 2] = b"\0\0"
    s = ones_sum(dgram, pseudo_header_sum(lay.src, lay.dst, IPPROTO_UDP, dlen))
    _U16.pack_into(dgram, UDP_CSUM_OFFSET, finish(s))
    frag_size = gso_size & ~7
    if frag_size < 8:
        raise OffloadError(f"UFO gso_size {gso_size} leaves no room for an 8-byte fragment")
    ihl = l4 - l3
    if ihl + min(frag_size, dlen) > IPV4_MAX_LEN:
        raise OffloadError(f"gso_size {gso_size} gives IP packets over 65535 bytes")
    head = bytearray(mv[:l4])
    if dlen <= frag_size:
        _U16.pack_into(head, l3 + 2, ihl + dlen)
        head[l3 + 10 : l3 + 12] = b"\0\0"
        _U16.pack_into(head, l3 + 10, internet_checksum(memoryview(head)[l3:l4]))
        return [bytes(head + dgram)]
    dmv = memoryview(dgram)
    out = []
    for off in range(0, dlen, frag_size):
        piece = dmv[off : off + frag_size]
        h = bytearray(head)
        frag = (off >> 3) & IP_OFFMASK
        if off + frag_size < dlen:
            frag |= IP_MF
        _HH.pack_into(h, l3 + 2, ihl + len(piece), lay.ident)
        _U16.pack_into(h, l3 + 6, frag)
        h[l3 + 10 : l3 + 12] = b"\0\0"
        _U16.pack_into(h, l3 + 10, internet_checksum(memoryview(h)[l3:l4]))
        out.append(b"".join((h, piece)))
    return out
