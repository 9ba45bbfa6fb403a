"""VirtioBlkDriver (in process, asyncio) against ``simvirt device blk`` child processes."""
from __future__ import annotations

import asyncio
import os
import random

import pytest

from simvirt.devices.blk import spec as s
from simvirt.drivers.blk import BlkError
from simvirt.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC

from simvirt_testlib import MiB, Device, close_driver, open_driver

SERIAL = "simvirt-serial-0001"
CAP = 16 * MiB // 512


@pytest.fixture(scope="module")
def dev():
    d = Device(["--memory", "16M", "--num-queues", "4", "--serial", SERIAL], metrics=True)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def ro_dev():
    d = Device(["--memory", "4M", "--readonly", "--serial", "ro-disk"])
    yield d
    d.stop()


@pytest.fixture(scope="module")
def small_dev():
    d = Device(["--memory", "4M", "--size-max", "4K", "--seg-max", "8"])
    yield d
    d.stop()


def run(coro, timeout: float = 30):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def test_probe_and_config(dev):
    async def go():
        drv, mem = await open_driver(dev.socket_path)
        try:
            c = drv.config
            assert c.capacity == CAP and drv.capacity_bytes == 16 * MiB
            assert (c.size_max, c.seg_max, c.blk_size, c.writeback, c.num_queues) == (1 << 20, 254, 512, 1, 4)
            assert c.max_discard_seg == 32 and c.max_write_zeroes_seg == 32
            t = drv.transport
            assert t.has(VIRTIO_F_EVENT_IDX) and t.has(VIRTIO_F_INDIRECT_DESC)
            assert t.has(s.VIRTIO_BLK_F_DISCARD) and t.has(s.VIRTIO_BLK_F_WRITE_ZEROES) and t.has(s.VIRTIO_BLK_F_FLUSH)
            assert not drv.readonly
            assert len(drv.queues) == 1  # asked for one
            assert await drv.get_id() == SERIAL
        finally:
            close_driver(drv, mem)
    run(go())


@pytest.mark.parametrize("sector,nbytes", [(0, 512), (1, 4096), (7, 65536), (1000, 1 << 20), (3001, 3 * (1 << 20) + 512),
                                           (CAP - 1, 512), (CAP - 8192, 4 * MiB)])
def test_write_read_round_trip(dev, sector, nbytes):
    async def go():
        drv, mem = await open_driver(dev.socket_path, ram=32 * MiB)
        try:
            data = random.randbytes(nbytes)
            await drv.write(sector, data)
            assert await drv.read(sector, nbytes) == data
            # A read straddling the start of what we wrote sees both sides.
            if sector >= 1:
                both = await drv.read(sector - 1, 1024)
                assert both[512:] == data[:512]
            await drv.flush()
        finally:
            close_driver(drv, mem)
    run(go())


def test_discard_and_write_zeroes(dev):
    async def go():
        drv, mem = await open_driver(dev.socket_path)
        try:
            base = 20000
            data = random.randbytes(64 * 512)
            await drv.write(base, data)
            await drv.discard([(base + 2, 3), (base + 10, 1)])
            await drv.write_zeroes([(base + 20, 4)], unmap=False)
            await drv.write_zeroes([(base + 30, 2)], unmap=True)
            expect = bytearray(data)
            for sec, n in ((2, 3), (10, 1), (20, 4), (30, 2)):
                expect[sec * 512:(sec + n) * 512] = bytes(n * 512)
            assert await drv.read(base, 64 * 512) == bytes(expect)
            with pytest.raises(BlkError) as ei:
                await drv.discard([(CAP - 1, 2)])  # beyond the disk: the device refuses
            assert ei.value.status == s.VIRTIO_BLK_S_IOERR
            with pytest.raises(ValueError):
                await drv.discard([])
        finally:
            close_driver(drv, mem)
    run(go())


