"""blk impairments: the device's held-request path in simulated time, then a real device process.

Sans-IO part: a BlkDevice with hand-written rings and fake timers checks
when each request completes (latency, shared token buckets, in order per
queue, other queues not stalled beyond the limiter), that a stopping ring
completes what it holds, that injected errors leave storage untouched, that
due requests go to the device's ``serve_heads`` as one batch (injected
errors in the same used-ring update) and that the held count read by
``info`` and the metrics is what the delay lines hold.

Process part: ``simvirt device blk --control PATH`` driven by the simvirt
guest driver: a 1000 IOPS limit holds within 5% under a qd16 random-read
load, 2 ms of latency shows in every request, error_rate 1.0 fails every
request until cleared, clearing releases held requests at once, and bad
commands are refused without side effects.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time

import pytest
from prometheus_client import generate_latest

from simvirt import metrics
from simvirt.control import arequest, request
from simvirt.devices.blk import spec as s
from simvirt.devices.blk.device import BlkDevice
from simvirt.devices.blk.storage import MemoryStorage
from simvirt.drivers.blk import BlkError
from simvirt.impair.settings import BlkSettings
from simvirt.memory import PageAllocator

from simvirt_testlib import MiB, R, W, Device, RawRing, bytearray_memory, close_driver, device_works, open_driver
from simvirt_testlib import parse_metrics

OK, IOERR = s.VIRTIO_BLK_S_OK, s.VIRTIO_BLK_S_IOERR


# ---------------------------------------------------------------------------
# sans-IO: the device with fake timers
# ---------------------------------------------------------------------------
class FakeTimers:
    """Simulated time; each DelayLine gets a timer (simvirt.impair.delayline.Timer) on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[list] = []  # [when, callback, cancelled]

    def timer(self) -> "FakeTimers._T":
        return FakeTimers._T(self)

    class _T:
        spin_below = 0.0

        def __init__(self, owner: "FakeTimers") -> None:
            self.owner = owner

        def call_later(self, delay, cb):
            entry = [self.owner.now + delay, cb, False]
            self.owner.pending.append(entry)

            class H:
                def cancel(self_inner) -> None:
                    entry[2] = True
            return H()

        def close(self) -> None:
            pass

    def advance(self, t: float) -> None:
        while True:
            live = [e for e in self.pending if not e[2] and e[0] <= t]
            if not live:
                self.now = t
                return
            e = min(live, key=lambda e: e[0])
            self.pending.remove(e)
            self.now = max(self.now, e[0])
            e[1]()


class Rig:
    """Two request queues over one RAM, a device with fake timers, signals recorded."""

    def __init__(self, **impair) -> None:
        self.storage = MemoryStorage(1 << 20)
        self.dev = BlkDevice(self.storage, num_queues=2, label=f"blk-imp-{random.randrange(1 << 30)}")
        self.mem = bytearray_memory(4 * MiB)
        self.alloc = PageAllocator(0, 4 * MiB)
        self.rings = [RawRing(self.mem, self.alloc, 16) for _ in range(2)]
        self.queues = [r.device_queue() for r in self.rings]
        self.stats = [metrics.QueueStats("standalone", self.dev.label, str(i)) for i in range(2)]
        self.signals: list[tuple[float, int]] = []
        self.dev.signal = self._signal
        self.t = FakeTimers()
        self.next_desc = [0, 0]
        self.status_of: dict[tuple[int, int], int] = {}
        self.done: dict[tuple[int, int], float] = {}
        if impair:
            self.impair(**impair)

    def _signal(self, index: int) -> None:
        """The device interrupts the driver: note when, and what it completed by then."""
        self.signals.append((self.t.now, index))
        self.collect()

    def impair(self, **fields) -> None:
        self.dev.set_impairment(BlkSettings.from_request(fields), clock=lambda: self.t.now, timers=self.t.timer)

    def submit(self, q: int, rtype: int = s.VIRTIO_BLK_T_IN, sector: int = 0, data: bytes = b"",
               kick: bool = True) -> int:
        """Post one request on queue ``q`` and (unless not ``kick``) kick; returns its head."""
        hdr = self.alloc.alloc(4096)
        self.mem.write(hdr, s.OUTHDR.pack(rtype, 0, sector))
        st = hdr + 512
        self.mem.write(st, b"\xee")
        buf = self.alloc.alloc(4096)
        if rtype == s.VIRTIO_BLK_T_OUT:
            self.mem.write(buf, data)
            segs = [(hdr, 16, R), (buf, len(data), R), (st, 1, W)]
        else:
            segs = [(hdr, 16, R), (buf, 4096, W), (st, 1, W)]
        head = self.rings[q].chain(segs, first=self.next_desc[q])
        self.next_desc[q] += 3
        self.status_of[(q, head)] = st
        self.rings[q].push(head)
        if kick:
            self.kick(q)
        return head

    def kick(self, q: int) -> None:
        self.dev.process_queue(q, self.queues[q], self.stats[q])
        self.collect()

    def record_batches(self) -> list[tuple[list[int], list[int]]]:
        """From now on, note each serve_heads call: (heads served, heads answered without I/O)."""
        calls: list[tuple[list[int], list[int]]] = []
        serve = self.dev.serve_heads

        def spy(queue, stats, heads, answered=()):
            calls.append((list(heads), [h for h, _ in answered]))
            serve(queue, stats, heads, answered)
        self.dev.serve_heads = spy  # type: ignore[method-assign]
        return calls

    def held_everywhere(self) -> tuple[int, int, int, int]:
        """The held count as the lines, ImpairStats, the control socket's info and /metrics see it."""
        lines = self.dev.impairer.held() if self.dev.impairer is not None else 0
        scraped = parse_metrics(generate_latest(metrics.REGISTRY).decode(), "simvirt_impaired_held",
                                device=self.dev.label)
        return lines, self.dev.impair_stats.held, self.dev.impair_info()["held"], int(scraped)

    def collect(self) -> None:
        for q in range(2):
            for head, _ in self.rings[q].pop_used():
                self.done.setdefault((q, head), self.t.now)

    def advance(self, t: float) -> None:
        self.t.advance(t)
        self.collect()

    def status(self, q: int, head: int) -> int:
        return self.mem.read(self.status_of[(q, head)], 1)[0]


