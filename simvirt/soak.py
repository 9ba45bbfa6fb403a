"""``simvirt soak``: run a mixed machine for a long time and check that nothing leaks.

A leak in a device process or the driver shows up as resident memory or
open file descriptors that keep growing; a correctness problem as errors or
failed verification.  The soak runs a machine (the embedded default: a
verified random read/write disk, a null disk, a pinging NIC and a balloon
following a script), optionally SIGKILLs a device process every
``--kill-every`` seconds (the restart path is part of what must not leak),
samples RSS and fd counts of every process once a second, and judges after
a warm-up: each process that lived through the measured window must end
within ``--rss-slack`` of the private memory (RssAnon) it had when the
window began, and with no more fds.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

from rich.console import Console

from simvirt.machine.config import BlkDeviceConfig, load_config
from simvirt.machine.run import Machine, run_machine

def proc_sample(pid: int) -> Optional[tuple[int, int]]:
    """(private resident bytes, open fds) of a live process, or None if it is gone.

    Private (RssAnon): guest RAM is a shared segment that the driver and the
    devices touch more of as they run, bounded by the guest's size; a leak
    is memory a process allocates for itself.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (FileNotFoundError, ProcessLookupError, PermissionError, StopIteration):
        return None


@dataclass
class Series:
    name: str
    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, fds)

    def judge(self, warm_until: float, end: float, rss_slack: float, rss_slack_bytes: int) -> dict:
        window = [x for x in self.samples if x[0] >= warm_until]
        out: dict = {"process": self.name, "pid": self.pid, "samples": len(self.samples)}
        if not window or self.samples[0][0] > warm_until or window[-1][0] < end - 2.5:
            out.update(judged=False, reason="did not live through the measured window")
            return out
        _, rss0, fds0 = window[0]
        _, rss1, fds1 = window[-1]
        rss_max = max(x[1] for x in window)
        fds_max = max(x[2] for x in window)
        rss_ok = rss1 <= rss0 * (1 + rss_slack) + rss_slack_bytes
        fds_ok = fds1 <= fds0
        out.update(judged=True, rss_start=rss0, rss_end=rss1, rss_max=rss_max, fds_start=fds0, fds_end=fds1,
                   fds_max=fds_max, rss_growth=round(rss1 / rss0 - 1, 4) if rss0 else None, ok=rss_ok and fds_ok)
        return out


async def soak(minutes: float, *, config: Optional[str] = None, kill_every: float = 0.0, warmup: float = 0.2,
               rss_slack: float = 0.10, rss_slack_bytes: int = 16 << 20, seed: int = 1,
               console: Optional[Console] = None) -> dict:
    console = console or Console(stderr=True)
    cfg = load_config(config)
    duration = minutes * 60.0
    cfg.duration = duration
    if kill_every > 0:
        # A RAM disk dies with its process: with kills, disks live in files (as real ones would).
        for dev in cfg.devices:
            if isinstance(dev, BlkDeviceConfig) and dev.backend == "memory":
                dev.backend = "scratch"
    holder: dict[str, Machine] = {}
    series: dict[tuple[str, int], Series] = {}
    kills: list[dict] = []
    t0 = time.monotonic()

    async def sampler() -> None:
        while True:
            m = holder.get("m")
            now = time.monotonic() - t0
            procs = [("driver", os.getpid())]
            if m is not None:
                procs += [(f"device-{n}", p.proc.pid) for n, p in m.procs.items()]
            for name, pid in procs:
                smp = proc_sample(pid)
                if smp is not None:
                    series.setdefault((name, pid), Series(name, pid)).samples.append((now, *smp))
            await asyncio.sleep(1.0)

    async def killer() -> None:
        rng = random.Random(seed)
        while True:
            await asyncio.sleep(kill_every * rng.uniform(0.5, 1.5))
            if time.monotonic() - t0 > duration - 5:
                return  # leave the last seconds for the last restart to settle
            m = holder.get("m")
            if m is None or not m.procs:
                continue
            name = rng.choice(sorted(m.procs))
            pid = m.procs[name].proc.pid
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append({"at": round(time.monotonic() - t0, 2), "device": name, "pid": pid})
            except ProcessLookupError:
                pass

    tasks = [asyncio.ensure_future(sampler())]
    if kill_every > 0:
        tasks.append(asyncio.ensure_future(killer()))
    try:
        result = await run_machine(cfg, metrics_port=None, progress=False, console=console,
                                   on_start=lambda m: holder.setdefault("m", m))
    finally:
        for t in tasks:
            t.cancel()
    end = time.monotonic() - t0
    warm_until = max(2.0, duration * warmup)
    judged = [s.judge(warm_until, end, rss_slack, rss_slack_bytes) for s in series.values()]
    errors = sum(w["errors"] for w in result["workloads"])
    verified = [w["verified"] for w in result["workloads"] if w["verified"] is not None]
    leaks_ok = all(j.get("ok", True) for j in judged) and any(j.get("judged") for j in judged)
    return {
        "benchmark": "soak", "minutes": minutes, "duration_s": round(end, 1), "warmup_s": round(warm_until, 1),
        "kill_every_s": kill_every or None, "kills": kills, "restarts": result["restarts"],
        "errors": errors, "verified": all(verified) if verified else None,
        "processes": judged, "workloads": result["workloads"], "net": result["net"],
        "ok": bool(leaks_ok and errors == 0 and all(verified) and len(result["restarts"]) == len(kills)),
    }
