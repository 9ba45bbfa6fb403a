"""L2 learning switch core (simvirt/net/switch.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from simvirt.net.switch import L2Switch

A = bytes.fromhex("525400000001")
B = bytes.fromhex("525400000002")
C = bytes.fromhex("525400000003")
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")


def frame(dst, src):
    return dst + src + b"\x08\x00" + bytes(46)


def test_unknown_unicast_floods_then_learns():
    sw = L2Switch([1, 2, 3])
    assert sw.forward(1, frame(B, A)) == [2, 3]  # B unknown: flood, never back to port 1
    assert sw.lookup(A) == 1
    assert sw.forward(2, frame(A, B)) == [1]  # A learned on 1
    assert sw.forward(1, frame(B, A)) == [2]  # B learned on 2 meanwhile
    assert sw.counters["flooded"] == 1 and sw.counters["forwarded"] == 2 and sw.counters["learned"] == 2


def test_broadcast_and_multicast_flood_to_all_others():
    sw = L2Switch([1, 2, 3, 4])
    assert sw.forward(3, frame(BCAST, A)) == [1, 2, 4]
    assert sw.forward(3, frame(MCAST, A)) == [1, 2, 4]


def test_same_port_destination_is_filtered():
    sw = L2Switch([1, 2])
    sw.learn(1, A)
    sw.learn(1, B)
    assert sw.forward(1, frame(B, A)) == [] and sw.counters["filtered"] == 1


def test_station_move_updates_fdb():
    sw = L2Switch([1, 2, 3])
    assert sw.learn(1, A) is True
    assert sw.learn(1, A) is False
    assert sw.learn(2, A) is True and sw.counters["moved"] == 1
    assert sw.forward(3, frame(A, C)) == [2]


def test_multicast_source_is_not_learned():
    sw = L2Switch([1, 2])
    assert sw.forward(1, frame(B, MCAST)) == [2]
    assert sw.lookup(MCAST) is None and sw.counters["bad_src_mac"] == 1


def test_aging():
    sw = L2Switch([1, 2, 3], max_age=10.0)
    sw.forward(1, frame(BCAST, A), now=100.0)
    assert sw.forward(2, frame(A, B), now=105.0) == [1]
    assert sw.lookup(A, now=111.0) is None  # stale: treated as unknown before age() runs
    assert sw.forward(2, frame(A, B), now=111.0) == [1, 3]
    assert sw.age(now=116.0) == 1  # A (seen at 100) goes; B (refreshed at 111) stays
    assert sw.lookup(A) is None and sw.lookup(B) == 2
    assert L2Switch([1], max_age=None).age(1e9) == 0


def test_ports_add_remove():
    sw = L2Switch([1, 2])
    sw.learn(2, B)
    sw.add_port(3)
    assert sw.forward(1, frame(BCAST, A)) == [2, 3]
    sw.remove_port(2)
    assert sw.lookup(B) is None
    assert sw.forward(1, frame(B, A)) == [3]
    with pytest.raises(KeyError):
        sw.forward(2, frame(A, B))
    with pytest.raises(KeyError):
        sw.learn(9, A)


def test_runt_frames_go_nowhere():
    sw = L2Switch([1, 2])
    assert sw.forward(1, b"\xff" * 13) == [] and sw.counters["runt"] == 1


@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 5), st.integers(0, 5)), max_size=60))
def test_never_back_to_ingress_and_unicast_goes_to_at_most_one(events):
    macs = [bytes([0x52, 0x54, 0, 0, 0, i]) for i in range(5)] + [BCAST]
    sw = L2Switch([1, 2, 3, 4])
    for port, d, s in events:
        if s == 5:
            continue
        out = sw.forward(port, frame(macs[d], macs[s]))
        assert port not in out
        assert out == sorted(set(out))
        known = sw.lookup(macs[d])
        if d != 5 and known is not None:
            assert out == ([] if known == port else [known])
