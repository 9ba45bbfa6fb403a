"""The load a phase puts on a guest: one runner per job, inside the VM's driver process.

Every runner exposes the same three things to the phase loop: cumulative
counters (``ops``, ``nbytes``, ``errors``) and a cumulative latency
histogram, read once a second for the timeline, and ``result()`` for the
fio-like report at the end. ``run(deadline)`` does the work until the
monotonic ``deadline``.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Optional

from simvirt.bench.blk import BlkBenchOptions, BlkWorkload, prefill, readback
from simvirt.bench.stats import LatencyHistogram, percentiles_us
from simvirt.control import arequest
from simvirt.devices.runner import sleep_until
from simvirt.drivers.netstack import GuestStack
from simvirt.memory import OutOfGuestMemory
from simvirt.net.packets import ip_bytes, udp_frame
from simvirt.scenario.spec import BalloonJob, BlkJob, Job, PingJob, PressureJob, StreamJob, UdpRRJob

if TYPE_CHECKING:
    from simvirt.machine.run import Machine

_RW = {"rw": "randrw"}      # fio's rw (sequential mixed) runs as our mixed pattern


class JobRunner:
    """What the phase loop reads from every kind of job."""

    rate_unit = ""

    def __init__(self, spec: Job, halt: Optional[asyncio.Event] = None) -> None:
        """``halt``: a run-wide stop event to share (the machine's); by default the runner's own."""
        self.spec = spec
        self.ops = 0
        self.nbytes = 0
        self.errors = 0
        self.hist = LatencyHistogram()
        self.started = 0.0
        self.ended: Optional[float] = None     # when the load stopped, if checks ran after it
        self.elapsed = 0.0
        self._halt = halt if halt is not None else asyncio.Event()

    def halt(self) -> None:
        """End the load before its deadline (the run is being stopped, SIGINT/SIGTERM).

        Every runner's loop checks :meth:`live` and sleeps with :meth:`until`,
        so it winds down at its next step: requests in flight complete and
        verification still runs, which cancellation could not promise.
        """
        self._halt.set()

    @property
    def halted(self) -> bool:
        return self._halt.is_set()

    def live(self, deadline: float) -> bool:
        """Keep going: before ``deadline`` and not halted."""
        return not self.halted and time.monotonic() < deadline

    async def until(self, t: float) -> None:
        """Sleep until monotonic time ``t``, or less if halted meanwhile."""
        await sleep_until(t, self._halt)

    def latency(self) -> LatencyHistogram:
        return self.hist

    def max_latency_ns(self) -> int:
        """The largest latency so far (0 if none): what fault reports compare before and after."""
        return self.latency().summary()[2]

    def refresh(self) -> None:
        """Bring ``ops``/``nbytes``/``errors`` up to date (runners that count elsewhere)."""

    async def run(self, deadline: float) -> None:
        self.started = time.monotonic()
        try:
            await self._run(deadline)
        finally:
            self.elapsed = max(1e-9, (self.ended or time.monotonic()) - self.started)

    async def _run(self, deadline: float) -> None:
        raise NotImplementedError

    def detail(self) -> dict[str, Any]:
        return {}

    def result(self) -> dict[str, Any]:
        el = self.elapsed or 1e-9
        return {"runtime_s": round(self.elapsed, 3),
                "summary": {"rate": round(self.ops / el, 1), "rate_unit": self.rate_unit,
                            "bw_bytes": round(self.nbytes / el, 1), "lat_us": percentiles_us(self.latency()),
                            "errors": self.errors},
                **self.detail()}

    def close(self) -> None:
        """Give back what the job took from the guest (buffers, ring slots, memory)."""


class BlkRunner(JobRunner):
    """fio semantics on our blk driver: ``numjobs`` workloads reported together."""

    rate_unit = "IOPS"

    def __init__(self, spec: BlkJob, m: "Machine", phase_duration: float) -> None:
        super().__init__(spec)
        self.m = m
        self.drv = m.drivers[spec.device]
        self.runtime = min(spec.runtime or phase_duration, phase_duration)
        cap = self.drv.capacity_bytes
        if spec.offset >= cap:
            raise ValueError(f"{spec.name}: offset {spec.offset} is beyond the disk ({cap} bytes)")
        region = min(spec.size or cap - spec.offset, cap - spec.offset)
        self.nblocks = region // spec.bs
        if self.nblocks < 1:
            raise ValueError(f"{spec.name}: region smaller than one block")
        assert m.mem is not None and m.alloc is not None
        self.works: list[BlkWorkload] = []
        per_job_rate = -(-spec.rate_iops // spec.numjobs) if spec.rate_iops else None
        for k in range(spec.numjobs):
            o = BlkBenchOptions(rw=_RW.get(spec.rw, spec.rw), bs=spec.bs, iodepth=spec.iodepth,
                                runtime=self.runtime, verify="data" if spec.verify else None, mix=spec.rwmixread,
                                seed=spec.seed + k, offset=spec.offset, rate_iops=per_job_rate)
            self.works.append(BlkWorkload(o, self.drv, m.mem, m.alloc, self.nblocks))
        self.verified: Optional[bool] = None
        self.read_back = 0

    def halt(self) -> None:
        super().halt()
        for w in self.works:
            w.stop()

    def refresh(self) -> None:
        self.ops = sum(w.ios for w in self.works)
        self.nbytes = self.ops * self.spec.bs
        self.errors = sum(w.errors for w in self.works)

    def latency(self) -> LatencyHistogram:
        return LatencyHistogram.merge(*(h for w in self.works for h in w.lat_dir))

    def max_latency_ns(self) -> int:
        """The max of the per-job, per-direction histograms (no merged copy just to read it)."""
        return LatencyHistogram.max_of(*(h for w in self.works for h in w.lat_dir))

    async def _run(self, deadline: float) -> None:
        spec = self.spec
        if spec.verify and spec.rw in ("read", "randread"):
            for w in self.works:        # something to verify against (fio lays out its file first)
                await prefill(self.drv, w, w.o)
        runtime = max(0.0, min(self.runtime, deadline - time.monotonic()))
        self.started = time.monotonic()
        await asyncio.gather(*(w.run(runtime) for w in self.works))
        self.ended = time.monotonic()
        if spec.verify:
            bad = 0
            for w in self.works:
                if w.written:
                    n, b = await readback(self.drv, w, w.o)
                    self.read_back += n
                    bad += b
            self.verified = bad == 0 and not any(w.mismatches for w in self.works) and self.errors == 0
        self.refresh()

    def detail(self) -> dict[str, Any]:
        self.refresh()
        el = self.elapsed or 1e-9
        out: dict[str, Any] = {"verified": self.verified}
        for name, is_read in (("read", True), ("write", False)):
            ios = sum(w.ios_dir[is_read] for w in self.works)
            h = LatencyHistogram.merge(*(w.lat_dir[is_read] for w in self.works))
            out[name] = {"ios": ios, "io_bytes": ios * self.spec.bs, "iops": round(ios / el, 1),
                         "bw_bytes": round(ios * self.spec.bs / el, 1), "lat_us": percentiles_us(h)}
        out["blk"] = {"rw": self.spec.rw, "bs": self.spec.bs, "iodepth": self.spec.iodepth,
                      "numjobs": self.spec.numjobs, "rate_iops": self.spec.rate_iops,
                      "blocks_read_back": self.read_back}
        return out

    def close(self) -> None:
        assert self.m.alloc is not None
        for w in self.works:
            w.release(self.m.alloc)


class PingRunner(JobRunner):
    """ping -i INTERVAL -s SIZE -W 1: a request every interval whatever the replies do;
    ``interval = 0`` is ping -f (the next request when the reply is in)."""

    rate_unit = "pings/s"
    TIMEOUT = 1.0

    def __init__(self, spec: PingJob, m: "Machine") -> None:
        super().__init__(spec)
        self.stack = m.nets[spec.device]
        self.sent = self.lost = 0

    async def _one(self, target: bytes, seq: int, payload: bytes) -> None:
        try:
            rtt = await self.stack.ping(target, seq, payload=payload, timeout=self.TIMEOUT)
        except TimeoutError:             # ARP unanswered: the peer is unreachable
            rtt = None
        if rtt is None:
            self.lost += 1
            self.errors += 1
        else:
            self.ops += 1
            self.hist.append(rtt)

    async def _run(self, deadline: float) -> None:
        spec = self.spec
        assert isinstance(spec, PingJob)
        target = ip_bytes(spec.target)
        payload = bytes(spec.size)
        pending: set[asyncio.Task] = set()
        next_t = time.monotonic()
        while self.live(deadline):
            seq, self.sent = self.sent, self.sent + 1
            if not spec.interval:
                await self._one(target, seq, payload)
                continue
            task = asyncio.ensure_future(self._one(target, seq, payload))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_t += spec.interval
            await self.until(min(next_t, deadline))
        if pending:          # the last requests get their full timeout, as ping -w does
            await asyncio.gather(*pending)

    def detail(self) -> dict[str, Any]:
        return {"ping": {"target": self.spec.target, "sent": self.sent, "lost": self.lost}}  # type: ignore[union-attr]

class TxRunner(JobRunner):
    """UDP frames from the guest to ``target``:``port`` as fast as the ring takes them (or ``rate_pps``)."""

    rate_unit = "pps"

    def __init__(self, spec: StreamJob, stack: GuestStack, halt: Optional[asyncio.Event] = None) -> None:
        super().__init__(spec, halt)
        self.stack = stack
        self.ring_full = 0

    async def _run(self, deadline: float) -> None:
        spec = self.spec
        assert isinstance(spec, StreamJob)
        stack, drv = self.stack, self.stack.drv
        target = ip_bytes(spec.target)
        mac = await stack.resolve(target)
        frame = udp_frame(drv.mac, mac, stack.ip, target, 40000, spec.port, bytes(spec.frame_size - 42))
        gap = 1.0 / spec.rate_pps if spec.rate_pps else 0.0
        next_t = time.monotonic()
        while True:
            now = time.monotonic()
            if not self.live(deadline):
                break
            burst_max = 32
            if gap:
                if now < next_t:
                    await self.until(min(next_t, deadline))
                    continue
                burst_max = min(32, 1 + int((now - next_t) / gap))
            burst = 0
            while burst < burst_max and drv.try_send(frame, publish=False):
                burst += 1
            if burst:
                drv.tx.publish()  # type: ignore[union-attr]
            else:
                self.ring_full += 1
            next_t += burst * gap
            self.ops += burst
            self.nbytes += burst * spec.frame_size
            await asyncio.sleep(0)

    def detail(self) -> dict[str, Any]:
        return _stream_detail(self, ring_full=self.ring_full)


class RxRunner(JobRunner):
    """Frames arriving in the guest: the responder streams them on request; on a switch, a neighbour's tx."""

    rate_unit = "pps"

    def __init__(self, spec: StreamJob, m: "Machine") -> None:
        super().__init__(spec)
        self.drv = m.nets[spec.device].drv
        self.ctl = m.controls.get(spec.device)
        self.streams = m.net_backends.get(spec.device) == "responder"

    async def _run(self, deadline: float) -> None:
        spec = self.spec
        assert isinstance(spec, StreamJob)
        f0, b0 = self.drv.rx_frames, self.drv.rx_bytes
        if self.streams and self.ctl:
            reply = await arequest(self.ctl, {"cmd": "stream", "frame_size": spec.frame_size, "port": spec.port,
                                              "rate_pps": spec.rate_pps})
            if not reply.get("ok"):
                raise RuntimeError(f"{spec.name}: the device refused to stream: {reply.get('error')}")
        try:
            while self.live(deadline):
                await self.until(min(time.monotonic() + 0.05, deadline))
                self.ops = self.drv.rx_frames - f0
                self.nbytes = self.drv.rx_bytes - b0
        finally:
            if self.streams and self.ctl:
                await arequest(self.ctl, {"cmd": "stream", "stop": True})

    def detail(self) -> dict[str, Any]:
        return _stream_detail(self)


def _stream_detail(r: JobRunner, **extra: Any) -> dict[str, Any]:
    el = r.elapsed or 1e-9
    return {"stream": {"frames": r.ops, "pps": round(r.ops / el, 1), "gbps": round(r.nbytes * 8 / el / 1e9, 4),
                       "drops": None, **extra}}


class UdpRRRunner(JobRunner):
    """netperf UDP_RR: a request to the echo port, wait for its answer, again."""

    rate_unit = "tps"

    def __init__(self, spec: UdpRRJob, m: "Machine", sport: int) -> None:
        super().__init__(spec)
        self.stack = m.nets[spec.device]
        self.sport = sport
        self._waiting: Optional[asyncio.Future] = None

    def _reply(self, src: bytes, sport: int, payload: bytes) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(time.perf_counter_ns())

    async def _run(self, deadline: float) -> None:
        spec = self.spec
        assert isinstance(spec, UdpRRJob)
        loop = asyncio.get_running_loop()
        target = ip_bytes(spec.target)
        payload = os.urandom(spec.size)
        self.stack.udp_handlers[self.sport] = self._reply
        try:
            while self.live(deadline):
                self._waiting = loop.create_future()
                t0 = time.perf_counter_ns()
                await self.stack.udp_send(target, spec.port, self.sport, payload)
                try:
                    t1 = await asyncio.wait_for(self._waiting, max(0.05, min(1.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    self.errors += 1
                    continue
                self.ops += 1
                self.nbytes += 2 * spec.size
                self.hist.append(t1 - t0)
        finally:
            self.stack.udp_handlers.pop(self.sport, None)

    def detail(self) -> dict[str, Any]:
        return {"rr": {"transactions": self.ops, "timeouts": self.errors}}


class BalloonRunner(JobRunner):
    """Move the balloon at ``at`` and time how long the guest takes to follow."""

    def __init__(self, spec: BalloonJob, m: "Machine", t_phase: float) -> None:
        super().__init__(spec)
        self.m = m
        self.t_phase = t_phase
        self.out: dict[str, Any] = {"target": spec.target, "actual": None, "took_s": None}

    async def _run(self, deadline: float) -> None:
        spec = self.spec
        assert isinstance(spec, BalloonJob)
        m = self.m
        await self.until(self.t_phase + spec.at)
        if self.halted:
            return
        assert m.balloon_ctl is not None
        t0 = time.monotonic()
        await m.control({"cmd": "balloon", "size": spec.target})
        want = (m.cfg.ram - spec.target) // 4096
        while self.live(deadline):
            stats = await arequest(m.balloon_ctl, {"cmd": "balloon-stats"})
            self.out["actual"] = m.cfg.ram - stats.get("actual_pages", 0) * 4096
            if stats.get("actual_pages") == want:
                self.out["took_s"] = round(time.monotonic() - t0, 3)
                self.ops = 1
                break
            await asyncio.sleep(0.02)
        else:
            if not self.halted:       # stopped before the guest could follow: not a failure
                self.errors += 1
        await self.until(deadline)

    def detail(self) -> dict[str, Any]:
        return {"balloon": self.out}


class PressureRunner(JobRunner):
    """Memory pressure in the guest: take and touch RAM at ``at``, hold it to the phase end, give it back."""

    def __init__(self, spec: PressureJob, m: "Machine", t_phase: float) -> None:
        super().__init__(spec)
        self.m = m
        self.t_phase = t_phase
        self.held: list[tuple[int, int]] = []
        self.out: dict[str, Any] = {"size": spec.size, "allocated": 0, "took_s": None, "error": None}

    async def _run(self, deadline: float) -> None:
        spec = self.spec
        assert isinstance(spec, PressureJob)
        m = self.m
        assert m.alloc is not None and m.mem is not None
        await self.until(self.t_phase + spec.at)
        t0 = time.monotonic()
        chunk = 256           # pages per allocation: big enough to be quick, small enough to fit in fragments
        need = -(-spec.size // 4096)
        try:
            while need > 0 and self.live(deadline):
                n = min(chunk, need)
                try:
                    gpa = m.alloc.alloc_pages(n)
                except OutOfGuestMemory:
                    if n == 1:
                        raise
                    chunk = max(1, chunk // 4)
                    continue
                view = m.mem.translate(gpa, n * 4096)
                view[::4096] = b"\x01" * n          # touch every page: resident on the host
                self.held.append((gpa, n))
                need -= n
                self.out["allocated"] += n * 4096
                self.ops += n
                self.nbytes += n * 4096
                await asyncio.sleep(0)
            if need <= 0:
                self.out["took_s"] = round(time.monotonic() - t0, 3)
        except OutOfGuestMemory as e:
            self.errors += 1
            self.out["error"] = f"guest out of memory after {self.out['allocated']} bytes: {e}"
        await self.until(deadline)

    def detail(self) -> dict[str, Any]:
        return {"pressure": self.out}

    def close(self) -> None:
        assert self.m.alloc is not None
        for gpa, n in self.held:
            self.m.alloc.free_range(gpa, n)
        self.held.clear()


def make_runner(job: Job, m: "Machine", t_phase: float, phase_duration: float, index: int) -> JobRunner:
    if isinstance(job, BlkJob):
        return BlkRunner(job, m, phase_duration)
    if isinstance(job, PingJob):
        return PingRunner(job, m)
    if isinstance(job, StreamJob):
        return TxRunner(job, m.nets[job.device]) if job.kind == "tx" else RxRunner(job, m)
    if isinstance(job, UdpRRJob):
        return UdpRRRunner(job, m, sport=41000 + index)
    if isinstance(job, BalloonJob):
        return BalloonRunner(job, m, t_phase)
    if isinstance(job, PressureJob):
        return PressureRunner(job, m, t_phase)
    raise TypeError(f"unknown job {job!r}")
