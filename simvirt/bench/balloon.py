"""``simvirt bench balloon``: how fast memory really goes back to the host and returns.

A guest with ``--ram`` of shared RAM, every page touched (so the host holds
all of it), a balloon device process, and the simvirt balloon driver. The
host asks (over the device's control socket, as ``simvirt ctl`` would) for
the guest to shrink by ``--inflate``; we time until the driver reports the
target reached *and* the segment's resident size has dropped, then deflate
and time until the pages are back in the guest allocator.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import time

from simvirt.bench.procs import DeviceProcess
from simvirt.control import arequest
from simvirt.drivers.balloon import VirtioBalloonDriver
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator

_TOUCH_CHUNK = 64 << 20


async def run_balloon_bench(ram: int, inflate: int, timeout: float = 60.0) -> dict:
    if inflate <= 0 or inflate >= ram:
        raise ValueError("--inflate must be positive and smaller than --ram")
    tmp = tempfile.mkdtemp(prefix="simvirt-balloon-")
    ctl = os.path.join(tmp, "balloon.ctl")
    dev = DeviceProcess("balloon", ["--control", ctl], socket_path=os.path.join(tmp, "balloon.sock"))
    mem = GuestMemory.create_shared(ram)
    alloc = PageAllocator(0, ram)
    drv = None
    try:
        sock = dev.wait_ready()
        deadline = time.monotonic() + 10
        while not os.path.exists(ctl) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        view = mem.regions[0].view
        ones = b"\x5a" * _TOUCH_CHUNK
        for off in range(0, ram, _TOUCH_CHUNK):
            n = min(_TOUCH_CHUNK, ram - off)
            view[off:off + n] = ones[:n]
        drv = VirtioBalloonDriver(VhostUserTransport(sock, mem, alloc, device_label="balloon0"), report_interval=0)
        drv.probe(asyncio.get_running_loop())
        drv.start()
        before = mem.resident_bytes()
        pages = inflate // 4096

        t0 = time.perf_counter()
        reply = await arequest(ctl, {"cmd": "balloon", "size": ram - inflate})
        if not reply.get("ok"):
            raise RuntimeError(f"balloon command failed: {reply.get('error')}")
        want_resident = before - inflate * 0.95
        while drv.actual < pages or mem.resident_bytes() > want_resident:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("inflate did not finish")
            await asyncio.sleep(0.001)
        inflate_s = time.perf_counter() - t0
        after = mem.resident_bytes()
        device_view = await arequest(ctl, {"cmd": "info"})

        t1 = time.perf_counter()
        await arequest(ctl, {"cmd": "balloon", "size": ram})
        while drv.actual > 0:
            if time.perf_counter() - t1 > timeout:
                raise TimeoutError("deflate did not finish")
            await asyncio.sleep(0.001)
        deflate_s = time.perf_counter() - t1
        # Deflated pages come back zero-filled, and only when touched.
        sample = drv.alloc.alloc_pages(1)
        zero = mem.read(sample, 4096) == bytes(4096)
        return {
            "benchmark": "balloon",
            "ram_bytes": ram,
            "inflate_bytes": inflate,
            "inflate_s": round(inflate_s, 4),
            "deflate_s": round(deflate_s, 4),
            "resident_before_bytes": before,
            "resident_after_inflate_bytes": after,
            "released_ratio": round((before - after) / inflate, 4),
            "resident_after_deflate_bytes": mem.resident_bytes(),
            "device_resident_bytes": device_view.get("resident_bytes"),
            "deflated_page_reads_zero": zero,
            "inflate_gib_per_s": round(inflate / inflate_s / 2**30, 2),
        }
    finally:
        if drv is not None:
            await drv.close()
        mem.close()
        dev.stop()
