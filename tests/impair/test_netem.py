"""NetEm: delay, jitter, loss and rate with a fixed seed, in simulated time."""
from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given, settings, strategies as st

from simvirt.impair.netem import NetEm


def test_no_conditions_release_at_arrival():
    m = NetEm()
    assert [m.admit(100, t) for t in (0.0, 0.5, 1.0)] == [0.0, 0.5, 1.0]


def test_fixed_delay():
    m = NetEm(delay=0.002)
    assert m.admit(60, 1.0) == pytest.approx(1.002)
    assert m.admit(60, 1.5) == pytest.approx(1.502)


def test_loss_10_percent_over_10000_frames():
    m = NetEm(loss=0.1, rng=random.Random(42))
    lost = sum(m.admit(64, i * 1e-4) is None for i in range(10_000))
    assert 800 <= lost <= 1200
    assert m.lost == lost and m.dropped == lost


def test_loss_1_drops_everything_and_0_nothing():
    assert all(NetEm(loss=1.0).admit(64, 0.0) is None for _ in range(100))
    m = NetEm(loss=0.0)
    assert all(m.admit(64, i) is not None for i in range(100))


def test_jitter_is_uniform_around_the_delay():
    m = NetEm(delay=0.010, jitter=0.002, rng=random.Random(7))
    # Arrivals far apart: the FIFO floor never binds, each sample is delay + U(-j, +j).
    d = [m.admit(64, float(i)) - i for i in range(10_000)]
    assert min(d) >= 0.008 - 1e-12 and max(d) <= 0.012 + 1e-12
    assert statistics.mean(d) == pytest.approx(0.010, abs=1e-4)
    # Uniform on [-j, j]: standard deviation j / sqrt(3).
    assert statistics.pstdev(d) == pytest.approx(0.002 / 3 ** 0.5, rel=0.05)


def test_jitter_larger_than_delay_never_releases_before_arrival():
    m = NetEm(delay=0.001, jitter=0.005, rng=random.Random(3))
    for i in range(1000):
        now = float(i)
        assert m.admit(64, now) >= now


def test_same_seed_same_decisions():
    a = NetEm(delay=0.01, jitter=0.005, loss=0.3, rng=random.Random(5))
    b = NetEm(delay=0.01, jitter=0.005, loss=0.3, rng=random.Random(5))
    assert [a.admit(64, i * 0.001) for i in range(500)] == [b.admit(64, i * 0.001) for i in range(500)]


def test_rate_serialization_is_exact():
    m = NetEm(rate=12_000_000)  # 1500 bytes = 1 ms on the wire
    out = [m.admit(1500, 0.0) for _ in range(10)]
    assert out == pytest.approx([0.001 * (k + 1) for k in range(10)])
    # After the link went idle, a frame pays only its own serialization.
    assert m.admit(1500, 1.0) == pytest.approx(1.001)


def test_rate_with_delay_follows_netem():
    m = NetEm(delay=0.005, rate=8_000_000)  # 1000 bytes = 1 ms
    assert m.admit(1000, 0.0) == pytest.approx(0.006)
    assert m.admit(1000, 0.0) == pytest.approx(0.007)  # behind the first one
    assert m.admit(500, 0.0) == pytest.approx(0.0075)


def test_queue_limit_drops():
    m = NetEm(delay=1.0, limit=10)
    out = [m.admit(64, 0.0) for _ in range(15)]
    assert sum(x is None for x in out) == 5 and m.overlimit == 5
    assert m.admit(64, 1.5) is not None  # the first ten left at 1.0


@pytest.mark.parametrize("kw", [dict(delay=-1), dict(jitter=-0.1), dict(loss=1.5), dict(loss=-0.1), dict(rate=0),
                                dict(limit=0)])
def test_bad_parameters(kw):
    with pytest.raises(ValueError):
        NetEm(**kw)


@settings(max_examples=200, deadline=None)
@given(delay=st.floats(0, 0.05), jitter=st.floats(0, 0.05), loss=st.floats(0, 1),
       rate=st.one_of(st.none(), st.floats(1e3, 1e10)), seed=st.integers(0, 2**32),
       frames=st.lists(st.tuples(st.floats(0, 0.01), st.integers(14, 65535)), max_size=100))
def test_fifo_is_never_violated(delay, jitter, loss, rate, seed, frames):
    m = NetEm(delay, jitter, loss, rate, random.Random(seed), limit=10**6)
    now = 0.0
    last = float("-inf")
    for dt, length in frames:
        now += dt
        t = m.admit(length, now)
        if t is None:
            continue
        assert t >= now
        assert t >= last
        if rate is not None:
            assert t - max(last, now) >= length * 8 / rate * (1 - 1e-9)
        last = t
