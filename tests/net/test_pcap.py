"""pcap writer/reader (simvirt/net/pcap.py), cross-checked with tcpdump when present."""
from __future__ import annotations

import io
import os
import struct
import subprocess

import pytest

from simvirt.net import packets as P
from simvirt.net.offload import segment
from simvirt.net.pcap import (
    GLOBAL_HEADER_LEN,
    LINKTYPE_ETHERNET,
    MAGIC_NS,
    MAGIC_US,
    PcapEncoder,
    PcapError,
    PcapRecord,
    PcapWriter,
    iter_pcap,
    read_pcap,
)
from simvirt.net.spec import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VirtioNetHdr,
)
from tests.conftest import require_tool

G = bytes.fromhex("525400123456")
H = bytes.fromhex("52550a000202")
T0 = 1_700_000_000_123_456_789


def software_gso_frames():
    """3 TSO4 + 3 TSO6 + 3 USO segments, all checksummed by simvirt.net.offload."""
    payload = os.urandom(4000)
    v4 = (P.ip_bytes("10.0.2.15"), P.ip_bytes("10.0.2.2"))
    v6 = (P.ip_bytes("fec0::15"), P.ip_bytes("fec0::2"))
    tso4 = P.tcp_frame(G, H, *v4, 40000, 5001, 1000, 1, P.TCP_ACK | P.TCP_PSH, payload, checksum="partial")
    tso6 = P.tcp_frame(G, H, *v6, 40000, 5001, 1000, 1, P.TCP_ACK | P.TCP_PSH, payload, checksum="partial")
    uso = P.udp_frame(G, H, *v4, 4000, 9, payload, checksum="partial")
    return (
        segment(tso4, VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16))
        + segment(tso6, VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 74, 1440, 54, 16))
        + segment(uso, VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 42, 1472, 34, 6))
    )


def sample_frames():
    return software_gso_frames() + [
        P.arp_frame(P.ARP_REQUEST, G, P.ip_bytes("10.0.2.15"), P.ZERO_MAC, P.ip_bytes("10.0.2.2")),
        P.udp_frame(G, H, P.ip_bytes("fec0::15"), P.ip_bytes("fec0::2"), 5, 7, b"hello"),
    ]


def test_global_header_bytes():
    assert PcapEncoder().global_header() == struct.pack("<IHHiIII", MAGIC_US, 2, 4, 0, 0, 262144, LINKTYPE_ETHERNET)
    assert PcapEncoder(nanoseconds=True, snaplen=128).global_header()[:4] == bytes.fromhex("4d3cb2a1")
    assert len(PcapEncoder().global_header()) == GLOBAL_HEADER_LEN


@pytest.mark.parametrize("ns", [False, True])
def test_roundtrip(ns):
    frames = sample_frames()
    out = io.BytesIO()
    with PcapWriter(out, nanoseconds=ns) as w:
        for i, f in enumerate(frames):
            w.write(f, ts_ns=T0 + i * 1_000_001)
    header, records = read_pcap(out.getvalue())
    assert header.nanoseconds is ns and header.linktype == 1 and header.version == (2, 4) and header.byteorder == "<"
    assert [r.data for r in records] == frames
    assert all(r.orig_len == len(r.data) for r in records)
    for i, r in enumerate(records):
        exact = T0 + i * 1_000_001
        assert r.ts_ns == (exact if ns else exact // 1000 * 1000)
    assert w.frames == len(frames) and w.bytes_written == len(out.getvalue())


def test_snaplen_truncates_but_keeps_orig_len():
    out = io.BytesIO()
    with PcapWriter(out, snaplen=64) as w:
        w.write(b"\xab" * 1500, ts_ns=0)
        w.write(b"\xcd" * 10, ts_ns=0)
    _, recs = read_pcap(out.getvalue())
    assert recs == [PcapRecord(0, 1500, b"\xab" * 64), PcapRecord(0, 10, b"\xcd" * 10)]


class CountingFile(io.BytesIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        return super().write(data)


def test_writes_are_batched():
    f = CountingFile()
    w = PcapWriter(f, flush_bytes=64 * 1024, clock=lambda: T0)
    for _ in range(1000):
        w.write(bytes(1514))  # ~1.5 MB of records
    assert 20 <= f.writes <= 30  # one write per 64 KiB, not per frame
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError):
        w.write(b"x")
    _, recs = read_pcap(f.getvalue())
    assert len(recs) == 1000 and recs[0].ts_ns == T0 // 1000 * 1000


def test_write_many_and_open(tmp_path):
    path = tmp_path / "cap.pcap"
    with PcapWriter.open(str(path), clock=lambda: T0) as w:
        w.write_many(sample_frames())
    header, recs = read_pcap(path.read_bytes())
    assert len(recs) == len(sample_frames()) and len({r.ts_ns for r in recs}) == 1


def test_reader_handles_big_endian_files():
    data = struct.pack(">IHHiIII", MAGIC_NS, 2, 4, 0, 0, 65535, 1) + struct.pack(">IIII", 5, 7, 3, 3) + b"abc"
    header, recs = read_pcap(data)
    assert header.byteorder == ">" and header.nanoseconds
    assert recs == [PcapRecord(5_000_000_007, 3, b"abc")]


def test_reader_rejects_corrupt_files():
    good = io.BytesIO()
    with PcapWriter(good) as w:
        w.write(b"x" * 100, ts_ns=0)
    raw = good.getvalue()
    with pytest.raises(PcapError):
        read_pcap(b"\0" * 24)
    with pytest.raises(PcapError):
        read_pcap(raw[:10])
    with pytest.raises(PcapError):
        read_pcap(raw[:-1])
    with pytest.raises(PcapError):
        read_pcap(raw[:30])
    assert list(iter_pcap(raw[:24])) == []


def test_tcpdump_reads_our_file_and_agrees_on_checksums(tmp_path):
    tcpdump = require_tool("tcpdump")
    frames = sample_frames()
    path = tmp_path / "cap.pcap"
    with PcapWriter.open(str(path), nanoseconds=True) as w:
        for i, f in enumerate(frames):
            w.write(f, ts_ns=T0 + i)
    res = subprocess.run([tcpdump, "-nn", "-vv", "-tt", "--time-stamp-precision=nano", "-r", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for i in range(len(frames)):  # nanosecond timestamps survive exactly
        ts = T0 + i
        assert f"{ts // 10**9}.{ts % 10**9:09d} " in out
    # tcpdump verified every software-GSO segment's L4 checksum (and the IPv4 header checksums:
    # it would print "bad cksum" otherwise).
    assert out.count("(correct)") == 6  # TCP over IPv4 and IPv6
    assert out.count("[udp sum ok]") == 3 + 1  # USO segments + the plain IPv6 datagram
    assert "Request who-has 10.0.2.2 tell 10.0.2.15" in out
    assert "bad" not in out and "incorrect" not in out
    assert "link-type EN10MB" in res.stderr
