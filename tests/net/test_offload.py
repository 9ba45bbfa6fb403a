"""Software GSO and checksum completion (simvirt/net/offload.py).

Every produced frame is checked with the independent word-loop checksum in
netref.py, never with simvirt's own checksum code.
"""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from netref import ref_ipv4_ok, ref_l4_ok
from simvirt.net import packets as P
from simvirt.net.offload import OffloadError, complete_checksum, complete_checksum_into, segment
from simvirt.net.spec import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM as NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VirtioNetHdr,
)

MAC_G = bytes.fromhex("525400123456")
MAC_H = bytes.fromhex("52550a000202")
V4_G, V4_H = P.ip_bytes("10.0.2.15"), P.ip_bytes("10.0.2.2")
V6_G, V6_H = P.ip_bytes("fec0::15"), P.ip_bytes("fec0::2")
TS_OPTS = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)  # NOP NOP timestamps: 32-byte TCP header


def tso_frame(payload, *, v6=False, flags=P.TCP_ACK | P.TCP_PSH, seq=0xFFFF0000, ident=0xFFF0, vlan=None, options=TS_OPTS):
    src, dst = (V6_G, V6_H) if v6 else (V4_G, V4_H)
    frame = P.tcp_frame(MAC_G, MAC_H, src, dst, 40000, 5001, seq, 77, flags, payload, ident=ident, vlan=vlan,
                        options=options, checksum="partial")
    info = P.parse_frame(frame)
    gso = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    hdr_len = info.l4_offset + 20 + len(options)
    return frame, info, gso, hdr_len


def check_tcp_segments(segs, payload, *, v6, seq0, flags0, ident0, mss, l3_off=14):
    src, dst = (V6_G, V6_H) if v6 else (V4_G, V4_H)
    data = b""
    for i, seg in enumerate(segs):
        info = P.parse_frame(seg)
        assert info.l3_offset == l3_off and info.l3_end == len(seg)
        l4 = bytes(seg[info.l4_offset:])
        assert ref_l4_ok(src, dst, 6, l4), f"segment {i}: bad TCP checksum"
        tcp = P.parse_tcp(seg, info.l4_offset)
        chunk = l4[tcp.header_len:]
        assert 0 < len(chunk) <= mss
        if i < len(segs) - 1:
            assert len(chunk) == mss
        assert tcp.seq == (seq0 + len(data)) & 0xFFFFFFFF, f"segment {i}: sequence gap"
        want = flags0
        if i:
            want &= ~P.TCP_CWR
        if i < len(segs) - 1:
            want &= ~(P.TCP_FIN | P.TCP_PSH)
        assert tcp.flags == want, f"segment {i}: flags {tcp.flags:#x} != {want:#x}"
        if v6:
            assert info.ip.payload_length == len(seg) - l3_off - 40
        else:
            hdr = seg[l3_off : l3_off + info.ip.header_len]
            assert ref_ipv4_ok(hdr), f"segment {i}: bad IPv4 header checksum"
            assert info.ip.total_length == len(seg) - l3_off
            assert info.ip.ident == (ident0 + i) & 0xFFFF
        data += chunk
    assert data == payload