def test_latency_holds_each_request_then_serves_it():
    rig = Rig(latency=0.002)
    h = rig.submit(0)
    assert rig.done == {}
    rig.advance(0.0019)
    assert rig.done == {}
    rig.advance(0.0025)
    assert rig.done == {(0, h): pytest.approx(0.002)}
    assert rig.status(0, h) == OK
    assert rig.signals == [(pytest.approx(0.002), 0)]
    assert rig.dev.impair_stats.delayed == 1 and rig.dev.impair_stats.held == 0


def test_shared_bucket_serves_in_order_and_other_queues_only_wait_for_their_turn():
    rig = Rig(iops=2)  # a bucket of 2 ops, then one every 0.5 s
    heads = [rig.submit(0) for _ in range(4)]
    assert [(0, h) in rig.done for h in heads] == [True, True, False, False]  # the full bucket: at once
    rig.t.now = 0.1
    other = rig.submit(1)
    rig.advance(3.0)
    assert [rig.done[(0, h)] for h in heads[2:]] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert rig.done[(1, other)] == pytest.approx(1.5)  # behind queue 0's earlier arrivals, no later
    assert rig.dev.impair_stats.throttled == 3


def test_latency_on_one_queue_does_not_hold_back_another():
    rig = Rig(latency=0.010)
    a = rig.submit(0)
    rig.t.now = 0.005
    b = rig.submit(1)
    rig.advance(0.0151)
    assert rig.done == {(0, a): pytest.approx(0.010), (1, b): pytest.approx(0.015)}


def test_stopping_a_ring_completes_what_it_holds():
    rig = Rig(latency=1.0)
    h = rig.submit(0)
    rig.dev.queue_stopped(0)
    rig.collect()
    assert (0, h) in rig.done and rig.status(0, h) == OK
    assert rig.dev.impairer is not None and rig.dev.impairer.held() == 0


def test_clearing_serves_held_requests_and_restores_the_fast_path():
    rig = Rig(iops=1)
    heads = [rig.submit(0) for _ in range(3)]
    assert len(rig.done) == 1
    rig.dev.set_impairment(None)
    rig.collect()
    assert len(rig.done) == 3 and all(rig.status(0, h) == OK for h in heads)
    assert rig.dev.impairer is None
    h = rig.submit(0)
    assert (0, h) in rig.done  # served synchronously again


def test_replacing_readmits_held_requests_under_the_new_limits():
    rig = Rig(iops=1)
    heads = [rig.submit(0) for _ in range(3)]
    calls = rig.record_batches()
    rig.impair(iops=1000)
    rig.collect()
    assert all((0, h) in rig.done for h in heads)  # the new bucket is full: all at once
    assert calls == [(heads[1:], [])] and rig.signals == [(0.0, 0)]  # the two held ones: one batch, one interrupt


