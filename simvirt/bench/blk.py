"""``simvirt bench blk``: fio-like load through the simvirt virtio-blk driver.

The loop is callback driven and allocation free: ``iodepth`` slots each own
a data buffer in guest RAM; a completion immediately re-submits its slot,
and submissions are published once per event-loop turn, so EVENT_IDX and
batching do their job exactly as they would for a real guest.

Verification (``--verify``): every written block carries a pattern of
(block number, generation); reads check the pattern of the last completed
write, and write workloads end with a read-back of every block written.
Blocks with a request in flight are never picked again until it completes,
so a read never races a write of the same block.
"""
from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from dataclasses import dataclass
from typing import Optional

from simvirt.bench.procs import DeviceProcess
from simvirt.bench.stats import percentiles_us
from simvirt.devices.blk import spec as s
from simvirt.drivers.blk import VirtioBlkDriver
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator, PAGE_SIZE
from simvirt.sizes import format_size

_PAT = struct.Struct("<QQ")


@dataclass
class BlkBenchOptions:
    connect: Optional[str] = None
    backend: str = "null"
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    runtime: float = 5.0
    size: Optional[int] = None
    verify: Optional[str] = None  # None | "data" | "zeroes"
    num_queues: int = 1
    queue_size: int = 256
    mix: int = 50
    guest_ram: Optional[int] = None
    seed: int = 1
    poll_us: float = 0.0


