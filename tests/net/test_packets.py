"""Header parsing/building (simvirt/net/packets.py)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from netref import ref_ipv4_ok, ref_l4_ok
from simvirt.net import packets as P

MAC_A = bytes.fromhex("525400123456")
MAC_B = bytes.fromhex("52550a000202")
V4_A, V4_B = P.ip_bytes("10.0.2.15"), P.ip_bytes("10.0.2.2")
V6_A, V6_B = P.ip_bytes("fec0::15"), P.ip_bytes("fec0::2")


def test_mac_helpers():
    assert P.parse_mac("52:55:0A:00:02:02") == MAC_B
    assert P.parse_mac("52-55-0a-00-02-02") == MAC_B
    assert P.mac_str(MAC_B) == "52:55:0a:00:02:02"
    for bad in ("52:55:0a:00:02", "52:55:0a:00:02:zz", "525:5:0a:00:02:02", ""):
        with pytest.raises(ValueError):
            P.parse_mac(bad)
    with pytest.raises(ValueError):
        P.mac_str(b"\0" * 5)
    assert P.is_broadcast(P.BROADCAST_MAC) and P.is_multicast(P.BROADCAST_MAC)
    assert P.is_multicast(bytes.fromhex("01005e000001")) and not P.is_broadcast(bytes.fromhex("01005e000001"))
    assert P.is_multicast(bytes.fromhex("333300000001"))
    assert P.is_unicast(MAC_A) and not P.is_multicast(MAC_A)
    assert P.is_locally_administered(MAC_A) and not P.is_locally_administered(bytes.fromhex("001122334455"))


@given(st.binary(min_size=6, max_size=6))
def test_mac_roundtrip(mac):
    assert P.parse_mac(P.mac_str(mac)) == mac


def test_ethernet_untagged_and_vlan():
    hdr = P.build_ethernet(MAC_B, MAC_A, P.ETH_P_IP)
    assert hdr == MAC_B + MAC_A + b"\x08\x00"
    eth = P.parse_ethernet(hdr)
    assert eth == P.Ethernet(MAC_B, MAC_A, P.ETH_P_IP, (), 14) and eth.vlan_id is None

    tagged = P.build_ethernet(MAC_B, MAC_A, P.ETH_P_ARP, vlans=0x2064)  # PCP 1, VID 100
    assert tagged == MAC_B + MAC_A + b"\x81\x00\x20\x64\x08\x06"
    eth = P.parse_ethernet(tagged)
    assert (eth.ethertype, eth.vlans, eth.header_len, eth.vlan_id) == (P.ETH_P_ARP, (0x2064,), 18, 100)

    qinq = P.build_ethernet(MAC_B, MAC_A, P.ETH_P_IPV6, vlans=(10, 20))
    assert qinq[12:14] == b"\x88\xa8" and qinq[16:18] == b"\x81\x00"
    eth = P.parse_ethernet(qinq)
    assert (eth.ethertype, eth.vlans, eth.header_len) == (P.ETH_P_IPV6, (10, 20), 22)
    assert eth.pack() == qinq

    with pytest.raises(P.PacketError):
        P.parse_ethernet(hdr[:13])
    with pytest.raises(P.PacketError):
        P.parse_ethernet(tagged[:16])
    with pytest.raises(P.PacketError):  # three tags
        P.parse_ethernet(MAC_B + MAC_A + b"\x81\x00\0\1" * 3 + b"\x08\x00")


def test_arp_roundtrip_and_validation():
    frame = P.arp_frame(P.ARP_REQUEST, MAC_A, V4_A, P.ZERO_MAC, V4_B)
    assert len(frame) == 42 and frame[:6] == P.BROADCAST_MAC
    assert frame[14:22] == bytes.fromhex("0001 0800 06 04 0001")
    arp = P.parse_arp(frame, 14)
    assert arp == P.Arp(P.ARP_REQUEST, MAC_A, V4_A, P.ZERO_MAC, V4_B)
    reply = P.arp_frame(P.ARP_REPLY, MAC_B, V4_B, MAC_A, V4_A)
    assert reply[:6] == MAC_A
    bad = bytearray(frame)
    bad[15] = 0x06  # ptype 0x0806
    with pytest.raises(P.PacketError):
        P.parse_arp(bad, 14)
    with pytest.raises(P.PacketError):
        P.parse_arp(frame[:41], 14)


def test_ipv4_build_parse():
    hdr = P.build_ipv4(V4_A, V4_B, P.IPPROTO_UDP, 100, ident=0x1234, ttl=17, tos=0x10)
    assert ref_ipv4_ok(hdr)
    ip = P.parse_ipv4(hdr)
    assert (ip.total_length, ip.ident, ip.ttl, ip.proto, ip.src, ip.dst, ip.header_len, ip.tos) == (
        120, 0x1234, 17, 17, V4_A, V4_B, 20, 0x10)
    assert ip.df and not ip.is_fragment
    assert P.ipv4_header_valid(hdr, 0, 20)
    opts = P.build_ipv4(V4_A, V4_B, 6, 0, options=b"\x01\x01\x01\x00")
    assert P.parse_ipv4(opts).header_len == 24 and ref_ipv4_ok(opts)
    with pytest.raises(ValueError):
        P.build_ipv4(V4_A, V4_B, 6, 65516)
    for bad, why in (
        (b"\x65" + hdr[1:], "version"),
        (b"\x44" + hdr[1:], "ihl"),
        (hdr[:19], "short"),
        (hdr[:2] + b"\x00\x10" + hdr[4:], "total<hl"),
        (b"\x46" + hdr[1:], "options missing"),
    ):
        with pytest.raises(P.PacketError):
            P.parse_ipv4(bad)
        assert why


def test_ipv6_build_parse_and_extension_headers():
    hdr = P.build_ipv6(V6_A, V6_B, P.IPPROTO_TCP, 20, hop_limit=9, traffic_class=0xB8, flow_label=0x12345)
    ip = P.parse_ipv6(hdr)
    assert (ip.traffic_class, ip.flow_label, ip.payload_length, ip.next_header, ip.hop_limit) == (0xB8, 0x12345, 20, 6, 9)
    assert (ip.l4_proto, ip.header_len, ip.fragment_offset, ip.src, ip.dst) == (6, 40, -1, V6_A, V6_B)
    # hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP
    hbh = bytes([P.IPPROTO_DSTOPTS, 0]) + b"\x01\x04\0\0\0\0"
    dst = bytes([P.IPPROTO_UDP, 1]) + b"\x01\x0c" + b"\0" * 12
    chain = P.build_ipv6(V6_A, V6_B, P.IPPROTO_HOPOPTS, 24 + 8) + hbh + dst
    ip = P.parse_ipv6(chain)
    assert (ip.l4_proto, ip.header_len) == (P.IPPROTO_UDP, 64)
    frag = P.build_ipv6(V6_A, V6_B, P.IPPROTO_FRAGMENT, 8) + bytes([P.IPPROTO_UDP, 0]) + struct.pack("!HI", 185 << 3, 7)
    assert P.parse_ipv6(frag).fragment_offset == 1480
    with pytest.raises(P.PacketError):
        P.parse_ipv6(chain[:60])
    endless = P.build_ipv6(V6_A, V6_B, P.IPPROTO_DSTOPTS, 80) + (bytes([P.IPPROTO_DSTOPTS, 0]) + b"\0" * 6) * 10
    with pytest.raises(P.PacketError):
        P.parse_ipv6(endless)
    with pytest.raises(P.PacketError):
        P.parse_ipv6(b"\x40" + hdr[1:])


@given(st.binary(max_size=1500), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.booleans())
def test_udp_checksums_verify_independently(payload, sport, dport, v6):
    src, dst = (V6_A, V6_B) if v6 else (V4_A, V4_B)
    seg = P.build_udp(sport, dport, payload, src, dst)
    assert ref_l4_ok(src, dst, 17, seg)
    assert P.l4_checksum_ok(src, dst, 17, seg)
    u = P.parse_udp(seg)
    assert (u.sport, u.dport, u.length) == (sport, dport, 8 + len(payload)) and u.checksum != 0


@given(st.binary(max_size=1500), st.integers(0, 2**32 - 1), st.integers(0, 0xFF), st.booleans())
def test_tcp_checksums_verify_independently(payload, seq, flags, v6):
    src, dst = (V6_A, V6_B) if v6 else (V4_A, V4_B)
    seg = P.build_tcp(1, 2, seq, 99, flags, payload, src, dst, options=b"\x02\x04\x05\xb4")
    assert ref_l4_ok(src, dst, 6, seg)
    t = P.parse_tcp(seg)
    assert (t.seq, t.ack, t.flags, t.header_len, t.window) == (seq, 99, flags, 24, 65535)


def test_partial_checksum_holds_the_pseudo_header_sum():
    seg = P.build_tcp(1, 2, 3, 4, P.TCP_ACK, b"data", V4_A, V4_B, checksum="partial")
    (field,) = struct.unpack_from("!H", seg, 16)
    assert field == P.pseudo_header_sum(V4_A, V4_B, 6, len(seg))
    assert P.parse_udp(P.build_udp(1, 2, b"x", V4_A, V4_B, checksum=False)).checksum == 0
    with pytest.raises(ValueError):
        P.build_udp(1, 2, b"x", V4_A, V4_B, checksum="bogus")


def test_udp_zero_checksum_is_sent_as_ffff():
    # Find a payload whose UDP checksum computes to 0: it must go out as 0xFFFF (RFC 768).
    base = P.build_udp(1, 2, b"\0\0", V4_A, V4_B, checksum=False)
    s = P.ones_sum(base, P.pseudo_header_sum(V4_A, V4_B, 17, len(base)))
    filler = (0xFFFF - s) & 0xFFFF  # makes the total sum 0xFFFF -> checksum 0
    seg = P.build_udp(1, 2, struct.pack("!H", filler), V4_A, V4_B)
    assert P.parse_udp(seg).checksum == 0xFFFF and ref_l4_ok(V4_A, V4_B, 17, seg)


def test_tcp_parse_rejects_bad_offsets():
    seg = P.build_tcp(1, 2, 3, 4, 0, b"", V4_A, V4_B)
    with pytest.raises(P.PacketError):
        P.parse_tcp(seg[:19])
    with pytest.raises(P.PacketError):
        P.parse_tcp(seg[:12] + b"\x40" + seg[13:])  # data offset 16
    with pytest.raises(P.PacketError):
        P.parse_tcp(seg[:12] + b"\xf0" + seg[13:])  # 60-byte header in 20 bytes


def test_icmp_echo_v4_and_v6():
    msg = P.build_icmp_echo(P.ICMP_ECHO_REQUEST, 0xBEEF, 3, b"ping")
    assert msg[:8] == bytes.fromhex("0800") + msg[2:4] + bytes.fromhex("beef0003")
    assert P.internet_checksum(msg) == 0
    assert P.parse_icmp_echo(msg) == P.IcmpEcho(8, 0, struct.unpack_from("!H", msg, 2)[0], 0xBEEF, 3)
    f6 = P.icmp_echo_frame(MAC_A, MAC_B, V6_A, V6_B, P.ICMPV6_ECHO_REQUEST, 1, 2, b"x" * 33)
    info = P.parse_frame(f6)
    assert info.l4_proto == P.IPPROTO_ICMPV6
    assert ref_l4_ok(V6_A, V6_B, 58, f6[info.l4_offset:info.l3_end])
    with pytest.raises(P.PacketError):
        P.parse_icmp_echo(msg[:7])


def test_parse_frame_locates_layers_and_ignores_padding():
    f = P.udp_frame(MAC_A, MAC_B, V4_A, V4_B, 1000, 7, b"hi")
    padded = P.pad_frame(f)
    assert len(f) == 44 and len(padded) == 60
    info = P.parse_frame(padded)
    assert (info.l3_offset, info.l4_offset, info.l4_proto, info.l3_end) == (14, 34, 17, 44)
    tagged = P.udp_frame(MAC_A, MAC_B, V4_A, V4_B, 1000, 7, b"hi", vlan=5)
    info = P.parse_frame(tagged)
    assert (info.eth.vlan_id, info.l3_offset, info.l4_offset) == (5, 18, 38)
    v6 = P.tcp_frame(MAC_A, MAC_B, V6_A, V6_B, 1, 2, 3, 4, P.TCP_SYN, b"")
    info = P.parse_frame(v6)
    assert (info.l4_offset, info.l4_proto, info.l3_end) == (54, 6, 74)
    arp = P.parse_frame(P.arp_frame(1, MAC_A, V4_A, P.ZERO_MAC, V4_B))
    assert arp.ip is None and arp.l4_offset == -1
    with pytest.raises(P.PacketError):  # IP length beyond the frame
        P.parse_frame(f[:-1])


def test_parse_frame_fragments_have_no_l4():
    f = bytearray(P.udp_frame(MAC_A, MAC_B, V4_A, V4_B, 1, 2, b"x" * 16))
    struct.pack_into("!H", f, 20, 0x0002)  # fragment offset 16 bytes
    assert P.parse_frame(bytes(f)).l4_offset == -1


@given(st.binary(max_size=200))
def test_parsers_never_overread(junk):
    # Garbage must raise PacketError (a ValueError), never IndexError/struct.error.
    for fn in (P.parse_frame, P.parse_ethernet, P.parse_ipv4, P.parse_ipv6, P.parse_tcp, P.parse_udp, P.parse_arp):
        try:
            fn(junk)
        except P.PacketError:
            pass


def test_offload_names_reexported():
    from simvirt.net import offload

    assert P.segment is offload.segment and P.complete_checksum is offload.complete_checksum
    with pytest.raises(AttributeError):
        P.no_such_name  # noqa: B018
