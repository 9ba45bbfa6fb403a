"""BlkLimiter: in-order admission under ops and bandwidth buckets; latency; error injection."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from simvirt.impair.blk import BlkLimiter
from simvirt.impair.delayline import DelayLine
from simvirt.impair.settings import BlkSettings, NetSettings


def serve_closed_loop(lim: BlkLimiter, qd: int, nbytes: int, until: float) -> list[float]:
    """A qd-deep load that resubmits each request when it is served; returns serve times < until."""
    inflight = [0.0] * qd
    served = []
    while True:
        i = min(range(qd), key=inflight.__getitem__)
        t = lim.admit(nbytes, inflight[i])
        if t >= until:
            return served
        served.append(t)
        inflight[i] = t + lim.latency


def test_unlimited_admits_at_arrival():
    lim = BlkLimiter()
    assert not lim.limits
    assert [lim.admit(4096, t) for t in (0.0, 0.1, 0.2)] == [0.0, 0.1, 0.2]


def test_1000_iops_after_the_bucket_and_burst():
    lim = BlkLimiter(iops=1000, iops_burst=200)
    served = serve_closed_loop(lim, 16, 4096, 3.0)
    first = sum(t == 0.0 for t in served)
    assert first == 1200  # a full bucket (one second's worth) and the one-time burst, at once
    steady = [t for t in served if 1.0 <= t < 2.0]
    assert 999 <= len(steady) <= 1001


def test_bandwidth_caps_bytes():
    lim = BlkLimiter(bandwidth=1 << 20)  # 1 MiB/s, bucket of 1 MiB
    served = serve_closed_loop(lim, 8, 64 << 10, 4.0)
    in_window = [t for t in served if 2.0 <= t < 4.0]
    assert len(in_window) * (64 << 10) == pytest.approx(2 << 20, rel=0.04)


def test_both_buckets_the_tighter_one_wins():
    lim = BlkLimiter(iops=1000, bandwidth=1000 * 512)   # bytes allow 1000 x 512 B, 125 x 4 KiB
    served = serve_closed_loop(lim, 4, 4096, 3.0)
    assert 124 <= len([t for t in served if 2.0 <= t < 3.0]) <= 126
    lim = BlkLimiter(iops=100, bandwidth=1 << 30)
    served = serve_closed_loop(lim, 4, 4096, 3.0)
    assert 99 <= len([t for t in served if 2.0 <= t < 3.0]) <= 101


def test_requests_are_served_in_order():
    lim = BlkLimiter(iops=10)
    for _ in range(10):
        lim.admit(0, 0.0)
    t1 = lim.admit(512, 0.0)
    t2 = lim.admit(512, 0.0)
    t3 = lim.admit(512, 0.05)  # arrived later but not served before those ahead of it
    assert t1 == pytest.approx(0.1) and t2 == pytest.approx(0.2) and t3 == pytest.approx(0.3)


def test_latency_is_added_not_serialized():
    lim = BlkLimiter(latency=0.002)
    done = [lim.completion(4096, 1.0)[1] for _ in range(16)]
    assert done == pytest.approx([1.002] * 16)


def test_a_request_larger_than_the_bandwidth_bucket_goes_through_into_debt():
    lim = BlkLimiter(bandwidth=1000)
    assert lim.admit(500, 0.0) == 0.0
    t = lim.admit(3000, 0.0)  # waits for a full bucket (0.5 s), then 2000 bytes of debt
    assert t == pytest.approx(0.5)
    assert lim.admit(1000, t) == pytest.approx(0.5 + 2.0 + 1.0)


def test_error_injection_is_seeded():
    a = BlkLimiter(error_rate=0.25, rng=random.Random(9))
    b = BlkLimiter(error_rate=0.25, rng=random.Random(9))
    fa = [a.fail() for _ in range(4000)]
    assert fa == [b.fail() for _ in range(4000)]
    assert 900 <= sum(fa) <= 1100
    assert all(BlkLimiter(error_rate=1.0).fail() for _ in range(100))
    assert not any(BlkLimiter().fail() for _ in range(100))


@pytest.mark.parametrize("kw", [dict(latency=-1), dict(error_rate=2), dict(iops=0), dict(iops_burst=5),
                                dict(bandwidth_burst=5), dict(bandwidth=-1)])
def test_bad_parameters(kw):
    with pytest.raises(ValueError):
        BlkLimiter(**kw)


@settings(max_examples=200, deadline=None)
@given(iops=st.one_of(st.none(), st.integers(1, 100_000)), bw=st.one_of(st.none(), st.integers(512, 1 << 30)),
       reqs=st.lists(st.tuples(st.floats(0, 0.01), st.integers(0, 1 << 20)), max_size=100))
def test_admissions_are_in_order_and_never_before_arrival(iops, bw, reqs):
    lim = BlkLimiter(iops=iops, bandwidth=bw)
    now = 0.0
    last = float("-inf")
    for dt, n in reqs:
        now += dt
        t = lim.admit(n, now)
        assert t >= now and t >= last
        last = t


# -- settings as the control socket carries them ------------------------------------------
def test_settings_parse_and_validate():
    s = BlkSettings.from_request({"cmd": "impair", "iops": 1000, "latency": 0.002, "vm": "a", "device": "d",
                                  "kind": "blk"})
    assert s.active and s.iops == 1000 and s.as_dict()["latency"] == 0.002
    assert not BlkSettings.from_request({"cmd": "impair"}).active
    assert BlkSettings.from_request({}).as_dict() == {}
    for bad, msg in [({"iops": 0}, "iops"), ({"iops": "fast"}, "iops"), ({"latency": -1}, "latency"),
                     ({"error_rate": 1.5}, "error_rate"), ({"iopz": 5}, "unknown"), ({"kind": "net"}, "kind"),
                     ({"iops_burst": 5}, "needs iops"), ({"latency": True}, "latency")]:
        with pytest.raises(ValueError, match=msg):
            BlkSettings.from_request(bad)
    n = NetSettings.from_request({"delay": 0.002, "direction": "both", "loss": 0.5})
    assert n.applies("tx") and n.applies("rx")
    assert not NetSettings.from_request({"direction": "rx"}).active
    for bad in ({"direction": "up"}, {"loss": 2}, {"rate": 0}, {"delay": None}, {"seed": 1.5}):
        with pytest.raises(ValueError):
            NetSettings.from_request(bad)


# -- the delay line, with a fake loop --------------------------------------------------------
class FakeLoop:
    """Simulated time and a Timer (simvirt.impair.delayline.Timer) on it."""

    spin_below = 0.001

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, object]] = []

    def close(self) -> None:
        pass

    def call_later(self, delay, cb):
        entry = [self.now + delay, cb, False]
        self.timers.append(entry)

        class H:
            def cancel(self_inner):
                entry[2] = True
        return H()

    def run_until(self, t: float, early: float = 0.0) -> None:
        """Fire timers in time order up to ``t``; ``early`` fires each up to that much before its
        time (uvloop's millisecond timers), each loop iteration taking 10 us."""
        for _ in range(10_000):
            live = [e for e in self.timers if not e[2] and e[0] - early <= t]
            if not live:
                self.now = t
                return
            e = min(live, key=lambda e: e[0])
            self.timers.remove(e)
            self.now = max(self.now + 1e-5, e[0] - early)
            e[1]()
        raise AssertionError("timers never settle")


def test_delay_line_releases_in_order_never_early():
    loop = FakeLoop()
    out: list[tuple[float, list[str]]] = []
    line = DelayLine(lambda items: out.append((loop.now, items)), lambda: loop.now, loop)
    line.push(0.002, "a")
    line.push(0.002, "b")
    line.push(0.001, "c")  # earlier than the last: raised to it (FIFO)
    line.push(0.005, "d")
    loop.run_until(0.01, early=0.0008)
    assert [items for _, items in out] == [["a", "b", "c"], ["d"]]
    assert out[0][0] >= 0.002 and out[1][0] >= 0.005
    assert len(line) == 0


def test_delay_line_flush_and_take():
    loop = FakeLoop()
    out = []
    line = DelayLine(out.append, lambda: loop.now, loop)
    line.push(1.0, 1)
    line.push(2.0, 2)
    assert [x for _, x in line.take()] == [1, 2]
    line.push(3.0, 3)
    line.flush()
    assert out == [[3]]
    loop.run_until(10.0)
    assert out == [[3]]  # cancelled timers never fire
