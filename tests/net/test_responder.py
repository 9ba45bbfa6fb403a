"""The slirp-like responder and the UDP stream generator (simvirt/net/responder.py)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from netref import ref_ipv4_ok, ref_l4_ok
from simvirt.net import packets as P
from simvirt.net.responder import (
    ARP_REPLY_LEN,
    DNS_IP,
    DNS_MAC,
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    MIN_STREAM_FRAME,
    Responder,
    UdpStream,
    slirp_mac,
)

GUEST_MAC = bytes.fromhex("525400123456")


def test_slirp_addresses():
    assert GATEWAY_MAC == bytes.fromhex("52550a000202") and DNS_MAC == bytes.fromhex("52550a000203")
    assert P.ip_str(GATEWAY_IP) == "10.0.2.2" and P.ip_str(GUEST_IP) == "10.0.2.15"
    assert slirp_mac(P.ip_bytes("192.168.1.7")) == bytes.fromhex("5255c0a80107")


@pytest.mark.parametrize("target, mac", [(GATEWAY_IP, GATEWAY_MAC), (DNS_IP, DNS_MAC)])
def test_arp_reply_is_byte_exact(target, mac):
    r = Responder()
    (reply,) = r.receive(P.arp_frame(P.ARP_REQUEST, GUEST_MAC, GUEST_IP, P.ZERO_MAC, target))
    expected = (
        GUEST_MAC + mac + b"\x08\x06"  # to the requester, from the answering host
        + bytes.fromhex("0001 0800 06 04 0002")  # Ethernet/IPv4, reply
        + mac + target + GUEST_MAC + GUEST_IP
    ).ljust(64, b"\0")  # libslirp pads ARP replies to 64 bytes
    assert reply == expected and len(reply) == ARP_REPLY_LEN
    assert r.counters["arp_reply"] == 1 and r.guest_mac == GUEST_MAC and r.arp_table[GUEST_IP] == GUEST_MAC


def test_arp_reply_goes_to_ethernet_source_even_if_sha_differs():
    r = Responder()
    other = bytes.fromhex("525400aaaaaa")
    frame = P.build_ethernet(P.BROADCAST_MAC, other, P.ETH_P_ARP) + P.Arp(1, GUEST_MAC, GUEST_IP, P.ZERO_MAC, GATEWAY_IP).pack()
    (reply,) = r.receive(frame)
    assert reply[:6] == other and reply[32:38] == GUEST_MAC


def test_arp_not_ours_gratuitous_and_replies():
    r = Responder()
    assert r.receive(P.arp_frame(1, GUEST_MAC, GUEST_IP, P.ZERO_MAC, P.ip_bytes("10.0.2.99"))) == []
    assert r.dropped["arp_not_ours"] == 1
    assert r.receive(P.arp_frame(1, GUEST_MAC, GUEST_IP, P.ZERO_MAC, GUEST_IP)) == []  # gratuitous
    assert r.counters["arp_gratuitous"] == 1 and r.guest_mac == GUEST_MAC
    r2 = Responder()
    assert r2.receive(P.arp_frame(P.ARP_REPLY, GUEST_MAC, GUEST_IP, GATEWAY_MAC, GATEWAY_IP)) == []
    assert r2.counters["arp_reply_seen"] == 1 and r2.guest_mac == GUEST_MAC
    bad_op = P.build_ethernet(P.BROADCAST_MAC, GUEST_MAC, P.ETH_P_ARP) + P.Arp(3, GUEST_MAC, GUEST_IP, P.ZERO_MAC, GATEWAY_IP).pack()
    assert r2.receive(bad_op) == [] and r2.dropped["arp_bad_op"] == 1
    assert r2.receive(P.build_ethernet(P.BROADCAST_MAC, GUEST_MAC, P.ETH_P_ARP) + b"\0" * 10) == []
    assert r2.dropped["arp_malformed"] == 1


@pytest.mark.parametrize("target, mac", [(GATEWAY_IP, GATEWAY_MAC), (DNS_IP, DNS_MAC)])
def test_icmp_echo_reply_fields(target, mac):
    r = Responder()
    payload = bytes(range(56))
    req = P.icmp_echo_frame(GUEST_MAC, mac, GUEST_IP, target, P.ICMP_ECHO_REQUEST, 0x4D2, 9, payload, ip_ident=555)
    (rep,) = r.receive(req)
    assert rep[:6] == GUEST_MAC and rep[6:12] == mac and rep[12:14] == b"\x08\x00"
    ip = P.parse_ipv4(rep, 14)
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.total_length) == (target, GUEST_IP, 1, 64, 20 + 8 + 56)
    assert ref_ipv4_ok(rep[14:34])
    icmp = rep[34:]
    assert icmp[:2] == b"\x00\x00" and icmp[4:8] == struct.pack("!HH", 0x4D2, 9) and icmp[8:] == payload
    assert P.ones_sum(icmp) == 0xFFFF
    assert r.counters["icmp_echo_reply"] == 1


def test_icmp_ignores_ethernet_padding_and_rejects_bad_checksum():
    r = Responder()
    req = P.icmp_echo_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 8, 1, 1, b"")
    (rep,) = r.receive(P.pad_frame(req))  # 42 bytes padded to 60
    assert len(rep) == 42 and rep[34 + 8:] == b""
    bad = bytearray(req)
    bad[-1] ^= 1
    assert r.receive(bytes(bad)) == [] and r.dropped["icmp_bad_checksum"] == 1
    reply_in = P.icmp_echo_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, P.ICMP_ECHO_REPLY, 1, 1, b"")
    assert r.receive(reply_in) == [] and r.dropped["icmp_not_echo_request"] == 1


def test_udp_echo_byte_exact():
    r = Responder()
    req = P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 33333, 7, b"hello, echo")
    (rep,) = r.receive(req)
    assert rep[:12] == GUEST_MAC + GATEWAY_MAC
    ip = P.parse_ipv4(rep, 14)
    assert (ip.src, ip.dst, ip.proto) == (GATEWAY_IP, GUEST_IP, 17) and ref_ipv4_ok(rep[14:34])
    assert rep[34:42] == struct.pack("!HHH", 7, 33333, 19) + rep[40:42]
    assert rep[42:] == b"hello, echo" and ref_l4_ok(GATEWAY_IP, GUEST_IP, 17, rep[34:])
    assert r.counters["udp_echo"] == 1 and r.counters["udp_echo_bytes"] == 11


def test_udp_discard_counts():
    r = Responder()
    for n in (0, 100, 1472):
        assert r.receive(P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 9, bytes(n))) == []
    assert r.counters["udp_discard"] == 3 and r.counters["udp_discard_bytes"] == 1572
    assert r.dropped_total == 0


def test_udp_without_checksum_is_accepted_bad_checksum_is_not():
    r = Responder()
    nocsum = P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 7, b"x", checksum=False)
    assert len(r.receive(nocsum)) == 1
    partial = P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 7, b"x", checksum="partial")
    assert r.receive(partial) == [] and r.dropped["udp_bad_checksum"] == 1  # a device forgot complete_checksum


@pytest.mark.parametrize(
    "frame, reason",
    [
        (P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 53, b"q"), "udp_port_closed"),
        (P.udp_frame(GUEST_MAC, DNS_MAC, GUEST_IP, DNS_IP, 1, 53, b"q"), "udp_no_service"),
        (P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, P.ip_bytes("8.8.8.8"), 1, 53, b"q"), "ip_not_ours"),
        (P.tcp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 80, 0, 0, P.TCP_SYN, b""), "tcp_unsupported"),
        (P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 7, b"q", vlan=5), "vlan_tagged"),
        (P.udp_frame(GUEST_MAC, bytes.fromhex("525400999999"), GUEST_IP, GATEWAY_IP, 1, 7, b"q"), "not_our_mac"),
        (P.udp_frame(GUEST_MAC, bytes.fromhex("01005e000001"), GUEST_IP, GATEWAY_IP, 1, 7, b"q"), "multicast"),
        (P.udp_frame(bytes.fromhex("01005e000001"), GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 7, b"q"), "bad_src_mac"),
        (P.udp_frame(GUEST_MAC, GATEWAY_MAC, P.ip_bytes("fec0::15"), P.ip_bytes("fec0::2"), 1, 7, b"q"), "ipv6_unsupported"),
        (P.build_ethernet(GATEWAY_MAC, GUEST_MAC, 0x88CC) + bytes(46), "ethertype_unsupported"),
        (P.build_ethernet(GATEWAY_MAC, GUEST_MAC, P.ETH_P_IP) + P.ip_packet(GUEST_IP, GATEWAY_IP, 47, b"gre"), "ip_proto_unsupported"),
        (b"\x01\x02", "malformed"),
    ],
)
def test_drop_reasons(frame, reason):
    r = Responder()
    assert r.receive(frame) == []
    assert dict(r.dropped) == {reason: 1}
    assert r.stats()[f"drop_{reason}"] == 1 and r.counters["rx_frames"] == 1


def test_ipv4_header_problems():
    r = Responder()
    good = P.udp_frame(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 7, b"abc")
    bad = bytearray(good)
    bad[24] ^= 0xFF  # header checksum
    assert r.receive(bytes(bad)) == [] and r.dropped["ipv4_bad_checksum"] == 1
    assert r.receive(good[:-2]) == [] and r.dropped["ipv4_truncated"] == 1
    frag = bytearray(good)
    struct.pack_into("!H", frag, 20, P.IP_MF)
    frag[24:26] = b"\0\0"
    struct.pack_into("!H", frag, 24, P.internet_checksum(frag[14:34]))
    assert r.receive(bytes(frag)) == [] and r.dropped["ipv4_fragment"] == 1
    assert r.receive(good[:14] + b"\x45" + bytes(5)) == [] and r.dropped["ipv4_malformed"] == 1


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_garbage_never_raises(junk):
    r = Responder()
    for frame in (junk, GATEWAY_MAC + GUEST_MAC + b"\x08\x00" + junk, P.BROADCAST_MAC + GUEST_MAC + b"\x08\x06" + junk):
        out = r.receive(frame)
        assert isinstance(out, list)
    assert r.counters["rx_frames"] == 3


def test_udp_stream_frames_are_valid_and_sequenced():
    s = UdpStream(1514, dst_mac=GUEST_MAC, dst_port=6000, start_seq=0xFFFE)
    frames = s.take(4)
    for i, f in enumerate(frames):
        seq = 0xFFFE + i
        assert len(f) == 1514 and f[:12] == GUEST_MAC + GATEWAY_MAC
        ip = P.parse_ipv4(f, 14)
        assert (ip.src, ip.dst, ip.ident, ip.total_length) == (GATEWAY_IP, GUEST_IP, seq & 0xFFFF, 1500)
        assert ref_ipv4_ok(f[14:34])
        udp = P.parse_udp(f, 34)
        assert (udp.sport, udp.dport, udp.length) == (9, 6000, 1480) and ref_l4_ok(GATEWAY_IP, GUEST_IP, 17, f[34:])
        assert f[42:] == UdpStream.payload_for(seq, 1472)
    assert s.frames == 4 and s.seq == 0xFFFE + 4
    # And the responder would accept what the stream produces if it were sent back.
    assert P.parse_frame(frames[0]).l4_proto == 17


@given(st.integers(MIN_STREAM_FRAME, 9014), st.integers(0, 2**64 - 1))
@settings(max_examples=40)
def test_udp_stream_checksums_any_size_and_seq(size, seq):
    s = UdpStream(size, dst_mac=GUEST_MAC, start_seq=seq)
    buf = bytearray(size + 10)
    assert s.write_into(buf, 10) == size
    f = bytes(buf[10:])
    assert ref_ipv4_ok(f[14:34]) and ref_l4_ok(GATEWAY_IP, GUEST_IP, 17, f[34:])
    assert int.from_bytes(f[42:50], "big") == seq
    assert s.seq == (seq + 1) % 2**64


def test_udp_stream_limits():
    with pytest.raises(ValueError):
        UdpStream(MIN_STREAM_FRAME - 1, dst_mac=GUEST_MAC)
    with pytest.raises(ValueError):
        UdpStream(14 + 65536, dst_mac=GUEST_MAC)
    s = UdpStream(100, dst_mac=GUEST_MAC)
    with pytest.raises(ValueError):
        s.write_into(bytearray(99))
    it = iter(s)
    assert len(next(it)) == 100 and s.frames == 1


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=1600), ident=st.integers(0, 0xFFFF), seq=st.integers(0, 0xFFFF),
       target=st.sampled_from([GATEWAY_IP, DNS_IP]), corrupt=st.sampled_from([None, "icmp", "ip", "code"]))
def test_fast_echo_path_answers_exactly_like_the_full_path(payload, ident, seq, target, corrupt):
    """The latency fast path must be invisible: same reply bytes, same drops."""
    mac = slirp_mac(target)
    frame = bytearray(P.icmp_echo_frame(GUEST_MAC, mac, GUEST_IP, target, P.ICMP_ECHO_REQUEST, ident, seq, payload))
    if corrupt == "icmp":
        frame[-1 if payload else 36] ^= 0x01
    elif corrupt == "ip":
        frame[22] ^= 0x10  # TTL: the IP header checksum no longer holds
    elif corrupt == "code":
        frame[35] = 1
    fast, full = Responder(), Responder()
    got = fast.receive(bytes(frame))
    want = full._dispatch(bytes(frame))
    assert got == want
    if corrupt is None:
        assert len(got) == 1 and ref_ipv4_ok(got[0][14:]) and fast.counters["icmp_echo_reply"] == 1
    else:
        assert got == [] and fast.dropped == full.dropped and sum(fast.dropped.values()) == 1