def test_due_requests_are_served_as_one_batch():
    rig = Rig(latency=0.002)
    calls = rig.record_batches()
    heads = [rig.submit(0) for _ in range(4)]  # each kicked on its own, all due at 2 ms
    assert calls == [] and rig.dev.impair_stats.delayed == 4
    rig.advance(0.003)
    assert calls == [(heads, [])]
    assert rig.signals == [(pytest.approx(0.002), 0)]
    assert all(rig.status(0, h) == OK for h in heads)
    st = rig.stats[0]
    assert (st.chains, st.descriptors) == (4, 12)
    assert rig.dev.impair_info()["requests"]["read"] == 4


def test_injected_errors_go_back_in_the_same_batch_ahead_of_the_served_requests():
    rig = Rig(error_rate=0.5, seed=4)  # this seed's draws: ok, fail, fail, ok, fail
    heads = [rig.submit(0, kick=False) for _ in range(5)]
    calls = rig.record_batches()
    rig.dev.process_queue(0, rig.queues[0], rig.stats[0])  # nothing delays them: served from the kick
    failed, served = [heads[1], heads[2], heads[4]], [heads[0], heads[3]]
    assert calls == [(served, failed)]
    # One used-ring update; the device may use buffers in any order (no VIRTIO_F_IN_ORDER).
    assert [h for h, _ in rig.rings[0].pop_used()] == failed + served
    assert [rig.status(0, h) for h in heads] == [OK, IOERR, IOERR, OK, IOERR]
    assert rig.dev.impair_stats.failed == 3
    st = rig.stats[0]
    assert (st.chains, st.descriptors) == (5, 6)  # failed ones are not walked
    assert rig.dev.impair_info()["requests"]["read"] == 2


def test_the_held_count_is_what_the_lines_hold():
    rig = Rig(iops=1)  # one op at once, then one a second
    assert rig.held_everywhere() == (0, 0, 0, 0)
    for _ in range(4):
        rig.submit(0)
    rig.submit(1)
    assert rig.held_everywhere() == (4, 4, 4, 4)
    rig.advance(1.0)
    assert rig.held_everywhere() == (3, 3, 3, 3)
    rig.impair(iops=1, latency=0.5)  # re-admitted under a fresh bucket (one at once), all 0.5 s later
    assert rig.held_everywhere() == (3, 3, 3, 3)
    rig.dev.queue_stopped(1)
    assert rig.held_everywhere() == (2, 2, 2, 2)
    rig.dev.reset()
    assert rig.held_everywhere() == (0, 0, 0, 0)
    rig.rings[0] = RawRing(rig.mem, rig.alloc, 16)  # the driver sets the ring up again
    rig.queues[0], rig.next_desc[0] = rig.rings[0].device_queue(), 0
    rig.submit(0)
    rig.submit(0)
    assert rig.held_everywhere() == (2, 2, 2, 2)
    rig.dev.set_impairment(None)
    assert rig.held_everywhere() == (0, 0, 0, 0) and rig.dev.impair_stats.holder is None


def test_injected_errors_never_touch_storage():
    rig = Rig(error_rate=1.0)
    h = rig.submit(0, s.VIRTIO_BLK_T_OUT, 0, b"\x42" * 4096)
    assert rig.status(0, h) == IOERR
    buf = bytearray(4096)
    rig.storage.read(0, [memoryview(buf)])
    assert bytes(buf) == bytes(4096)  # the RAM disk's zeroes, not the refused write
    assert rig.dev.impair_stats.failed == 1


# ---------------------------------------------------------------------------
# a real device process
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def device():
    ctl_dir = tempfile.mkdtemp(prefix="simvirt-ctl-")
    d = Device(["--memory", "64M", "--control", os.path.join(ctl_dir, "blk.ctl")], metrics=True)
    d.control = os.path.join(ctl_dir, "blk.ctl")
    deadline = time.monotonic() + 10
    while not os.path.exists(d.control):
        assert time.monotonic() < deadline and d.alive, d.log()
        time.sleep(0.02)
    yield d
    log = d.log()
    d.stop()
    shutil.rmtree(ctl_dir, ignore_errors=True)
    assert "Traceback" not in log, log


@pytest.fixture
def dev(device):
    yield device
    assert request(device.control, {"cmd": "impair"}) == {"ok": True, "impair": {}}
    assert device.alive, device.log()


def impair(d, **fields) -> dict:
    r = request(d.control, {"cmd": "impair", **fields})
    assert r["ok"], r
    return r


def drive(d, fn):
    """Run ``await fn(driver)`` with a fresh simvirt guest driver on the device."""
    async def go():
        drv, mem = await open_driver(d.socket_path, ram=32 * MiB)
        try:
            return await fn(drv)
        finally:
            close_driver(drv, mem)
    return asyncio.run(go())


