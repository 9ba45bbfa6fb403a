"""Stateful property test: random block operations through VirtioBlkDriver against a
``--memory`` device process, checked against a bytearray reference model."""
from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from simvirt_testlib import MiB, Device, close_driver, open_driver

DISK = 2 * MiB
CAP = DISK // 512
MAX_SECTORS = 256 * 1024 // 512

_ctx: dict = {}


def _call(coro):
    return _ctx["loop"].run_until_complete(asyncio.wait_for(coro, 20))


sectors = st.integers(0, CAP - 1)
lengths = st.integers(1, MAX_SECTORS)
ranges = st.lists(st.tuples(sectors, st.integers(1, 2 * MAX_SECTORS)), min_size=1, max_size=4)


def _clamp(sector: int, n: int) -> int:
    return min(n, CAP - sector)


class BlkModel(RuleBasedStateMachine):
    @initialize()
    def zero_everything(self):
        self.drv = _ctx["drv"]
        _call(self.drv.write_zeroes([(0, CAP)]))
        self.model = bytearray(DISK)
        self.ops = 0

    @rule(sector=sectors, n=lengths, seed=st.integers(0, 2**32 - 1))
    def write(self, sector, n, seed):
        n = _clamp(sector, n)
        data = random.Random(seed).randbytes(n * 512)
        _call(self.drv.write(sector, data))
        self.model[sector * 512:(sector + n) * 512] = data
        self.ops += 1

    @rule(sector=sectors, n=lengths)
    def read(self, sector, n):
        n = _clamp(sector, n)
        got = _call(self.drv.read(sector, n * 512))
        assert got == bytes(self.model[sector * 512:(sector + n) * 512])

    @rule(rs=ranges)
    def discard(self, rs):
        rs = [(s, _clamp(s, n)) for s, n in rs]
        _call(self.drv.discard(rs))
        for s, n in rs:  # our memory backend reads discarded ranges back as zeros
            self.model[s * 512:(s + n) * 512] = bytes(n * 512)

    @rule(rs=ranges, unmap=st.booleans())
    def write_zeroes(self, rs, unmap):
        rs = [(s, _clamp(s, n)) for s, n in rs]
        _call(self.drv.write_zeroes(rs, unmap=unmap))
        for s, n in rs:
            self.model[s * 512:(s + n) * 512] = bytes(n * 512)

    @rule()
    def flush(self):
        _call(self.drv.flush())

    @rule(slots=st.lists(st.integers(0, CAP // 64 - 1), min_size=2, max_size=8, unique=True),
          n=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
    def concurrent_writes_then_reads(self, slots, n, seed):
        """Several requests in flight at once, on disjoint ranges."""
        rng = random.Random(seed)
        writes = {slot * 64: rng.randbytes(n * 512) for slot in slots}

        async def go():
            await asyncio.gather(*(self.drv.write(sec, d) for sec, d in writes.items()))
            return await asyncio.gather(*(self.drv.read(sec, 64 * 512) for sec in writes))

        got = _call(go())
        for sec, d in writes.items():
            self.model[sec * 512:sec * 512 + len(d)] = d
        for sec, g in zip(writes, got):
            assert g == bytes(self.model[sec * 512:(sec + 64) * 512])

    @invariant()
    def nothing_in_flight(self):
        if hasattr(self, "drv"):
            for bq in self.drv.queues:
                assert bq.q.in_flight == 0 and len(bq.free_slots) == bq.q.size

    def teardown(self):
        if not hasattr(self, "drv"):
            return

        async def whole():
            parts = await asyncio.gather(*(self.drv.read(s, MAX_SECTORS * 512) for s in range(0, CAP, MAX_SECTORS)))
            return b"".join(parts)

        assert _call(whole()) == bytes(self.model)


@pytest.fixture(scope="module")
def model_device():
    # A small size_max so that large requests are split into many segments (indirect chains).
    d = Device(["--memory", "2M", "--size-max", "16K"])
    yield d
    d.stop()


@pytest.mark.timeout(120)
def test_random_operations_match_reference_model(model_device):
    loop = asyncio.new_event_loop()
    try:
        drv, mem = loop.run_until_complete(open_driver(model_device.socket_path, ram=16 * MiB, queue_size=64))
        _ctx.update(loop=loop, drv=drv)
        try:
            run_state_machine_as_test(BlkModel, settings=settings(
                max_examples=30, stateful_step_count=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
        finally:
            _ctx.clear()
            close_driver(drv, mem)
    finally:
        loop.close()
    assert model_device.alive