def test_tso4_64k_super_frame():
    payload = os.urandom(65535 - 20 - 32)  # largest IPv4 packet
    flags = P.TCP_ACK | P.TCP_PSH | P.TCP_FIN
    frame, info, gso, hdr_len = tso_frame(payload, flags=flags)
    hdr = VirtioNetHdr(NEEDS_CSUM, gso, hdr_len, 1448, info.l4_offset, 16)
    segs = segment(frame, hdr)
    assert len(segs) == -(-len(payload) // 1448) == 46
    assert all(len(s) == 14 + 20 + 32 + 1448 for s in segs[:-1])
    check_tcp_segments(segs, payload, v6=False, seq0=0xFFFF0000, flags0=flags, ident0=0xFFF0, mss=1448)


def test_tso6_with_extension_header_and_vlan():
    payload = os.urandom(60000)
    src, dst = V6_G, V6_H
    l4 = P.build_tcp(40000, 5001, 1, 2, P.TCP_ACK | P.TCP_PSH, payload, src, dst, checksum="partial")
    dstopts = bytes([P.IPPROTO_TCP, 0]) + b"\x01\x04\0\0\0\0"
    frame = (P.build_ethernet(MAC_H, MAC_G, P.ETH_P_IPV6, vlans=7)
             + P.build_ipv6(src, dst, P.IPPROTO_DSTOPTS, len(dstopts) + len(l4)) + dstopts + l4)
    l4_off = 18 + 40 + 8
    segs = segment(frame, VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, l4_off + 20, 1440, l4_off, 16))
    assert all(P.parse_ethernet(s).vlans == (7,) for s in segs)
    assert all(P.parse_ipv6(s, 18).header_len == 48 for s in segs)
    check_tcp_segments(segs, payload, v6=True, seq0=1, flags0=P.TCP_ACK | P.TCP_PSH, ident0=0, mss=1440, l3_off=18)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 20000), st.integers(1, 9000), st.booleans(), st.integers(0, 0xFF), st.integers(0, 2**32 - 1))
