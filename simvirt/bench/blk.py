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
from simvirt.bench.stats import LatencyHistogram, percentiles_us
from simvirt.devices.blk import spec as s
from simvirt.drivers.blk import VirtioBlkDriver
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator, PAGE_SIZE
from simvirt.sizes import format_size

_PAT = struct.Struct("<QQ")
perf_counter_ns = time.perf_counter_ns


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
    offset: int = 0                    # fio's offset: the job's region starts here (bytes)
    rate_iops: Optional[int] = None    # fio's rate_iops


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


class _Slot:
    """One unit of queue depth: its buffer, its persistent chains, its request in flight."""

    __slots__ = ("w", "gpa", "view", "rd", "wr", "block", "read", "t0", "complete")

    def __init__(self, w: "BlkWorkload", gpa: int, view: memoryview) -> None:
        self.w = w
        self.gpa = gpa
        self.view = view
        self.rd = self.wr = None  # FixedRequest per direction, when the ring has room
        self.block = 0
        self.read = True
        self.t0 = 0
        self.complete = self._complete  # bound once, reused for every request

    def _complete(self, status: int, length: int) -> None:
        w = self.w
        now = perf_counter_ns()
        read = self.read
        lat = now - self.t0
        w.lat_dir[read].append(lat)
        (w.lat_read if read else w.lat_write).observe(lat * 1e-9)
        if status:
            w.errors += 1
        else:
            w.ios_dir[read] += 1
        if w.verify:
            if not status:
                w._check(self.block, read, self.view)
            w.busy.discard(self.block)
        if now < w.stop_at:
            w.resubmit(self, now)
        else:
            w.retire()


