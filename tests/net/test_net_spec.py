"""virtio-net spec constants and wire structures (simvirt/net/spec.py)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from simvirt.net import spec as s
from simvirt.virtio.spec import VIRTIO_F_VERSION_1


def test_feature_bits_match_the_spec():
    # virtio 1.2 cs01, 5.1.3
    expected = {
        "CSUM": 0, "GUEST_CSUM": 1, "CTRL_GUEST_OFFLOADS": 2, "MTU": 3, "MAC": 5,
        "GUEST_TSO4": 7, "GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10,
        "HOST_TSO4": 11, "HOST_TSO6": 12, "HOST_ECN": 13, "HOST_UFO": 14,
        "MRG_RXBUF": 15, "STATUS": 16, "CTRL_VQ": 17, "CTRL_RX": 18, "CTRL_VLAN": 19,
        "GUEST_ANNOUNCE": 21, "MQ": 22, "CTRL_MAC_ADDR": 23, "HOST_USO": 56,
        "HASH_REPORT": 57, "GUEST_HDRLEN": 59, "RSS": 60, "RSC_EXT": 61,
        "STANDBY": 62, "SPEED_DUPLEX": 63,
    }
    for name, bit in expected.items():
        assert getattr(s, "VIRTIO_NET_F_" + name) == bit, name
        assert s.FEATURE_NAMES[bit] == "VIRTIO_NET_F_" + name


def test_header_flags_and_gso_types():
    assert (s.VIRTIO_NET_HDR_F_NEEDS_CSUM, s.VIRTIO_NET_HDR_F_DATA_VALID, s.VIRTIO_NET_HDR_F_RSC_INFO) == (1, 2, 4)
    assert (s.VIRTIO_NET_HDR_GSO_NONE, s.VIRTIO_NET_HDR_GSO_TCPV4, s.VIRTIO_NET_HDR_GSO_UDP,
            s.VIRTIO_NET_HDR_GSO_TCPV6, s.VIRTIO_NET_HDR_GSO_UDP_L4, s.VIRTIO_NET_HDR_GSO_ECN) == (0, 1, 3, 4, 5, 0x80)


def test_virtio_net_hdr_layout_is_little_endian_12_bytes():
    h = s.VirtioNetHdr(flags=1, gso_type=0x81, hdr_len=0x0102, gso_size=0x0304,
                       csum_start=0x0506, csum_offset=0x0708, num_buffers=0x090A)
    raw = h.pack()
    assert raw == bytes.fromhex("01 81 0201 0403 0605 0807 0a09")
    assert len(raw) == s.VIRTIO_NET_HDR_SIZE == 12
    assert s.VirtioNetHdr.unpack(raw) == h
    assert h.gso_protocol == s.VIRTIO_NET_HDR_GSO_TCPV4 and h.needs_csum
    buf = bytearray(16)
    h.pack_into(buf, 4)
    assert bytes(buf[4:]) == raw


@given(st.tuples(st.integers(0, 255), st.integers(0, 255), *[st.integers(0, 0xFFFF)] * 5))
def test_virtio_net_hdr_roundtrip(fields):
    h = s.VirtioNetHdr(*fields)
    assert s.VirtioNetHdr.unpack(h.pack() + b"trailing") == h


def test_legacy_10_byte_header_reads_num_buffers_zero():
    raw = s.VirtioNetHdr(1, 1, 54, 1448, 34, 16, 7).pack()[:10]
    assert s.VirtioNetHdr.unpack(raw) == s.VirtioNetHdr(1, 1, 54, 1448, 34, 16, 0)
    with pytest.raises(ValueError):
        s.VirtioNetHdr.unpack(raw[:9])


def test_net_hdr_size_per_features():
    assert s.net_hdr_size(1 << VIRTIO_F_VERSION_1) == 12
    assert s.net_hdr_size(1 << s.VIRTIO_NET_F_MRG_RXBUF) == 12
    assert s.net_hdr_size(0) == 10
    assert s.net_hdr_size(1 << VIRTIO_F_VERSION_1 | 1 << s.VIRTIO_NET_F_HASH_REPORT) == 20


def test_config_layout_offsets():
    cfg = s.NetConfig(mac=bytes.fromhex("525400123456"), status=s.VIRTIO_NET_S_LINK_UP | s.VIRTIO_NET_S_ANNOUNCE,
                      max_virtqueue_pairs=4, mtu=9000, speed=10000, duplex=s.VIRTIO_NET_DUPLEX_FULL)
    raw = cfg.pack()
    assert len(raw) == s.VIRTIO_NET_CONFIG_SIZE == 24
    assert raw[s.CONFIG_OFFSET_MAC:6] == bytes.fromhex("525400123456")
    assert struct.unpack_from("<H", raw, s.CONFIG_OFFSET_STATUS)[0] == 3
    assert struct.unpack_from("<H", raw, s.CONFIG_OFFSET_MAX_VIRTQUEUE_PAIRS)[0] == 4
    assert struct.unpack_from("<H", raw, s.CONFIG_OFFSET_MTU)[0] == 9000
    assert struct.unpack_from("<I", raw, s.CONFIG_OFFSET_SPEED)[0] == 10000
    assert raw[s.CONFIG_OFFSET_DUPLEX] == 1
    assert s.NetConfig.unpack(raw) == cfg
    # A short GET_CONFIG read (e.g. only mac+status) decodes with zeros after it.
    short = s.NetConfig.unpack(raw[:8])
    assert short.mac == cfg.mac and short.status == 3 and short.mtu == 0


def test_queue_numbering():
    assert [s.rx_queue_index(k) for k in range(3)] == [0, 2, 4]
    assert [s.tx_queue_index(k) for k in range(3)] == [1, 3, 5]
    assert s.ctrl_queue_index(1) == 2 and s.ctrl_queue_index(4) == 8
    assert s.queue_count(4, True) == 9 and s.queue_count(1, False) == 2
    assert s.queue_role(0, 2, True) == ("rx", 0)
    assert s.queue_role(3, 2, True) == ("tx", 1)
    assert s.queue_role(4, 2, True) == ("ctrl", 0)
    with pytest.raises(ValueError):
        s.queue_role(4, 2, False)
    with pytest.raises(ValueError):
        s.queue_role(5, 2, True)


def test_control_queue_constants():
    assert (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_MAC, s.VIRTIO_NET_CTRL_VLAN, s.VIRTIO_NET_CTRL_ANNOUNCE,
            s.VIRTIO_NET_CTRL_MQ, s.VIRTIO_NET_CTRL_GUEST_OFFLOADS) == (0, 1, 2, 3, 4, 5)
    assert [s.VIRTIO_NET_CTRL_RX_PROMISC, s.VIRTIO_NET_CTRL_RX_ALLMULTI, s.VIRTIO_NET_CTRL_RX_ALLUNI,
            s.VIRTIO_NET_CTRL_RX_NOMULTI, s.VIRTIO_NET_CTRL_RX_NOUNI, s.VIRTIO_NET_CTRL_RX_NOBCAST] == list(range(6))
    assert (s.VIRTIO_NET_CTRL_MAC_TABLE_SET, s.VIRTIO_NET_CTRL_MAC_ADDR_SET) == (0, 1)
    assert s.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET == 0 and s.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET == 0
    assert (s.VIRTIO_NET_OK, s.VIRTIO_NET_ERR) == (0, 1)


def test_ctrl_command_roundtrip():
    cmd = s.CtrlCommand(s.VIRTIO_NET_CTRL_MQ, s.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, s.pack_vq_pairs(4))
    raw = cmd.pack()
    assert raw == b"\x04\x00\x04\x00"
    assert s.CtrlCommand.unpack(raw) == cmd
    assert s.unpack_vq_pairs(cmd.data) == 4
    with pytest.raises(ValueError):
        s.CtrlCommand.unpack(b"\x04")
    assert s.unpack_guest_offloads(s.pack_guest_offloads(1 << s.VIRTIO_NET_F_GUEST_CSUM)) == 2


def test_mac_table_roundtrip_and_guest_controlled_counts():
    uni = [bytes.fromhex("525400000001"), bytes.fromhex("525400000002")]
    multi = [bytes.fromhex("01005e000001")]
    raw = s.pack_mac_table(uni, multi)
    assert raw[:4] == b"\x02\0\0\0" and len(raw) == 4 + 12 + 4 + 6
    assert s.unpack_mac_table(raw) == (uni, multi)
    assert s.unpack_mac_table(s.pack_mac_table([], [])) == ([], [])
    with pytest.raises(ValueError):  # count larger than the data: must not allocate or overread
        s.unpack_mac_table(b"\xff\xff\xff\xff" + raw[4:])
    with pytest.raises(ValueError):
        s.unpack_mac_table(raw + b"\0")
    with pytest.raises(ValueError):
        s.unpack_mac_table(raw[:-1])


def test_feature_requirements():
    f = lambda *bits: sum(1 << b for b in bits)  # noqa: E731
    assert s.unmet_requirements(f(s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_HOST_TSO4, s.VIRTIO_NET_F_HOST_ECN)) == []
    unmet = dict(s.unmet_requirements(f(s.VIRTIO_NET_F_HOST_TSO4, s.VIRTIO_NET_F_MQ)))
    assert set(unmet) == {s.VIRTIO_NET_F_HOST_TSO4, s.VIRTIO_NET_F_MQ}
    assert s.unmet_requirements(f(s.VIRTIO_NET_F_GUEST_CSUM, s.VIRTIO_NET_F_GUEST_TSO6, s.VIRTIO_NET_F_GUEST_ECN)) == []
    assert dict(s.unmet_requirements(f(s.VIRTIO_NET_F_GUEST_ECN)))[s.VIRTIO_NET_F_GUEST_ECN] == {
        s.VIRTIO_NET_F_GUEST_TSO4, s.VIRTIO_NET_F_GUEST_TSO6}
