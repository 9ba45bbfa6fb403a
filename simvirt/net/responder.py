"""A sans-IO stand-in for QEMU's user-mode networking (slirp) gateway.

It gives a virtio-net device something to talk to without a TAP device or
root: hand it each frame the guest transmits, send the frames it returns to
the guest.  It imitates libslirp's defaults -- network 10.0.2.0/24, gateway
10.0.2.2, DNS 10.0.2.3, guest 10.0.2.15 -- and its MAC scheme "52:55 +
the IPv4 address" (``special_ethaddr`` in libslirp's slirp.c), so the
gateway is 52:55:0a:00:02:02.

What it answers (and why that much):

* ARP requests for 10.0.2.2 and 10.0.2.3 -- exactly the two addresses
  libslirp's ``arp_input`` answers (plus guestfwd targets, which we do not
  have).  Other 10.0.2.x stay unanswered, so a guest probing for a
  duplicate of its own address (DAD-style ARP) sees no conflict.  Like
  slirp the reply goes to the requester's Ethernet source and is zero-padded
  to 64 bytes; a gratuitous ARP (target == sender) is learned, never answered.
* ICMP echo requests to 10.0.2.2 or 10.0.2.3 -- slirp's ``icmp_input``
  reflects pings to both locally.  Same id, sequence and payload.
* UDP to port 7 on the gateway (RFC 862 echo): the datagram comes back with
  ports and addresses swapped.
* UDP to port 9 on the gateway (RFC 863 discard): swallowed, counted in
  ``counters["udp_discard"]`` / ``["udp_discard_bytes"]``.
* Everything else is dropped and counted in ``dropped[reason]``.

Deviation from slirp: replies carry the source MAC of the address that
answers (52:55:0a:00:02:03 for DNS); libslirp's ``if_encap4`` always uses
the gateway's, with an "XXX: not correct" comment.

Frames must arrive fully checksummed, as on a wire: a device that accepted
VIRTIO_NET_F_CSUM/TSO must run :func:`simvirt.net.offload.segment` first.
Bad checksums are drops, which is how tests catch a device that forgot.

:class:`UdpStream` is the other direction: ready-made UDP frames toward the
guest for receive-throughput runs, built once and patched per frame.
"""
from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator

from simvirt.net.checksum import finish, fold, ones_sum, pseudo_header_sum
from simvirt.net.offload import PartialCsumFrame
from simvirt.net.packets import (
    ARP_REPLY,
    ARP_REQUEST,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_HLEN,
    UDP_HLEN,
    Arp,
    PacketError,
    build_ethernet,
    icmp_echo_frame,
    ip_bytes,
    ipv4_header_valid,
    is_broadcast,
    is_multicast,
    parse_arp,
    parse_ethernet,
    parse_icmp_echo,
    parse_ipv4,
    parse_udp,
    udp_frame,
)

NETWORK = ip_bytes("10.0.2.0")
PREFIX_LEN = 24
GATEWAY_IP = ip_bytes("10.0.2.2")
DNS_IP = ip_bytes("10.0.2.3")
GUEST_IP = ip_bytes("10.0.2.15")
ECHO_PORT = 7
DISCARD_PORT = 9
ARP_REPLY_LEN = 64  # libslirp: MAX(ETH_HLEN + sizeof(arphdr), 64), zero-filled


def slirp_mac(ip: bytes) -> bytes:
    """libslirp's MAC for an emulated host: 52:55 followed by its IPv4 address."""
    return b"\x52\x55" + ip


GATEWAY_MAC = slirp_mac(GATEWAY_IP)  # 52:55:0a:00:02:02
DNS_MAC = slirp_mac(DNS_IP)