def test_tso_invariants(plen, mss, v6, flags, seq):
    payload = bytes(range(256)) * (plen // 256) + bytes(plen % 256)
    frame, info, gso, hdr_len = tso_frame(payload, v6=v6, flags=flags, seq=seq)
    segs = segment(frame, VirtioNetHdr(NEEDS_CSUM, gso | VIRTIO_NET_HDR_GSO_ECN, hdr_len, mss, info.l4_offset, 16))
    if plen == 0:
        assert len(segs) == 1 and P.parse_tcp(segs[0], info.l4_offset).flags == flags
        return
    assert len(segs) == -(-plen // mss)
    check_tcp_segments(segs, payload, v6=v6, seq0=seq, flags0=flags, ident0=0xFFF0, mss=mss)


def test_ecn_cwr_only_on_first_segment():
    flags = P.TCP_ACK | P.TCP_CWR | P.TCP_ECE
    frame, info, gso, hdr_len = tso_frame(os.urandom(5000), flags=flags)
    segs = segment(frame, VirtioNetHdr(NEEDS_CSUM, gso | VIRTIO_NET_HDR_GSO_ECN, hdr_len, 1000, info.l4_offset, 16))
    got = [P.parse_tcp(s, info.l4_offset).flags for s in segs]
    assert got[0] == flags and all(f == P.TCP_ACK | P.TCP_ECE for f in got[1:])
    with pytest.raises(OffloadError):
        segment(frame, VirtioNetHdr(NEEDS_CSUM, gso | VIRTIO_NET_HDR_GSO_ECN, hdr_len, 1000, info.l4_offset, 16),
                ecn_negotiated=False)


def test_payload_within_mss_is_one_frame_with_flags_kept():
    flags = P.TCP_ACK | P.TCP_PSH | P.TCP_FIN | P.TCP_CWR
    frame, info, gso, hdr_len = tso_frame(b"x" * 100, flags=flags)
    (seg,) = segment(frame, VirtioNetHdr(NEEDS_CSUM, gso, hdr_len, 1448, info.l4_offset, 16))
    check_tcp_segments([seg], b"x" * 100, v6=False, seq0=0xFFFF0000, flags0=flags, ident0=0xFFF0, mss=1448)


def test_hdr_len_is_only_a_hint():
    frame, info, gso, hdr_len = tso_frame(os.urandom(3000))
    good = segment(frame, VirtioNetHdr(NEEDS_CSUM, gso, hdr_len, 1448, info.l4_offset, 16))
    assert segment(frame, VirtioNetHdr(NEEDS_CSUM, gso, 0, 1448, info.l4_offset, 16)) == good
    assert segment(frame, VirtioNetHdr(NEEDS_CSUM, gso, 9999, 1448, info.l4_offset, 16)) == good
    # Without NEEDS_CSUM the headers are still found by parsing (checksums are recomputed anyway).
    assert segment(frame, VirtioNetHdr(0, gso, 0, 1448, 0, 0)) == good


@pytest.mark.parametrize("v6", [False, True])
def test_uso_segments(v6):
    src, dst = (V6_G, V6_H) if v6 else (V4_G, V4_H)
    payload = os.urandom(50000)
    frame = P.udp_frame(MAC_G, MAC_H, src, dst, 4000, 9, payload, ident=0xFFFE, checksum="partial")
    info = P.parse_frame(frame)
    segs = segment(frame, VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, info.l4_offset + 8, 1472, info.l4_offset, 6))
    assert len(segs) == -(-50000 // 1472)
    data = b""
    for i, seg in enumerate(segs):
        si = P.parse_frame(seg)
        udp = P.parse_udp(seg, si.l4_offset)
        assert (udp.sport, udp.dport, udp.length) == (4000, 9, len(seg) - si.l4_offset)
        assert udp.checksum != 0 and ref_l4_ok(src, dst, 17, seg[si.l4_offset:])
        if not v6:
            assert ref_ipv4_ok(seg[14:34]) and si.ip.ident == (0xFFFE + i) & 0xFFFF
            assert si.ip.total_length == len(seg) - 14
        else:
            assert si.ip.payload_length == len(seg) - 54
        data += seg[si.l4_offset + 8:]
    assert data == payload


def test_ufo_fragments_reassemble():
    payload = os.urandom(9000)
    frame = P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 4000, 9, payload, ident=4242, checksum="partial")
    segs = segment(frame, VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP, 42, 1480, 34, 6))
    assert len(segs) == -(-(9000 + 8) // 1480)
    pieces = []
    for i, seg in enumerate(segs):
        ip = P.parse_ipv4(seg, 14)
        assert ref_ipv4_ok(seg[14:34])
        assert ip.ident == 4242 and not ip.df  # one datagram, one id; DF cleared as in Linux
        assert bool(ip.frag & P.IP_MF) == (i < len(segs) - 1)
        assert (ip.frag & P.IP_OFFMASK) * 8 == sum(len(p) for p in pieces)
        assert ip.total_length == len(seg) - 14
        pieces.append(seg[34:])
    dgram = b"".join(pieces)
    assert P.parse_udp(dgram).length == len(dgram) == 9008
    assert ref_l4_ok(V4_G, V4_H, 17, dgram) and dgram[8:] == payload


def test_ufo_gso_size_rounds_down_to_8():
    frame = P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 1, 2, bytes(3000), checksum="partial")
    segs = segment(frame, VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP, 42, 1003, 34, 6))
    assert [len(s) - 34 for s in segs] == [1000, 1000, 1000, 8]


def test_ufo_small_datagram_is_not_fragmented():
    frame = P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 1, 2, b"tiny", checksum="partial")
    (seg,) = segment(frame, VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP, 42, 1480, 34, 6))
    assert not P.parse_ipv4(seg, 14).is_fragment and ref_l4_ok(V4_G, V4_H, 17, seg[34:]) and ref_ipv4_ok(seg[14:34])