def test_driver_side_range_checks(dev):
    async def go():
        drv, mem = await open_driver(dev.socket_path)
        try:
            for sector, n in ((CAP, 512), (CAP - 1, 1024), (-1, 512), (0, 0), (0, 100)):
                with pytest.raises(ValueError):
                    await drv.read(sector, n)
            with pytest.raises(ValueError):
                await drv.write(0, b"x" * 100)
            assert drv.queues[0].q.in_flight == 0  # nothing was sent
        finally:
            close_driver(drv, mem)
    run(go())


def test_500_requests_in_flight(dev):
    async def go():
        drv, mem = await open_driver(dev.socket_path, ram=32 * MiB)
        try:
            blocks = {i: random.randbytes(4096) for i in range(500)}
            await asyncio.gather(*(drv.write(8 * i, d) for i, d in blocks.items()))
            got = await asyncio.gather(*(drv.read(8 * i, 4096) for i in blocks))
            assert got == list(blocks.values())
            bq = drv.queues[0]
            assert bq.q.in_flight == 0 and bq.q.num_free == bq.q.size and len(bq.free_slots) == bq.q.size
            # Submissions are batched per event-loop turn: far fewer kicks than requests.
            assert bq.h.kicks < 100, (bq.h.kicks, bq.h.kicks_suppressed)  # 1000 requests
        finally:
            close_driver(drv, mem)
    run(go())


def test_multiqueue(dev):
    async def go():
        drv, mem = await open_driver(dev.socket_path, ram=32 * MiB, num_queues=4)
        try:
            assert len(drv.queues) == 4
            blocks = {i: random.randbytes(2048) for i in range(400)}
            base = 10000
            await asyncio.gather(*(drv.write(base + 4 * i, d) for i, d in blocks.items()))
            got = await asyncio.gather(*(drv.read(base + 4 * i, 2048) for i in blocks))
            assert got == list(blocks.values())
            served = [bq.q.avail_idx for bq in drv.queues]
            assert all(n >= 150 for n in served), served  # round robin over all four
        finally:
            close_driver(drv, mem)
        drv, mem = await open_driver(dev.socket_path, num_queues=16)
        try:
            assert len(drv.queues) == 4  # capped at what the device offers
        finally:
            close_driver(drv, mem)
    run(go())


def test_reconnect_data_persists(dev):
    data = random.randbytes(256 * 1024)

    async def writer():
        drv, mem = await open_driver(dev.socket_path)
        try:
            await drv.write(5000, data)
        finally:
            close_driver(drv, mem)

    async def reader_then_abrupt_hangup():
        drv, mem = await open_driver(dev.socket_path)
        try:
            assert await drv.read(5000, len(data)) == data
            await drv.write(5000, data[::-1])
        finally:
            # Hang up without stopping the rings (a crashed guest).
            drv.transport.fe.close()
            for h in drv.transport.queues.values():
                asyncio.get_running_loop().remove_reader(h.call_fd)
            mem.close()

    async def reader_again():
        drv, mem = await open_driver(dev.socket_path)
        try:
            assert await drv.read(5000, len(data)) == data[::-1]
        finally:
            close_driver(drv, mem)

    run(writer())
    run(reader_then_abrupt_hangup())
    run(reader_again())
    assert dev.alive


def test_writeback_toggle(dev):
    async def go():
        drv, mem = await open_driver(dev.socket_path)
        try:
            await drv.set_writeback(False)
            assert drv.transport.read_config(s.CONFIG_WRITEBACK_OFFSET, 1) == b"\0"
            await drv.write(7, b"w" * 512)
            assert await drv.read(7, 512) == b"w" * 512
            await drv.set_writeback(True)
            assert drv.transport.read_config(s.CONFIG_WRITEBACK_OFFSET, 1) == b"\1"
        finally:
            close_driver(drv, mem)
    run(go())