async def randread(drv, qd: int, seconds: float, blocks: int = 8192) -> list[tuple[float, float, bool]]:
    """qd readers of random 4 KiB blocks: (completion time since start, latency, ok) per request."""
    t0 = time.monotonic()
    out: list[tuple[float, float, bool]] = []
    rng = random.Random(4)

    async def reader() -> None:
        while time.monotonic() - t0 < seconds:
            start = time.monotonic()
            try:
                await drv.read(rng.randrange(blocks) * 8, 4096)
                ok = True
            except BlkError as e:
                assert e.status == IOERR
                ok = False
            end = time.monotonic()
            out.append((end - t0, end - start, ok))

    await asyncio.gather(*(reader() for _ in range(qd)))
    return out


def test_1000_iops_limit_holds_under_a_qd16_load(dev):
    impair(dev, iops=1000)
    done = drive(dev, lambda drv: randread(drv, 16, 2.6))
    # The first second's bucket (1000 ops) goes at once; after that the refill rate rules.
    steady = sum(1 for t, _, ok in done if 0.5 <= t < 2.5 and ok)
    assert 1900 <= steady <= 2100, steady
    info = request(dev.control, {"cmd": "info"})
    assert info["throttled"] > 1000 and info["impair"]["iops"] == 1000


def test_2ms_latency_shows_in_every_request(dev):
    async def seq(drv, n=60):
        lat = []
        for i in range(n):
            t = time.monotonic()
            await drv.read(i * 8, 4096)
            lat.append(time.monotonic() - t)
        return lat

    base = drive(dev, seq)
    impair(dev, latency=0.002)
    lat = drive(dev, seq)
    assert min(lat) >= 0.002  # every request is held 2 ms
    # Floors, not medians: a busy machine moves medians by milliseconds; the fastest of 60 stay put.
    assert 0.0019 <= min(lat) - min(base) < 0.005, (min(base), min(lat), statistics.median(base), statistics.median(lat))


def test_error_rate_1_fails_every_request_until_cleared(dev):
    data = random.Random(1).randbytes(8192)

    async def write(drv):
        await drv.write(1000, data)
    drive(dev, write)
    failed_before = parse_metrics(dev.scrape(), "simvirt_impaired_total", what="failed")
    impair(dev, error_rate=1.0)

    async def all_fail(drv):
        for i in range(20):
            with pytest.raises(BlkError) as e:
                await drv.read(i * 8, 4096)
            assert e.value.status == IOERR
        with pytest.raises(BlkError):
            await drv.write(1000, bytes(8192))  # would overwrite ``data``
    drive(dev, all_fail)
    assert parse_metrics(dev.scrape(), "simvirt_impaired_total", what="failed") - failed_before >= 21
    assert request(dev.control, {"cmd": "impair"})["impair"] == {}

    async def back(drv):
        return await drv.read(1000, 8192)
    assert drive(dev, back) == data  # the failed write never reached storage


def test_clearing_releases_held_requests_at_once(dev):
    impair(dev, iops=1)  # one op now, then one per second

    async def fn(drv):
        tasks = [asyncio.ensure_future(drv.read(i * 8, 4096)) for i in range(6)]
        await asyncio.sleep(0.3)
        assert sum(t.done() for t in tasks) == 1
        info = await arequest(dev.control, {"cmd": "info"})
        assert info["held"] == 5
        t = time.monotonic()
        assert (await arequest(dev.control, {"cmd": "impair"}))["ok"]
        await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
        return time.monotonic() - t
    assert drive(dev, fn) < 0.5
    assert parse_metrics(dev.scrape(), "simvirt_impaired_held") == 0


def test_bad_commands_are_refused_and_change_nothing(dev):
    impair(dev, latency=0.001)
    for req, msg in [
        ({"cmd": "impair", "iops": 0}, "iops"),
        ({"cmd": "impair", "latency": "slow"}, "latency"),
        ({"cmd": "impair", "error_rate": 1.5}, "error_rate"),
        ({"cmd": "impair", "iops_burst": 10}, "needs iops"),
        ({"cmd": "impair", "delay": 0.1}, "unknown"),
        ({"cmd": "impair", "kind": "net"}, "kind"),
        ({"cmd": "stream", "frame_size": 100}, "unknown command"),
        ({"cmd": 7}, "string 'cmd'"),
    ]:
        r = request(dev.control, req)
        assert r["ok"] is False and msg in r["error"], (req, r)
    assert request(dev.control, {"cmd": "info"})["impair"]["latency"] == 0.001
    device_works(dev.socket_path)