@pytest.mark.parametrize(
    "make, hdr, why",
    [
        (lambda: tso_frame(b"x" * 3000)[0], VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 0, 34, 16), "gso_size 0"),
        (lambda: tso_frame(b"x" * 3000)[0], VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 66, 1000, 34, 16), "v6 type on v4"),
        (lambda: tso_frame(b"x" * 3000)[0], VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 66, 1000, 34, 6), "udp type on tcp"),
        (lambda: tso_frame(b"x" * 3000)[0], VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1000, 30, 16), "csum_start"),
        (lambda: tso_frame(b"x" * 3000)[0], VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1000, 34, 6), "csum_offset"),
        (lambda: tso_frame(b"x" * 3000)[0], VirtioNetHdr(NEEDS_CSUM, 2, 66, 1000, 34, 16), "unknown type"),
        (lambda: tso_frame(b"x" * 3000)[0][:40], VirtioNetHdr(NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1000, 34, 16), "truncated"),
        (lambda: P.arp_frame(1, MAC_G, V4_G, P.ZERO_MAC, V4_H), VirtioNetHdr(0, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1000), "arp"),
        (lambda: P.udp_frame(MAC_G, MAC_H, V6_G, V6_H, 1, 2, bytes(3000)), VirtioNetHdr(0, VIRTIO_NET_HDR_GSO_UDP, 0, 1000), "ufo v6"),
        (lambda: P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 1, 2, bytes(3000)), VirtioNetHdr(0, VIRTIO_NET_HDR_GSO_UDP, 0, 7), "ufo tiny"),
        (lambda: P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 1, 2, bytes(3000)),
         VirtioNetHdr(0, VIRTIO_NET_HDR_GSO_UDP_L4 | VIRTIO_NET_HDR_GSO_ECN, 0, 1000), "ecn on udp"),
        (lambda: tso_frame(b"x" * 100)[0], VirtioNetHdr(0, VIRTIO_NET_HDR_GSO_NONE | VIRTIO_NET_HDR_GSO_ECN), "ecn alone"),
    ],
)
def test_inconsistent_requests_raise(make, hdr, why):
    with pytest.raises(OffloadError):
        segment(make(), hdr)
    assert issubclass(OffloadError, ValueError), why


def test_fragmented_super_frame_is_refused():
    frame = bytearray(tso_frame(b"x" * 3000)[0])
    struct.pack_into("!H", frame, 20, P.IP_MF)
    with pytest.raises(OffloadError):
        segment(bytes(frame), VirtioNetHdr(0, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1000))


def test_gso_none_passes_through_or_completes():
    full = P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 1, 2, b"abc")
    assert segment(full, VirtioNetHdr()) == [full]
    partial = P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 1, 2, b"abc", checksum="partial")
    assert segment(partial, VirtioNetHdr(NEEDS_CSUM, 0, 0, 0, 34, 6)) == [full]


@settings(max_examples=60)
@given(st.binary(max_size=3000), st.booleans(), st.booleans(), st.sampled_from([None, 3]))
def test_complete_checksum_matches_full_build(payload, v6, tcp, vlan):
    src, dst = (V6_G, V6_H) if v6 else (V4_G, V4_H)
    if tcp:
        mk = lambda c: P.tcp_frame(MAC_G, MAC_H, src, dst, 1, 2, 3, 4, P.TCP_ACK, payload, vlan=vlan, checksum=c)  # noqa: E731
        off = 16
    else:
        mk = lambda c: P.udp_frame(MAC_G, MAC_H, src, dst, 1, 2, payload, vlan=vlan, checksum=c)  # noqa: E731
        off = 6
    partial, full = mk("partial"), mk(True)
    start = P.parse_frame(partial).l4_offset
    done = complete_checksum(partial, start, off)
    assert ref_l4_ok(src, dst, 6 if tcp else 17, done[start:])
    if not tcp:
        assert done == full  # UDP: both encode a zero result as 0xFFFF
    buf = bytearray(partial)
    complete_checksum_into(memoryview(buf), start, off)
    assert bytes(buf) == done


def test_complete_checksum_bounds():
    f = P.udp_frame(MAC_G, MAC_H, V4_G, V4_H, 1, 2, b"abc", checksum="partial")
    for start, off in ((len(f) - 1, 0), (34, len(f)), (-1, 6), (34, -2)):
        with pytest.raises(OffloadError):
            complete_checksum(f, start, off)
    # ``length`` limits the summed range (e.g. a guest buffer larger than its frame).
    buf = bytearray(f) + bytearray(100)
    complete_checksum_into(buf, 34, 6, length=len(f))
    assert bytes(buf[: len(f)]) == complete_checksum(f, 34, 6)
