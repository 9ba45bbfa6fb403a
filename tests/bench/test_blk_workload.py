"""BlkWorkload.stop(): an interrupted run issues nothing new and lets what is in flight complete."""
from __future__ import annotations

import asyncio

import pytest

from simvirt.bench.blk import BlkBenchOptions, BlkWorkload

from simvirt_testlib import MiB, Device, close_driver, open_driver


@pytest.fixture(scope="module")
def dev():
    d = Device(["--memory", "4M"])
    yield d
    d.stop()


async def _workload(dev: Device):
    drv, mem = await open_driver(dev.socket_path, ram=16 * MiB)
    o = BlkBenchOptions(rw="randrw", bs=4096, iodepth=8, runtime=60.0, verify="data")
    return drv, mem, BlkWorkload(o, drv, mem, drv.transport.alloc, (4 * MiB) // 4096)


def test_stop_mid_run_ends_it_with_nothing_in_flight(dev):
    async def go():
        drv, mem, w = await _workload(dev)
        try:
            task = asyncio.ensure_future(w.run(60.0))
            while w.ios_dir[0] + w.ios_dir[1] < 200:
                await asyncio.sleep(0.01)
            w.stop()
            await asyncio.wait_for(task, 10)        # not the 60 s runtime
            assert w.inflight == 0 and w.errors == 0 and w.mismatches == 0
        finally:
            close_driver(drv, mem)
    asyncio.run(go())


def test_stop_before_run_starts_issues_nothing(dev):
    """A halt that lands between a job's setup and its run (the scenario's control handler runs
    in between) must not be undone by run() setting a fresh deadline."""
    async def go():
        drv, mem, w = await _workload(dev)
        try:
            w.stop()
            await asyncio.wait_for(w.run(60.0), 10)
            assert w.ios_dir == [0, 0] and w.inflight == 0
        finally:
            close_driver(drv, mem)
    asyncio.run(go())
