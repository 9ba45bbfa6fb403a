"""TokenBucket: Firecracker's semantics in simulated time (no clock is read)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from simvirt.impair.bucket import TokenBucket


def drain_at_rate(b: TokenBucket, start: float, end: float, step: float, n: int = 1) -> int:
    """Take ``n`` tokens whenever possible, polling every ``step`` seconds in [start, end)."""
    got = 0
    k = 0
    while True:
        t = start + k * step
        if t >= end:
            return got
        while b.reduce(n, t):
            got += 1
        k += 1


def test_starts_full_and_refuses_when_empty():
    b = TokenBucket(1000, refill_time=1000)
    assert sum(b.reduce(1, 0.0) for _ in range(1500)) == 1000
    assert not b.reduce(1, 0.0)
    assert b.time_until(1, 0.0) == pytest.approx(0.001)


def test_1000_per_second_after_the_burst():
    b = TokenBucket(1000, one_time_burst=500, refill_time=1000)
    assert sum(b.reduce(1, 0.0) for _ in range(5000)) == 1500   # full bucket + one-time burst
    got = drain_at_rate(b, 0.0, 1.0, 0.0001)
    assert 999 <= got <= 1001


def test_one_time_burst_is_consumed_once():
    b = TokenBucket(100, one_time_burst=50, refill_time=1000)
    assert sum(b.reduce(1, 0.0) for _ in range(1000)) == 150
    # A full second later only the bucket has refilled: the burst never comes back.
    assert sum(b.reduce(1, 1.0) for _ in range(1000)) == 100
    assert sum(b.reduce(1, 10.0) for _ in range(1000)) == 100
    assert b.one_time_burst == 0 and b.initial_burst == 50


def test_burst_is_spent_first_and_a_failed_reduce_spends_nothing():
    b = TokenBucket(10, one_time_burst=5, refill_time=1000)
    assert b.reduce(3, 0.0)
    assert b.one_time_burst == 2 and b.budget == 10
    assert b.reduce(4, 0.0)  # 2 from the burst, 2 from the budget
    assert b.one_time_burst == 0 and b.budget == 8
    assert not b.reduce(9, 0.0)
    assert b.budget == 8


def test_refill_is_linear_and_capped_at_size():
    b = TokenBucket(1000, refill_time=500)  # 2000 tokens/s
    assert b.reduce(1000, 0.0)
    assert b.available(0.25) == pytest.approx(500)
    assert b.available(100.0) == pytest.approx(1000)


def test_time_until_is_exact():
    b = TokenBucket(4096, refill_time=1000)
    assert b.reduce(4096, 0.0)
    w = b.time_until(1024, 0.0)
    assert w == pytest.approx(0.25)
    assert not b.reduce(1024, w * 0.99)
    assert b.reduce(1024, w)


def test_oversized_request_waits_for_a_full_bucket_then_leaves_a_debt():
    b = TokenBucket(1000, refill_time=1000)
    assert b.reduce(1, 0.0)
    assert not b.reduce(3000, 0.0)               # not full: waits
    assert b.time_until(3000, 0.0) == pytest.approx(0.001)
    assert b.reduce(3000, 0.001)                 # full: goes through, 2000 in debt
    assert b.budget == pytest.approx(-2000)
    # The debt is paid at the refill rate before one more token is there.
    assert b.time_until(1, 0.001) == pytest.approx(2.001)
    assert not b.reduce(1, 2.0)
    assert b.reduce(1, 2.0025)


def test_time_going_backwards_is_ignored():
    b = TokenBucket(10, refill_time=1000)
    assert b.reduce(10, 5.0)
    assert not b.reduce(1, 4.0)
    assert b.available(4.0) == 0


@pytest.mark.parametrize("kw", [dict(size=0), dict(size=10, refill_time=0), dict(size=10, one_time_burst=-1)])
def test_bad_parameters(kw):
    with pytest.raises(ValueError):
        TokenBucket(**kw)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 10_000), burst=st.integers(0, 5_000), refill_ms=st.integers(1, 5_000),
       reqs=st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 20_000)), min_size=1, max_size=60))
def test_never_more_than_burst_plus_size_plus_refill(size, burst, refill_ms, reqs):
    """Tokens granted over [0, T] never exceed burst + size + rate * T + one oversized request's excess."""
    b = TokenBucket(size, burst, refill_ms)
    t = 0.0
    granted = 0.0
    biggest = 0
    for dt, n in reqs:
        t += dt
        wait = b.time_until(n, t)
        assert wait >= 0
        if b.reduce(n, t + wait):
            granted += n
            biggest = max(biggest, n)
            t += wait
    bound = burst + size + b.rate * t + max(0, biggest - size)
    assert granted <= bound * (1 + 1e-9) + 1e-6