def test_readonly_device(ro_dev):
    async def go():
        drv, mem = await open_driver(ro_dev.socket_path)
        try:
            assert drv.readonly and drv.config.capacity == 4 * MiB // 512
            assert await drv.get_id() == "ro-disk"
            assert await drv.read(0, 4096) == bytes(4096)
            await drv.flush()
            for op in (drv.write(0, b"\1" * 512), drv.discard([(0, 1)]), drv.write_zeroes([(0, 1)])):
                with pytest.raises(BlkError) as ei:
                    await op
                assert ei.value.status == s.VIRTIO_BLK_S_IOERR
            assert await drv.read(0, 512) == bytes(512)
        finally:
            close_driver(drv, mem)
    run(go())


def test_large_read_respects_seg_max(small_dev):
    """size_max 4K, seg_max 8: a 64 KiB read needs 16 segments, so the driver must
    split it (or otherwise stay within seg_max) -- the device refuses more."""
    async def go():
        drv, mem = await open_driver(small_dev.socket_path)
        try:
            data = random.randbytes(64 * 1024)
            for k in range(0, len(data), 32 * 1024):  # 8 segments each: fine
                await drv.write(k // 512, data[k:k + 32 * 1024])
            assert await drv.read(0, 32 * 1024) == data[:32 * 1024]
            assert await drv.read(0, len(data)) == data
        finally:
            close_driver(drv, mem)
    run(go())


def test_request_larger_than_ring_does_not_hang(small_dev):
    """A 256 KiB read with size_max 4K is 64 data segments: more than a 16-entry ring
    and more than the driver's indirect tables hold. It must complete or fail, not wait forever."""
    async def go():
        drv, mem = await open_driver(small_dev.socket_path, queue_size=16)
        try:
            try:
                got = await asyncio.wait_for(drv.read(0, 256 * 1024), 3)
            except asyncio.TimeoutError:
                pytest.fail("read() never completed: the driver waits for ring space that can never appear")
            assert len(got) == 256 * 1024
        finally:
            close_driver(drv, mem)
    run(go())


def test_fixed_requests_reuse_one_chain(dev):
    async def go():
        drv, mem = await open_driver(dev.socket_path)
        try:
            blocks = [random.randbytes(4096) for _ in range(6)]
            for i, b in enumerate(blocks):
                await drv.write(30000 + 8 * i, b)
            bq = drv.queues[0]
            buf = drv.transport.alloc.alloc(4096)
            slots_before = len(bq.free_slots)
            fr = drv.fixed_request(bq, s.VIRTIO_BLK_T_IN, [(buf, 4096)])
            loop = asyncio.get_running_loop()
            for i, b in enumerate(blocks):
                fut = loop.create_future()
                fr.submit(30000 + 8 * i, lambda st, n: fut.set_result((st, n)))
                assert await fut == (s.VIRTIO_BLK_S_OK, 4097)
                assert mem.read(buf, 4096) == b
                assert bq.q.in_flight == 0
            assert len(bq.free_slots) == slots_before - 1  # the fixed request keeps its slot
            # Ordinary requests still flow alongside.
            assert await drv.read(30000, 4096) == blocks[0]
        finally:
            close_driver(drv, mem)
    run(go())


def test_a_publish_deferred_past_close_kicks_no_reused_fd(dev):
    """A request queued, then the driver closed before the loop ran the deferred publish (a second
    Ctrl-C does this): the publish must not write to the old kick fd's number, which the next
    open file may already hold."""
    async def go():
        drv, mem = await open_driver(dev.socket_path)
        errors: list[dict] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        try:
            bq = drv.queues[0]
            buf = drv.transport.alloc.alloc(4096)
            kick_fd = drv.transport.queues[bq.h.index].kick_fd
            drv.submit(bq, s.VIRTIO_BLK_T_IN, 0, [(buf, 4096)], lambda st, n: None)
            assert bq.publish_pending
            drv.close()
            r, w = os.pipe()             # lowest free numbers: the kick fd's number comes back
            try:
                await asyncio.sleep(0.05)
                os.set_blocking(r, False)
                reused = kick_fd in (r, w)
                stray = os.read(r, 64) if reused and r != kick_fd else b""
            except BlockingIOError:
                stray = b""
            finally:
                os.close(r)
                os.close(w)
            assert errors == []
            assert stray == b""
        finally:
            mem.close()
    run(go())