def pattern(block: int, gen: int, bs: int) -> bytes:
    return _PAT.pack(block, gen) * (bs // 16)


def _device_args(backend: str, size: int) -> list[str]:
    if backend == "null":
        return ["--null", str(size)]
    if backend == "memory":
        return ["--memory", str(size)]
    if backend.startswith("file:"):
        return ["--image", backend[5:], "--size", str(size)]
    raise ValueError(f"unknown backend {backend!r} (null, memory or file:PATH)")


class BlkWorkload:
    def __init__(self, o: BlkBenchOptions, drv: VirtioBlkDriver, mem: GuestMemory, alloc: PageAllocator, nblocks: int) -> None:
        self.o = o
        self.drv = drv
        self.mem = mem
        self.nblocks = nblocks
        self.rng = random.Random(o.seed)
        self.lat: list[int] = []
        self.ios = 0
        self.bytes = 0
        self.errors = 0
        self.mismatches = 0
        self.verified_reads = 0
        self.seq_next = 0
        self.gen = [0] * nblocks if o.verify == "data" else None
        self.busy: set[int] = set()
        self.written: set[int] = set()
        bs = o.bs
        self.slots = []
        for _ in range(o.iodepth):
            gpa = alloc.alloc(bs)
            self.slots.append((gpa, mem.translate(gpa, bs)))
        self.stop_at = 0.0
        self.inflight = 0
        self.done: Optional[asyncio.Future] = None
        self.zero = bytes(bs)
        self.fill = b"\xaa" * bs

    def _pick_block(self) -> int:
        o = self.o
        if o.rw in ("read", "write"):
            b = self.seq_next
            self.seq_next = (b + 1) % self.nblocks
            return b
        rng = self.rng
        for _ in range(64):
            b = rng.randrange(self.nblocks)
            if b not in self.busy:
                return b
        return b

    def _is_read(self) -> bool:
        rw = self.o.rw
        if rw in ("read", "randread"):
            return True
        if rw in ("write", "randwrite"):
            return False
        return self.rng.randrange(100) < self.o.mix

    def issue(self, slot: int) -> None:
        o = self.o
        drv = self.drv
        bq = drv.pick_queue()
        block = self._pick_block()
        gpa, view = self.slots[slot]
        read = self._is_read()
        verify = o.verify
        if read:
            if verify == "zeroes":
                view[:] = self.fill
        else:
            if verify == "data":
                assert self.gen is not None
                g = self.gen[block] + 1
                view[:] = pattern(block, g, o.bs)
            elif verify == "zeroes":
                view[:] = self.zero
        if verify:
            self.busy.add(block)
        t0 = time.perf_counter_ns()
        rtype = s.VIRTIO_BLK_T_IN if read else s.VIRTIO_BLK_T_OUT
        sector = block * (o.bs // 512)

        def done(status: int, length: int) -> None:
            now = time.perf_counter_ns()
            self.lat.append(now - t0)
            self.inflight -= 1
            if status != s.VIRTIO_BLK_S_OK:
                self.errors += 1
            else:
                self.ios += 1
                self.bytes += o.bs
                if verify:
                    self._check(block, read, view)
            if verify:
                self.busy.discard(block)
            if now < self.stop_at:
                self.inflight += 1
                self.issue(slot)
            elif self.inflight == 0 and self.done is not None and not self.done.done():
                self.done.set_result(None)

        self.inflight_guard(bq)
        drv.submit(bq, rtype, sector, drv._segments(gpa, o.bs), done)

    def inflight_guard(self, bq) -> None:
        if not self.drv.can_submit(bq, 1):
            raise RuntimeError("queue full: iodepth exceeds queue capacity")

    def _check(self, block: int, read: bool, view: memoryview) -> None:
        if self.o.verify == "zeroes":
            if read:
                self.verified_reads += 1
                if bytes(view) != self.zero:
                    self.mismatches += 1
            return
        assert self.gen is not None
        if read:
            g = self.gen[block]
            if g:
                self.verified_reads += 1
                if bytes(view) != pattern(block, g, self.o.bs):
                    self.mismatches += 1
        else:
            self.gen[block] += 1
            self.written.add(block)

    async def run(self, runtime: float) -> float:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        t0 = time.perf_counter()
        self.stop_at = time.perf_counter_ns() + int(runtime * 1e9)
        for slot in range(self.o.iodepth):
            self.inflight += 1
            self.issue(slot)
        await self.done
        return time.perf_counter() - t0


async def prefill(drv: VirtioBlkDriver, run: BlkWorkload, o: BlkBenchOptions) -> None:
    """For read workloads with --verify=data: write a pattern to every block first."""
    assert run.gen is not None
    sem = asyncio.Semaphore(o.iodepth)

    async def one(b: int) -> None:
        async with sem:
            run.gen[b] = 1
            await drv.write(b * (o.bs // 512), pattern(b, 1, o.bs))

    await asyncio.gather(*(one(b) for b in range(run.nblocks)))


async def readback(drv: VirtioBlkDriver, run: BlkWorkload, o: BlkBenchOptions) -> tuple[int, int]:
    assert run.gen is not None
    sem = asyncio.Semaphore(o.iodepth)
    bad = 0

    async def one(b: int) -> None:
        nonlocal bad
        async with sem:
            data = await drv.read(b * (o.bs // 512), o.bs)
            if data != pattern(b, run.gen[b], o.bs):
                bad += 1

    blocks = sorted(run.written)
    await asyncio.gather(*(one(b) for b in blocks))
    return len(blocks), bad


async def run_blk_bench(o: BlkBenchOptions) -> dict:
    if o.bs <= 0 or o.bs % 512:
        raise ValueError("--bs must be a positive multiple of 512")
    if o.iodepth > o.queue_size * o.num_queues:
        raise ValueError(f"--iodepth {o.iodepth} exceeds queue capacity {o.queue_size * o.num_queues}")
    devproc: Optional[DeviceProcess] = None
    backend_desc = o.connect or o.backend
    if o.connect:
        sock = o.connect
    else:
        size = o.size or (1 << 30)
        devproc = DeviceProcess("blk", _device_args(o.backend, size) + ["--num-queues", str(o.num_queues)])
        sock = devproc.wait_ready()
    ram = o.guest_ram or max(64 << 20, (2 * o.iodepth * o.bs + 32 * o.queue_size * o.num_queues * 16 + (16 << 20)))
    ram = -(-ram // PAGE_SIZE) * PAGE_SIZE
    mem = GuestMemory.create_shared(ram)
    alloc = PageAllocator(0, ram)
    loop = asyncio.get_running_loop()
    drv = VirtioBlkDriver(VhostUserTransport(sock, mem, alloc, device_label="blk0"),
                          num_queues=o.num_queues, queue_size=o.queue_size, poll_us=o.poll_us)
    try:
        cfg = drv.probe(loop)
        capacity = cfg.capacity * 512
        use = min(o.size or capacity, capacity)
        nblocks = use // o.bs
        if nblocks == 0:
            raise ValueError(f"disk of {capacity} bytes holds no {o.bs}-byte block")
        if drv.readonly and o.rw not in ("read", "randread"):
            raise ValueError("device is read-only; use --rw read or randread")
        run = BlkWorkload(o, drv, mem, alloc, nblocks)
        if o.verify == "data" and o.rw in ("read", "randread", "randrw"):
            await prefill(drv, run, o)
        qs0 = [(h.h.kicks, h.h.kicks_suppressed, h.h.interrupts) for h in drv.queues]
        cpu0 = os.times()
        elapsed = await run.run(o.runtime)
        cpu1 = os.times()
        qs1 = [(h.h.kicks, h.h.kicks_suppressed, h.h.interrupts) for h in drv.queues]
        rb = (0, 0)
        if o.verify == "data" and run.written:
            rb = await readback(drv, run, o)
        kicks = sum(b[0] - a[0] for a, b in zip(qs0, qs1))
        suppressed = sum(b[1] - a[1] for a, b in zip(qs0, qs1))
        irqs = sum(b[2] - a[2] for a, b in zip(qs0, qs1))
        verified: Optional[bool] = None
        if o.verify:
            checked = run.verified_reads + rb[0]
            verified = run.mismatches == 0 and rb[1] == 0 and run.errors == 0 and checked > 0
        result = {
            "benchmark": "blk",
            "backend": backend_desc,
            "rw": o.rw,
            "bs": o.bs,
            "iodepth": o.iodepth,
            "num_queues": len(drv.queues),
            "size": nblocks * o.bs,
            "runtime_s": round(elapsed, 3),
            "ios": run.ios,
            "iops": round(run.ios / elapsed, 1),
            "bw_bytes": round(run.bytes / elapsed, 1),
            "lat_us": percentiles_us(run.lat),
            "errors": run.errors,
            "verified": verified,
            "verify": {"mode": o.verify, "reads_checked": run.verified_reads, "mismatches": run.mismatches,
                       "blocks_read_back": rb[0], "read_back_mismatches": rb[1]} if o.verify else None,
            "kicks": kicks,
            "kicks_suppressed": suppressed,
            "interrupts": irqs,
            "ios_per_kick": round(run.ios / kicks, 2) if kicks else None,
            "ios_per_interrupt": round(run.ios / irqs, 2) if irqs else None,
            "driver_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3),
            "features": drv.transport.features,
        }
        return result
    finally:
        try:
            drv.close()
        except Exception:  # noqa: BLE001 - best-effort hang-up
            pass
        mem.close()
        if devproc is not None:
            devproc.stop()


def format_human(r: dict) -> str:
    lat = r["lat_us"]
    lines = [
        f"blk {r['rw']} bs={format_size(r['bs'])} iodepth={r['iodepth']} backend={r['backend']} queues={r['num_queues']}",
        f"  iops={r['iops']:.0f}  bw={r['bw_bytes'] / 1e6:.1f} MB/s  ios={r['ios']}  errors={r['errors']}",
        f"  lat us: p50={lat['p50']} p90={lat['p90']} p99={lat['p99']} max={lat['max']}",
        f"  kicks={r['kicks']} (suppressed publishes {r['kicks_suppressed']})  interrupts={r['interrupts']}  ios/kick={r['ios_per_kick']}",
    ]
    if r["verified"] is not None:
        lines.append(f"  verified={r['verified']} {r['verify']}")
    return "\n".join(lines)