class Responder:
    """Answer a guest the way slirp's gateway would; see the module docstring.

    ``receive(frame)`` returns the frames to deliver back to the guest (often
    none).  ``counters`` counts what was handled, ``dropped`` why frames
    were not; both are plain ``Counter`` dicts for metrics export.
    """

    def __init__(
        self,
        *,
        gateway_ip: bytes = GATEWAY_IP,
        dns_ip: bytes = DNS_IP,
        guest_ip: bytes = GUEST_IP,
        ttl: int = 64,
    ) -> None:
        self.gateway_ip = gateway_ip
        self.guest_ip = guest_ip
        self.ttl = ttl
        self.hosts: dict[bytes, bytes] = {gateway_ip: slirp_mac(gateway_ip), dns_ip: slirp_mac(dns_ip)}
        self._our_macs = frozenset(self.hosts.values())
        self.guest_mac: bytes | None = None
        self.arp_table: dict[bytes, bytes] = {}
        self.counters: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._ip_id = 0
        # Last trusted discard header (see _fast_discard): bytes 12..39, frame length, payload bytes.
        self._memo: bytes | None = None
        self._memo_len = 0
        self._memo_payload = 0

    # ----------------------------------------------------------------- API
    def receive(self, frame: bytes | bytearray | memoryview | PartialCsumFrame) -> list[bytes]:
        """Answer one frame from the guest.

        A :class:`PartialCsumFrame` (the guest offloaded its UDP/TCP checksum,
        VIRTIO_NET_F_CSUM) is trusted as a local endpoint trusts
        CHECKSUM_PARTIAL data when it is discarded; any frame that needs a
        real answer gets its checksum completed first and is then checked
        like any other.
        """
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += len(frame)
        if type(frame) is PartialCsumFrame:
            if frame.csum_start == _UDP and frame.csum_offset == 6 and self._fast_discard(frame.data, trusted=True):
                return []
            frame = frame.completed()
        if self._fast_discard(frame):
            return []
        reply = self._fast_echo(frame)
        if reply is not None:
            self.counters["tx_frames"] += 1
            return [reply]
        try:
            out = self._dispatch(frame)
        except PacketError:
            out = self._drop("malformed")
        self.counters["tx_frames"] += len(out)
        return out

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def stats(self) -> dict[str, int]:
        """One flat dict: counters plus ``drop_<reason>`` entries."""
        out = dict(self.counters)
        out.update({f"drop_{k}": v for k, v in self.dropped.items()})
        return out

    # ------------------------------------------------------------ dispatch
    def _drop(self, reason: str) -> list[bytes]:
        self.dropped[reason] += 1
        return []

    def _dispatch(self, frame: bytes | bytearray | memoryview) -> list[bytes]:
        eth = parse_ethernet(frame)
        if eth.vlans:
            return self._drop("vlan_tagged")
        if is_multicast(eth.src):
            return self._drop("bad_src_mac")
        if not is_broadcast(eth.dst) and eth.dst not in self._our_macs:
            return self._drop("multicast" if is_multicast(eth.dst) else "not_our_mac")
        if eth.ethertype == ETH_P_ARP:
            return self._arp(frame, eth.src)
        if eth.ethertype == ETH_P_IP:
            return self._ipv4(frame, eth.src)
        if eth.ethertype == ETH_P_IPV6:
            return self._drop("ipv6_unsupported")
        return self._drop("ethertype_unsupported")

    def _learn(self, ip: bytes, mac: bytes) -> None:
        self.arp_table[ip] = mac
        if ip == self.guest_ip:
            self.guest_mac = mac

    def _arp(self, frame: bytes | bytearray | memoryview, eth_src: bytes) -> list[bytes]:
        try:
            arp = parse_arp(frame, ETH_HLEN)
        except PacketError:
            return self._drop("arp_malformed")
        if arp.op == ARP_REPLY:
            self._learn(arp.spa, arp.sha)
            self.counters["arp_reply_seen"] += 1
            return []
        if arp.op != ARP_REQUEST:
            return self._drop("arp_bad_op")
        if arp.tpa == arp.spa:
            self._learn(arp.spa, arp.sha)
            self.counters["arp_gratuitous"] += 1
            return []
        mac = self.hosts.get(arp.tpa)
        if mac is None:
            return self._drop("arp_not_ours")
        self._learn(arp.spa, arp.sha)
        self.counters["arp_reply"] += 1
        reply = build_ethernet(eth_src, mac, ETH_P_ARP) + Arp(ARP_REPLY, mac, arp.tpa, arp.sha, arp.spa).pack()
        return [reply.ljust(ARP_REPLY_LEN, b"\0")]

    def _next_id(self) -> int:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        return self._ip_id

    def _ipv4(self, frame: bytes | bytearray | memoryview, eth_src: bytes) -> list[bytes]:
        l3 = ETH_HLEN
        try:
            ip = parse_ipv4(frame, l3)
        except PacketError:
            return self._drop("ipv4_malformed")
        if l3 + ip.total_length > len(frame):
            return self._drop("ipv4_truncated")
        if not ipv4_header_valid(frame, l3, ip.header_len):
            return self._drop("ipv4_bad_checksum")
        if ip.is_fragment:
            return self._drop("ipv4_fragment")
        mac = self.hosts.get(ip.dst)
        if mac is None:
            return self._drop("ip_not_ours")
        if ip.src == self.guest_ip:
            self.guest_mac = eth_src
        l4 = l3 + ip.header_len
        end = l3 + ip.total_length  # drops Ethernet padding
        seg = memoryview(frame)[l4:end]
        if ip.proto == IPPROTO_ICMP:
            return self._icmp(seg, ip.src, ip.dst, eth_src, mac)
        if ip.proto == IPPROTO_UDP:
            return self._udp(seg, ip.src, ip.dst, eth_src, mac)
        if ip.proto == IPPROTO_TCP:
            return self._drop("tcp_unsupported")
        return self._drop("ip_proto_unsupported")

    def _icmp(self, seg: memoryview, src: bytes, dst: bytes, eth_src: bytes, mac: bytes) -> list[bytes]:
        try:
            echo = parse_icmp_echo(seg)
        except PacketError:
            return self._drop("icmp_malformed")
        if ones_sum(seg) != 0xFFFF:
            return self._drop("icmp_bad_checksum")
        if echo.type != ICMP_ECHO_REQUEST or echo.code != 0:
            return self._drop("icmp_not_echo_request")
        self.counters["icmp_echo_reply"] += 1
        return [
            icmp_echo_frame(
                mac, eth_src, dst, src, ICMP_ECHO_REPLY, echo.ident, echo.seq, seg[8:], ip_ident=self._next_id(), ttl=self.ttl
            )
        ]

    def _fast_discard(self, frame: bytes | bytearray | memoryview, trusted: bool = False) -> bool:
        """The throughput case, checked by offsets: untagged IPv4 (no options, not a
        fragment) UDP to the gateway's discard port with valid checksums.

        Anything that is not exactly that goes through the full path, which
        answers or drops it with a reason; the result is the same either way.
        ``trusted``: the UDP checksum is partial (offloaded by the guest), so
        it is not summed; the IP header still is.  The verdict is then a pure
        function of bytes 12..39 and the length, so a stream of identical
        headers (one flow) is validated once and matched after that.
        """
        if trusted and self._memo is not None and len(frame) == self._memo_len and frame[12:40] == self._memo:
            counters = self.counters
            counters["udp_discard"] += 1
            counters["udp_discard_bytes"] += self._memo_payload
            return True
        if (len(frame) < _SEQ or frame[12:14] != b"\x08\x00" or frame[14] != 0x45 or frame[23] != IPPROTO_UDP
                or frame[20] & 0x3F or frame[21] or frame[30:34] != self.gateway_ip or frame[36:38] != b"\x00\x09"):
            return False
        total = (frame[16] << 8) | frame[17]
        ulen = (frame[38] << 8) | frame[39]
        if total != IPV4_HLEN + ulen or _IP + total > len(frame) or ulen < UDP_HLEN:
            return False
        if ones_sum(frame[_IP:_UDP]) != 0xFFFF:
            return False
        if not trusted and (frame[40] or frame[41]) and ones_sum(
                frame[_UDP:_UDP + ulen], pseudo_header_sum(bytes(frame[26:30]), self.gateway_ip, IPPROTO_UDP, ulen)) != 0xFFFF:
            return False
        if trusted:
            self._memo, self._memo_len, self._memo_payload = bytes(frame[12:40]), len(frame), ulen - UDP_HLEN
        counters = self.counters
        counters["udp_discard"] += 1
        counters["udp_discard_bytes"] += ulen - UDP_HLEN
        return True

    def _fast_echo(self, frame: bytes | bytearray | memoryview) -> bytes | None:
        """The latency case, checked by offsets: an untagged IPv4 (no options, not a
        fragment) ICMP echo request to one of our addresses with valid checksums.

        The reply is assembled from slices of the request (addresses swapped,
        a fresh IP id, our TTL); its ICMP checksum is the sum of what follows
        the checksum field, since type, code and checksum are zero in it.
        Anything else returns None and takes the full path, which gives the
        same answer or a drop reason.
        """
        if type(frame) is not bytes:
            frame = bytes(frame)
        if (frame[12:15] != b"\x08\x00\x45" or len(frame) < _ICMP + 8 or frame[23] != IPPROTO_ICMP
                or frame[_ICMP] != ICMP_ECHO_REQUEST or frame[_ICMP + 1] or frame[20] & 0x3F or frame[21]):
            return None
        dst_ip = frame[30:34]
        mac = self.hosts.get(dst_ip)
        if mac is None or frame[6] & 1:
            return None
        eth_dst = frame[0:6]
        if eth_dst != mac and eth_dst != _BROADCAST:
            return None
        total = (frame[16] << 8) | frame[17]
        end = _IP + total
        if total < IPV4_HLEN + 8 or end > len(frame):
            return None
        icmp = frame[_ICMP:end]
        if ones_sum(frame[_IP:_ICMP]) != 0xFFFF or ones_sum(icmp) != 0xFFFF:
            return None
        src_ip = frame[26:30]
        eth_src = frame[6:12]
        if src_ip == self.guest_ip:
            self.guest_mac = eth_src
        ident = self._ip_id = (self._ip_id + 1) & 0xFFFF
        iph = _ECHO_IP_HDR.pack(0x45, 0, total, ident, 0x4000, self.ttl, IPPROTO_ICMP, 0) + dst_ip + src_ip
        rest = icmp[4:]
        self.counters["icmp_echo_reply"] += 1
        return b"".join((eth_src, mac, b"\x08\x00", iph[:10], (~ones_sum(iph) & 0xFFFF).to_bytes(2, "big"), iph[12:],
                         b"\x00\x00", (~ones_sum(rest) & 0xFFFF).to_bytes(2, "big"), rest))

    def _udp(self, seg: memoryview, src: bytes, dst: bytes, eth_src: bytes, mac: bytes) -> list[bytes]:
        try:
            udp = parse_udp(seg)
        except PacketError:
            return self._drop("udp_malformed")
        if not UDP_HLEN <= udp.length <= len(seg):
            return self._drop("udp_bad_length")
        seg = seg[: udp.length]
        if udp.checksum and ones_sum(seg, pseudo_header_sum(src, dst, IPPROTO_UDP, udp.length)) != 0xFFFF:
            return self._drop("udp_bad_checksum")
        if dst != self.gateway_ip:
            return self._drop("udp_no_service")
        if udp.dport == ECHO_PORT:
            self.counters["udp_echo"] += 1
            self.counters["udp_echo_bytes"] += udp.length - UDP_HLEN
            return [
                udp_frame(mac, eth_src, dst, src, udp.dport, udp.sport, seg[UDP_HLEN:], ident=self._next_id(), ttl=self.ttl)
            ]
        if udp.dport == DISCARD_PORT:
            self.counters["udp_discard"] += 1
            self.counters["udp_discard_bytes"] += udp.length - UDP_HLEN
            return []
        return self._drop("udp_port_closed")


