"""The simvirt guest virtio-balloon driver against a real balloon device process.

The host side is driven the way an operator would drive it (the device's
msgpack control socket); the guest side is observed through its page
allocator and the shared segment's allocated blocks.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "devices" / "balloon"))
from balloon_testlib import BalloonProc, MiB, PAGE  # noqa: E402

from simvirt.control import arequest  # noqa: E402
from simvirt.devices.balloon import spec as s  # noqa: E402
from simvirt.drivers.balloon import WANTED_FEATURES, VirtioBalloonDriver  # noqa: E402
from simvirt.drivers.transport import VhostUserTransport  # noqa: E402
from simvirt.memory import GuestMemory, OutOfGuestMemory, PageAllocator  # noqa: E402
from simvirt.virtio.spec import bit  # noqa: E402

ZERO = bytes(PAGE)
MTH = bit(s.VIRTIO_BALLOON_F_MUST_TELL_HOST)
DOOM = bit(s.VIRTIO_BALLOON_F_DEFLATE_ON_OOM)


class Env:
    def __init__(self, dev: BalloonProc, drv: VirtioBalloonDriver, mem: GuestMemory, alloc: PageAllocator, ram: int):
        self.dev = dev
        self.drv = drv
        self.mem = mem
        self.alloc = alloc
        self.ram = ram

    async def ctl(self, msg: dict) -> dict:
        reply = await arequest(self.dev.control_path, msg)
        assert reply["ok"], reply
        return reply

    async def info(self) -> dict:
        return await self.ctl({"cmd": "info"})

    def touch(self, gpa: int, nbytes: int, byte: int = 0x5A) -> None:
        view = self.mem.regions[0].view
        chunk = 64 * MiB
        fill = bytes([byte]) * min(chunk, nbytes)
        for off in range(gpa, gpa + nbytes, chunk):
            n = min(chunk, gpa + nbytes - off)
            view[off:off + n] = fill[:n]


async def until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


@asynccontextmanager
async def balloon_env(ram: int = 64 * MiB, features: int = WANTED_FEATURES, start: bool = False):
    dev = BalloonProc(metrics=False)
    mem = GuestMemory.create_shared(ram)
    alloc = PageAllocator(0, ram)
    drv = VirtioBalloonDriver(VhostUserTransport(dev.socket_path, mem, alloc, device_label="balloon-test"),
                              features=features, report_interval=0)
    probed = False
    try:
        drv.probe(asyncio.get_running_loop())
        probed = True
        if start:
            drv.start()
        yield Env(dev, drv, mem, alloc, ram)
    finally:
        try:
            if probed:
                os.kill(dev.pid, signal.SIGCONT)
                await asyncio.wait_for(drv.close(), 10)
        finally:
            mem.close()
            dev.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---------------------------------------------------------------------------
# negotiation
# ---------------------------------------------------------------------------
def test_driver_negotiates_its_features_and_linux_queue_layout():
    async def go():
        async with balloon_env() as e:
            info = await e.info()
            assert info["features"] == ["MUST_TELL_HOST", "STATS_VQ", "DEFLATE_ON_OOM", "PAGE_REPORTING"]
            assert list(e.drv.queues) == ["inflateq", "deflateq", "statsq", "reporting_vq"]
            assert [q.h.index for q in e.drv.queues.values()] == [0, 1, 2, 3]
            assert info["ram_bytes"] == e.ram

    run(go())


# ---------------------------------------------------------------------------
# following the host's target
# ---------------------------------------------------------------------------
def test_host_target_inflates_exactly_and_deflate_returns_pages():
    async def go():
        async with balloon_env(ram=64 * MiB, start=True) as e:
            drv, alloc = e.drv, e.alloc
            free0 = alloc.free_pages
            # QEMU semantics: `balloon 40M` leaves the guest 40 MiB -> 24 MiB in the balloon.
            reply = await e.ctl({"cmd": "balloon", "size": 40 * MiB})
            want = 24 * MiB // PAGE
            assert reply["target_pages"] == want
            await until(lambda: drv.actual == want, 10, "the driver to reach the target")
            await asyncio.sleep(0.05)
            assert drv.actual == want  # exactly: no overshoot
            assert free0 - alloc.free_pages == want
            assert sum(n for _, n in drv.extents) == want
            info = await e.info()
            assert info["actual_pages"] == want  # the driver wrote actual into config space
            assert info["inflated_pages"] == want
            assert info["guest_memory_bytes"] == 40 * MiB
            # Part-way back.
            await e.ctl({"cmd": "balloon", "size": 56 * MiB})
            want = 8 * MiB // PAGE
            await until(lambda: drv.actual == want and free0 - alloc.free_pages == want, 10, "a partial deflate")
            await asyncio.sleep(0.05)
            assert drv.actual == want and free0 - alloc.free_pages == want
            assert (await e.info())["inflated_pages"] == want
            # All the way back.
            await e.ctl({"cmd": "balloon", "size": e.ram})
            await until(lambda: drv.actual == 0 and alloc.free_pages == free0, 10, "a full deflate")
            await asyncio.sleep(0.05)
            info = await e.info()
            assert info["actual_pages"] == 0
            assert info["inflated_pages"] == 0
            assert info["moved_pages"]["inflated"] == info["moved_pages"]["deflated"] == 24 * MiB // PAGE

    run(go())


def test_target_beyond_free_memory_inflates_what_the_guest_can_give():
    async def go():
        async with balloon_env(ram=32 * MiB, start=True) as e:
            e.alloc.alloc_pages(e.alloc.free_pages - 1000)  # the guest keeps most memory busy
            await e.ctl({"cmd": "balloon", "size": 4 * MiB})  # wants 7168 pages
            await until(lambda: e.drv.actual == 1000, 10, "the driver to give every free page")
            await asyncio.sleep(0.2)
            assert e.drv.actual == 1000 and e.alloc.free_pages == 0
            info = await e.info()
            assert info["target_pages"] == 7168 and info["actual_pages"] == 1000 and info["inflated_pages"] == 1000

    run(go())


def test_inflated_pages_leave_the_segment():
    async def go():
        async with balloon_env(ram=64 * MiB) as e:
            # The guest has used all its free memory once: the host holds every page.
            gpa = e.alloc.alloc_pages(e.alloc.free_pages)
            e.touch(gpa, e.ram - gpa)
            e.alloc.free_range(gpa, (e.ram - gpa) // PAGE)
            for b in e.drv.queues["inflateq"].bufs:  # the PFN buffers too, so only ballooned pages change
                e.mem.write(b, bytes(PAGE))
            before = e.mem.resident_bytes()
            n = await e.drv.inflate(4096)
            assert n == 4096
            assert before - e.mem.resident_bytes() == 4096 * PAGE
            # Every ballooned page reads zero from the guest's own mapping.
            for start, cnt in e.drv.extents:
                assert e.mem.read(start, PAGE) == ZERO and e.mem.read(start + (cnt - 1) * PAGE, PAGE) == ZERO

    run(go())


# ---------------------------------------------------------------------------
# MUST_TELL_HOST ordering
# ---------------------------------------------------------------------------
def _deflate_with_device_stopped(features: int) -> tuple[int, int, int]:
    """(pages back in the allocator while the device is stopped, after it resumes, pages deflated)."""

    async def go():
        async with balloon_env(features=features) as e:
            assert await e.drv.inflate(512) == 512
            free0 = e.alloc.free_pages
            os.kill(e.dev.pid, signal.SIGSTOP)
            try:
                task = asyncio.ensure_future(e.drv.deflate(300))
                await asyncio.sleep(0.3)
                assert not task.done(), "deflate finished although the device could not have acked it"
                during = e.alloc.free_pages - free0
            finally:
                os.kill(e.dev.pid, signal.SIGCONT)
            moved = await asyncio.wait_for(task, 10)
            after = e.alloc.free_pages - free0
            return during, after, moved

    return run(go())


def test_must_tell_host_returns_pages_only_after_the_ack():
    during, after, moved = _deflate_with_device_stopped(WANTED_FEATURES)
    assert moved == 300
    assert during == 0, f"{during} pages were back in the guest allocator before the host acknowledged the deflate"
    assert after == 300


def test_without_must_tell_host_pages_return_at_once():
    during, after, moved = _deflate_with_device_stopped(WANTED_FEATURES & ~MTH)
    assert moved == 300
    assert during == 300
    assert after == 300


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------
def test_statistics_come_from_the_allocator():
    async def go():
        async with balloon_env(ram=64 * MiB) as e:
            reply = await e.ctl({"cmd": "balloon-stats"})
            st = reply["stats"]
            assert st["total_memory"] == 64 * MiB
            assert st["free_memory"] == e.alloc.free_pages * PAGE
            assert st["available_memory"] == st["free_memory"]
            assert reply["stats_age_s"] is not None and reply["stats_age_s"] < 1.0
            # The guest allocates 1000 pages and the balloon takes 2000 more: the host sees both.
            e.alloc.alloc_pages(1000)
            assert await e.drv.inflate(2000) == 2000
            reply = await e.ctl({"cmd": "balloon-stats"})
            assert st["free_memory"] - reply["stats"]["free_memory"] == 3000 * PAGE
            assert reply["stats"]["free_memory"] == e.alloc.free_pages * PAGE
            assert e.drv.stats_sent >= 3

    run(go())


# ---------------------------------------------------------------------------
# DEFLATE_ON_OOM
# ---------------------------------------------------------------------------
def test_deflate_on_oom_lets_allocations_succeed():
    async def go():
        async with balloon_env(ram=32 * MiB) as e:
            total = await e.drv.inflate(e.alloc.free_pages)
            assert e.alloc.free_pages == 0 and e.drv.actual == total
            gpa = e.alloc.alloc_pages(4)
            assert e.drv.oom_deflations == 1
            shrunk = total - e.drv.actual
            assert shrunk >= 4
            assert e.alloc.free_pages == shrunk - 4
            # A page that came out of the balloon reads as zero.
            assert e.mem.read(gpa, 4 * PAGE) == bytes(4 * PAGE)
            info = await e.info()
            assert info["moved_pages"]["deflated"] == shrunk  # the host was told (MUST_TELL_HOST)
            assert info["inflated_pages"] == e.drv.actual
            assert info["actual_pages"] == e.drv.actual

    run(go())


def test_no_deflate_on_oom_without_the_feature():
    async def go():
        async with balloon_env(ram=32 * MiB, features=WANTED_FEATURES & ~DOOM) as e:
            assert "DEFLATE_ON_OOM" not in (await e.info())["features"]
            total = await e.drv.inflate(e.alloc.free_pages)
            assert e.alloc.free_pages == 0
            with pytest.raises(OutOfGuestMemory):
                e.alloc.alloc_pages(1)
            assert e.drv.oom_deflations == 0
            assert e.drv.actual == total

    run(go())


def test_deflate_on_oom_for_a_large_allocation_stays_inside_its_pfn_buffer():
    """An OOM deflation must not write more PFNs than its one-page buffer holds (1024)."""

    async def go():
        async with balloon_env(ram=64 * MiB) as e:
            await e.drv.inflate(e.alloc.free_pages)
            bq = e.drv.queues["deflateq"]
            buf = bq.free_bufs[-1]  # the buffer _on_oom will use
            neighbour = e.mem.read(buf + PAGE, PAGE)
            stats_desc = e.mem.read(e.drv.queues["statsq"].q.desc_gpa, 16 * 256)
            try:
                e.alloc.alloc_pages(2000)  # succeeding or not, the driver must not scribble over guest RAM
            except OutOfGuestMemory:
                pass
            assert e.drv.oom_deflations >= 1
            assert e.mem.read(buf + PAGE, PAGE) == neighbour, "OOM deflate wrote PFNs past its buffer page"
            assert e.mem.read(e.drv.queues["statsq"].q.desc_gpa, 16 * 256) == stats_desc

    run(go())


def test_deflate_on_oom_with_every_deflate_buffer_busy_keeps_host_and_guest_in_agreement():
    """OOM while all 32 deflate buffers wait for the host: whatever the driver does, the host must end
    up knowing exactly which pages left the balloon (its count equals the driver's ``actual``)."""

    async def go():
        async with balloon_env(ram=64 * MiB) as e:
            total = await e.drv.inflate(e.alloc.free_pages)
            bq = e.drv.queues["deflateq"]
            os.kill(e.dev.pid, signal.SIGSTOP)
            try:
                task = asyncio.ensure_future(e.drv.deflate(len(bq.bufs) * 256))
                await asyncio.sleep(0.1)
                assert not bq.free_bufs  # every deflate buffer is with the (stopped) host
                assert e.alloc.free_pages == 0  # MUST_TELL_HOST: nothing back before the ack
                try:
                    e.alloc.alloc_pages(1)
                except OutOfGuestMemory:
                    pass
            finally:
                os.kill(e.dev.pid, signal.SIGCONT)
            await asyncio.wait_for(task, 10)
            await asyncio.sleep(0.2)
            info = await e.info()
            assert info["actual_pages"] == e.drv.actual
            assert info["inflated_pages"] == e.drv.actual, (
                f"host holds {info['inflated_pages']} pages in the balloon, the guest thinks {e.drv.actual}: "
                f"{info['inflated_pages'] - e.drv.actual} pages left the balloon without the host being told")
            assert info["moved_pages"]["deflated"] == total - e.drv.actual

    run(go())


# ---------------------------------------------------------------------------
# free page reporting
# ---------------------------------------------------------------------------
def test_free_page_reporting():
    async def go():
        async with balloon_env(ram=64 * MiB) as e:
            drv, alloc, mem = e.drv, e.alloc, e.mem
            # Touch every free page, then free them again.
            n_free = alloc.free_pages
            gpa = alloc.alloc_pages(n_free)
            e.touch(gpa, n_free * PAGE)
            alloc.free_range(gpa, n_free)
            before = mem.resident_bytes()
            reported = await drv.report_free_pages()
            after = mem.resident_bytes()
            # Every 2 MiB block that is wholly free is reported: all but the one holding the rings.
            assert reported == (e.ram // (2 * MiB) - 1) * 512
            assert before - after == reported * PAGE
            assert alloc.free_pages == n_free  # reported pages went back to the allocator
            info = await e.info()
            assert info["moved_pages"]["reported"] == reported
            # Nothing new to report right after.
            assert await drv.report_free_pages() == 0
            # Allocating (part of) a block makes it reportable again once it is free.
            block = 10 * 2 * MiB
            alloc.alloc_range(block + 7 * PAGE, 3)
            e.touch(block + 7 * PAGE, 3 * PAGE)
            assert await drv.report_free_pages() == 0  # not free yet
            alloc.free_range(block + 7 * PAGE, 3)
            before = mem.resident_bytes()
            assert await drv.report_free_pages() == 512
            assert before - mem.resident_bytes() == 3 * PAGE
            assert mem.read(block + 7 * PAGE, PAGE) == ZERO
            assert await drv.report_free_pages() == 0

    run(go())


# ---------------------------------------------------------------------------
# resident memory at scale
# ---------------------------------------------------------------------------
def test_one_gib_guest_inflate_half_releases_it_and_deflated_pages_are_zero():
    async def go():
        ram = 1 << 30
        async with balloon_env(ram=ram, start=True) as e:
            gpa = e.alloc.alloc_pages(e.alloc.free_pages)
            e.touch(gpa, ram - gpa)
            e.alloc.free_range(gpa, (ram - gpa) // PAGE)
            before = e.mem.resident_bytes()
            assert before >= ram * 0.99
            await e.ctl({"cmd": "balloon", "size": ram - 512 * MiB})
            await until(lambda: e.drv.actual == 512 * MiB // PAGE, 20, "512 MiB in the balloon")
            released = before - e.mem.resident_bytes()
            assert released >= 0.95 * 512 * MiB, f"only {released / MiB:.1f} MiB went back to the host"
            ballooned = list(e.drv.extents)
            await e.ctl({"cmd": "balloon", "size": ram})
            await until(lambda: e.drv.actual == 0, 20, "the deflate")
            # The pages came back empty: they read as zeros when the guest touches them.
            for start, cnt in ballooned[:: max(1, len(ballooned) // 64)]:
                for k in (0, cnt // 2, cnt - 1):
                    assert e.mem.read(start + k * PAGE, PAGE) == ZERO
            again = e.alloc.alloc_pages(256)
            e.mem.write(again, b"\x01" * PAGE)
            assert e.mem.read(again, PAGE) == b"\x01" * PAGE

    run(go())
