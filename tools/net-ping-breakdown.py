#!/usr/bin/env python3
"""Where a ping's time goes across the two processes: per-stage p50/p90 of real round trips.

Runs ``simvirt device net`` (responder) in a child whose server is wrapped to
stamp the kick wake-up and the call eventfd write, and a guest driver here
that stamps the request, the kick write and the interrupt. Both sides read
CLOCK_MONOTONIC (``time.perf_counter_ns``), so stamps compare across
processes; the child writes its stamps into a shared file. Each wrapper adds
well under a microsecond. Run from the repository root:

    .venv/bin/python tools/net-ping-breakdown.py [--count N] [--busy-poll-us US]
                                                 [--device-poll-us US] [--pin]

The defaults are the fully interrupt-driven case (no polling on either side,
no pinning), the one where notifications and wake-ups show.
"""
from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SLOTS = 4  # per ping, in the child: kick wake-up, call write start, call write end
MAX_PINGS = 200_000


def _stamps(path: str) -> memoryview:
    fd = os.open(path, os.O_RDWR)
    try:
        return memoryview(mmap.mmap(fd, 8 * SLOTS * MAX_PINGS)).cast("q")
    finally:
        os.close(fd)


def device_main(stamp_path: str, argv: list[str]) -> int:
    """The device process: simvirt's CLI with the server's kick and notify wrapped."""
    from simvirt.cli import main
    from simvirt.vhost_user import server as srv

    arr = _stamps(stamp_path)
    pc = time.perf_counter_ns
    n = [0]
    on_kick, notify = srv.VhostUserServer._on_kick, srv.VhostUserServer._notify

    def stamped_kick(self, index: int, fd: int) -> None:
        if index == 1 and fd >= 0:  # the transmit ring's kick, not the look at start-up
            arr[n[0] * SLOTS] = pc()
        on_kick(self, index, fd)

    def stamped_notify(self, vr) -> None:
        if vr.index != 0:
            return notify(self, vr)
        i = n[0]
        arr[i * SLOTS + 1] = pc()
        notify(self, vr)
        arr[i * SLOTS + 2] = pc()
        n[0] = i + 1

    srv.VhostUserServer._on_kick = stamped_kick
    srv.VhostUserServer._notify = stamped_notify
    return main(argv)


async def driver_main(sock: str, stamp_path: str, count: int, busy_poll_us: float) -> list[tuple[int, ...]]:
    from simvirt.drivers import net as dn, transport as tr
    from simvirt.drivers.netstack import GuestStack
    from simvirt.memory import GuestMemory, PageAllocator
    from simvirt.net.packets import ip_bytes

    pc = time.perf_counter_ns
    rec: dict[str, list[int]] = {"pre": [], "kick": [], "irq": []}
    rx_complete, publish = dn.VirtioNetDriver._rx_complete, tr.DriverQueueHandle.publish

    def stamped_rx(self) -> None:
        rec["irq"].append(pc())
        rx_complete(self)

    def stamped_publish(self) -> None:
        if self.index == 1:
            rec["pre"].append(pc())
            publish(self)
            rec["kick"].append(pc())
        else:
            publish(self)

    dn.VirtioNetDriver._rx_complete = stamped_rx
    tr.DriverQueueHandle.publish = stamped_publish
    ram = 64 << 20
    mem = GuestMemory.create_shared(ram)
    drv = dn.VirtioNetDriver(tr.VhostUserTransport(sock, mem, PageAllocator(0, ram), device_label="net0"))
    try:
        drv.probe(asyncio.get_running_loop())
        stack = GuestStack(drv)
        gw = ip_bytes("10.0.2.2")
        await stack.resolve(gw)
        for i in range(300):  # warm-up
            await stack.ping(gw, (60000 + i) & 0xFFFF, busy_poll_us=busy_poll_us)
        await asyncio.sleep(0.05)
        arr = _stamps(stamp_path)
        base = 0
        while arr[base * SLOTS + 2]:
            base += 1
        rows = []
        for seq in range(count):
            k0, i0 = len(rec["pre"]), len(rec["irq"])
            rtt = await stack.ping(gw, seq, busy_poll_us=busy_poll_us)
            if rtt is None:
                continue  # lost: the device stamped nothing for it either
            got = len(rec["irq"]) > i0
            rows.append((base + len(rows), rec["pre"][k0], rec["kick"][k0], rec["irq"][i0] if got else 0, rtt))
        await asyncio.sleep(0.05)
        out = []
        for i, pre, kick, irq, rtt in rows:
            wake, call0, call1 = arr[i * SLOTS], arr[i * SLOTS + 1], arr[i * SLOTS + 2]
            if not (wake and call1 and irq):
                continue  # a polled ping: no kick or no interrupt to time
            out.append((kick - pre, wake - kick, call0 - wake, call1 - call0, irq - call1, rtt))
        return out
    finally:
        drv.close()
        mem.close()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--device":
        return device_main(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--busy-poll-us", type=float, default=0.0)
    ap.add_argument("--device-poll-us", type=float, default=0.0)
    ap.add_argument("--pin", action="store_true", help="driver and device on different CPUs")
    a = ap.parse_args()
    if a.count > MAX_PINGS - 1000:
        ap.error(f"--count is at most {MAX_PINGS - 1000}")
    from simvirt.bench.procs import pin_apart, unpin
    from simvirt.devices.runner import install_uvloop

    tmp = tempfile.mkdtemp(prefix="simvirt-breakdown-")
    stamp_path = os.path.join(tmp, "stamps")
    with open(stamp_path, "wb") as f:
        f.truncate(8 * SLOTS * MAX_PINGS)
    sock = os.path.join(tmp, "net.sock")
    dev = subprocess.Popen([sys.executable, __file__, "--device", stamp_path, "device", "net", "--socket", sock,
                            "--poll-us", str(a.device_poll_us)])
    pinned = None
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if dev.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the device did not start")
            time.sleep(0.02)
        if a.pin:
            pinned = pin_apart(dev.pid)
        install_uvloop()
        rows = asyncio.run(driver_main(sock, stamp_path, a.count, a.busy_poll_us))
    finally:
        unpin(pinned)
        dev.terminate()
        dev.wait(10)
    if not rows:
        print("no ping paid both a kick and an interrupt (a polling side took them): nothing to break down")
        return 1
    names = ("driver: kick eventfd write", "device: wake-up after the kick", "device: take, answer, place the reply",
             "device: call eventfd write", "driver: wake-up after the call", "round trip (as bench ping measures it)")
    print(f"{len(rows)} pings with a kick and an interrupt")
    for j, name in enumerate(names):
        vals = sorted(r[j] for r in rows)
        print(f"  {name:40s} p50 {vals[len(vals) // 2] / 1000:8.2f} µs   p90 {vals[int(len(vals) * 0.9)] / 1000:8.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