# IPv4 header + UDP header offsets inside an untagged frame.
_IP = ETH_HLEN
_IP_ID = _IP + 4
_IP_CSUM = _IP + 10
_UDP = _IP + IPV4_HLEN
_UDP_CSUM = _UDP + 6
_ICMP = _UDP  # ICMP also starts right after an option-less IPv4 header
_ECHO_IP_HDR = struct.Struct("!BBHHHBBH")
_BROADCAST = b"\xff" * 6
_SEQ = _UDP + UDP_HLEN
_ID_TO_CSUM = struct.Struct("!HHBBH")
_CSUM_SEQ = struct.Struct("!HQ")
MIN_STREAM_FRAME = _SEQ + 8  # 50: headers plus the 8-byte sequence number
MAX_STREAM_FRAME = ETH_HLEN + 0xFFFF
_PATTERN = bytes(range(256))


class UdpStream:
    """UDP frames from 10.0.2.2:9 to the guest, cheap enough for receive benchmarks.

    Every frame is ``size`` bytes (Ethernet header included, no FCS).  Its
    payload starts with a big-endian u64 sequence number followed by a fixed
    byte pattern (``payload_for(seq)`` reproduces it for verification).  The
    frame is built once; each new frame patches only the IP id, the
    sequence number and the two checksums, whose bases are precomputed, so
    no byte of the payload is summed again.
    """

    def __init__(
        self,
        size: int,
        *,
        dst_mac: bytes,
        dst_port: int = 5001,
        src_port: int = DISCARD_PORT,
        src_ip: bytes = GATEWAY_IP,
        dst_ip: bytes = GUEST_IP,
        src_mac: bytes = GATEWAY_MAC,
        start_seq: int = 0,
        ttl: int = 64,
    ) -> None:
        if not MIN_STREAM_FRAME <= size <= MAX_STREAM_FRAME:
            raise ValueError(f"UDP stream frames must be {MIN_STREAM_FRAME}..{MAX_STREAM_FRAME} bytes, not {size}")
        self.size = size
        self.seq = start_seq
        self.frames = 0
        payload = self.payload_for(0, size - _SEQ)
        frame = udp_frame(src_mac, dst_mac, src_ip, dst_ip, src_port, dst_port, payload, ident=0, ttl=ttl, checksum=False)
        self._template = bytearray(frame)
        self._template[_IP_CSUM : _IP_CSUM + 2] = b"\0\0"
        self._frag = int.from_bytes(frame[_IP_ID + 2 : _IP_ID + 4], "big")
        self._ttl = ttl
        # Sums with the patched fields (IP id, seq, both checksums) at zero.
        self._ip_base = ones_sum(memoryview(self._template)[_IP:_UDP])
        udp_len = size - _UDP
        self._udp_base = ones_sum(memoryview(self._template)[_UDP:], pseudo_header_sum(src_ip, dst_ip, IPPROTO_UDP, udp_len))

    @staticmethod
    def payload_for(seq: int, length: int) -> bytes:
        """The UDP payload of frame ``seq`` when it is ``length`` bytes long."""
        body = length - 8
        return seq.to_bytes(8, "big") + (_PATTERN * (body // 256 + 1))[:body]

    def _advance(self) -> bytearray:
        """Patch the template into the next frame and return it (shared, do not keep)."""
        t = self._template
        seq = self.seq
        ident = seq & 0xFFFF
        ip_csum = ~fold(self._ip_base + ident) & 0xFFFF
        udp_csum = finish(self._udp_base + seq)  # a u64 is congruent to its words' sum mod 0xFFFF
        # Two pack_into calls: (id, frag, ttl, proto, checksum) and (UDP checksum, seq) are contiguous.
        _ID_TO_CSUM.pack_into(t, _IP_ID, ident, self._frag, self._ttl, IPPROTO_UDP, ip_csum)
        _CSUM_SEQ.pack_into(t, _UDP_CSUM, udp_csum, seq)
        self.seq = (seq + 1) & 0xFFFFFFFFFFFFFFFF
        self.frames += 1
        return t

    def write_into(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        """Write the next frame into ``buf`` at ``offset`` (e.g. a guest receive buffer); return its length."""
        if len(buf) - offset < self.size:
            raise ValueError(f"buffer has {len(buf) - offset} bytes at offset {offset}, frame needs {self.size}")
        buf[offset : offset + self.size] = self._advance()
        return self.size

    def next_frame(self) -> bytes:
        return bytes(self._advance())

    def take(self, n: int) -> list[bytes]:
        return [self.next_frame() for _ in range(n)]

    def __iter__(self) -> Iterator[bytes]:
        while True:
            yield self.next_frame()