class BlkWorkload:
    """A running fio-style job on one driver: ``iodepth`` slots, each resubmitted on completion."""

    def __init__(self, o: BlkBenchOptions, drv: VirtioBlkDriver, mem: GuestMemory, alloc: PageAllocator, nblocks: int) -> None:
        self.o = o
        self.bs = o.bs
        self.drv = drv
        self.mem = mem
        self.nblocks = nblocks
        self.verify = o.verify
        self.rng = random.Random(o.seed)
        self._random = self.rng.random
        # Per direction (index: is-read), fio-style; fixed memory however long the run.
        self.lat_dir = [LatencyHistogram(), LatencyHistogram()]
        self.ios_dir = [0, 0]
        self.base_block = o.offset // o.bs
        # fio's rate_iops: issues spread evenly, one every gap_ns, whatever the queue depth.
        self.gap_ns = int(1e9 / o.rate_iops) if o.rate_iops else 0
        # Chosen once, not per I/O: paced (rate_iops) or straight back in.
        self.resubmit = self.pace if self.gap_ns else self.issue
        self.spb = o.bs >> 9                      # sectors per block
        self.base_sector = self.base_block * self.spb
        self.next_issue_ns = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.errors = 0
        self.mismatches = 0
        self.verified_reads = 0
        self.seq_next = 0
        self.sequential = o.rw in ("read", "write")
        self.gen = [0] * nblocks if o.verify == "data" else None
        self.busy: set[int] = set()
        self.written: set[int] = set()
        self.stop_at = 0
        self.stopped = False
        self.inflight = 0
        self.done: Optional[asyncio.Future] = None
        self.zero = bytes(o.bs)
        self.fill = b"\xaa" * o.bs
        self.slots: list[_Slot] = []
        self.lat_read = drv.latency[s.VIRTIO_BLK_T_IN]
        self.lat_write = drv.latency[s.VIRTIO_BLK_T_OUT]
        directions = {"read": (True,), "randread": (True,), "write": (False,), "randwrite": (False,)}.get(o.rw, (True, False))
        # Decided once, not per I/O: the one direction of a pure read or write job,
        # None for a mix (then :meth:`issue` draws it from the RNG).
        self.fixed_read: Optional[bool] = directions[0] if len(directions) == 1 else None
        self.mix = o.mix
        for i in range(o.iodepth):
            gpa = alloc.alloc(o.bs)
            slot = _Slot(self, gpa, mem.translate(gpa, o.bs))
            bq = drv.queues[i % len(drv.queues)]
            segs = drv._segments(gpa, o.bs)
            need = len(directions) * (len(segs) + 2)
            # Persistent chains while they leave a quarter of the ring for anything else.
            if bq.q.num_free - need >= bq.q.size // 4 and len(bq.free_slots) > len(directions):
                if True in directions:
                    slot.rd = drv.fixed_request(bq, s.VIRTIO_BLK_T_IN, segs)
                if False in directions:
                    slot.wr = drv.fixed_request(bq, s.VIRTIO_BLK_T_OUT, segs)
            self.slots.append(slot)

    @property
    def ios(self) -> int:
        return self.ios_dir[0] + self.ios_dir[1]

    @property
    def bytes(self) -> int:
        return self.ios * self.bs

    @property
    def lat(self) -> LatencyHistogram:
        """Read and write latencies together."""
        return self.lat_dir[1].merged(self.lat_dir[0])

    def pace(self, slot: _Slot, now: int) -> None:
        """Issue ``slot`` at the next rate_iops tick (now, if the job is behind)."""
        at = max(self.next_issue_ns, now)
        self.next_issue_ns = at + self.gap_ns
        if at <= now:
            self.issue(slot)
        else:
            assert self.loop is not None
            self.loop.call_later((at - now) * 1e-9, self._paced_issue, slot)

    def _paced_issue(self, slot: _Slot) -> None:
        if perf_counter_ns() < self.stop_at:
            self.issue(slot)
        else:
            self.retire()

    def retire(self) -> None:
        """A slot is done for good (the run is over); the last one resolves :meth:`run`."""
        self.inflight -= 1
        if self.inflight == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def release(self, alloc: PageAllocator) -> None:
        """Give back the slot buffers and persistent chains (a finished job in a longer-lived guest)."""
        for slot in self.slots:
            for fixed in (slot.rd, slot.wr):
                if fixed is not None:
                    self.drv.release_fixed(fixed)
            slot.rd = slot.wr = None
            alloc.free_range(slot.gpa, max(1, -(-self.bs // alloc.page_size)))
        self.slots.clear()

    def _pick_block(self) -> int:
        if self.sequential:
            b = self.seq_next
            self.seq_next = (b + 1) % self.nblocks
            return b
        n = self.nblocks
        rnd = self._random
        b = int(rnd() * n)
        if self.verify:
            for _ in range(64):
                if b not in self.busy:
                    break
                b = int(rnd() * n)
        return b

    def issue(self, slot: _Slot, now: int = 0) -> None:  # now: the same call shape as pace()
        block = self._pick_block()
        read = self.fixed_read
        if read is None:            # a mix: one draw per I/O, after the block's (seeded runs repeat)
            read = self._random() * 100 < self.mix
        slot.block = block
        slot.read = read
        verify = self.verify
        if verify:
            view = slot.view
            if read:
                if verify == "zeroes":
                    view[:] = self.fill
            elif verify == "data":
                assert self.gen is not None
                view[:] = pattern(block, self.gen[block] + 1, self.bs)
            else:
                view[:] = self.zero
            self.busy.add(block)
        sector = self.base_sector + block * self.spb
        fixed = slot.rd if read else slot.wr
        slot.t0 = perf_counter_ns()
        if fixed is not None:
            fixed.submit(sector, slot.complete)
            return
        drv = self.drv
        bq = drv.pick_queue()
        if not drv.can_submit(bq, 1):
            raise RuntimeError("queue full: iodepth exceeds queue capacity")
        drv.submit(bq, s.VIRTIO_BLK_T_IN if read else s.VIRTIO_BLK_T_OUT, sector,
                   drv._segments(slot.gpa, self.bs), slot.complete)

    def _check(self, block: int, read: bool, view: memoryview) -> None:
        if self.verify == "zeroes":
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
                if bytes(view) != pattern(block, g, self.bs):
                    self.mismatches += 1
        else:
            self.gen[block] += 1
            self.written.add(block)

    def stop(self) -> None:
        """No new I/O from now on, even if :meth:`run` has not started yet: what is in flight
        completes and retires (a run being interrupted)."""
        self.stopped = True
        self.stop_at = 0

    async def run(self, runtime: float) -> float:
        if self.stopped:
            return 0.0
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        t0 = time.perf_counter()
        self.loop = loop
        now = perf_counter_ns()
        self.stop_at = now + int(runtime * 1e9)
        self.next_issue_ns = now
        for slot in self.slots:
            self.inflight += 1
            self.resubmit(slot, now)
        await self.done
        return time.perf_counter() - t0


async def prefill(drv: VirtioBlkDriver, run: BlkWorkload, o: BlkBenchOptions) -> None:
    """For read workloads with --verify=data: write a pattern to every block first."""
    assert run.gen is not None
    sem = asyncio.Semaphore(o.iodepth)

    async def one(b: int) -> None:
        async with sem:
            run.gen[b] = 1
            await drv.write((run.base_block + b) * (o.bs // 512), pattern(b, 1, o.bs))

    await asyncio.gather(*(one(b) for b in range(run.nblocks)))


async def readback(drv: VirtioBlkDriver, run: BlkWorkload, o: BlkBenchOptions) -> tuple[int, int]:
    assert run.gen is not None
    sem = asyncio.Semaphore(o.iodepth)
    bad = 0

    async def one(b: int) -> None:
        nonlocal bad
        async with sem:
            data = await drv.read((run.base_block + b) * (o.bs // 512), o.bs)
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
