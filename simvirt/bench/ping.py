"""``simvirt bench ping``: ICMP echo from the simvirt guest to 10.0.2.2.

The guest driver, a vhost-user-net device process and its responder peer;
each ping is a full round trip through both virtqueues, eventfds and the
device process. The eventfd round-trip floor is measured in the same run.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Optional

from simvirt.bench.eventfd_rtt import eventfd_rtt
from simvirt.bench.procs import DeviceProcess, pin_apart, unpin
from simvirt.bench.stats import percentiles_us
from simvirt.drivers.net import VirtioNetDriver
from simvirt.drivers.netstack import GuestStack
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.net.packets import ip_bytes


async def run_ping_bench(connect: Optional[str], count: int, interval: float = 0.0, poll_us: float = 50.0, *,
                         busy_poll_us: float = 1000.0, device_poll_us: float = 200.0, pin: bool = True) -> dict:
    """Ping round trips; ``busy_poll_us`` > 0 spins for each reply, ``device_poll_us``
    is the started device's ``--poll-us``.

    ``pin`` puts the driver (this process) and the started device on
    different CPUs, as a latency-tuned setup would (DPDK lcores, vhost
    worker affinity): two busy-polling processes left to the scheduler are
    often woken on one CPU (wake-affine), where each spins against the other.
    """
    dev = None
    pinned = None
    if connect is None:
        dev = DeviceProcess("net", ["--poll-us", str(device_poll_us)])
        sock = dev.wait_ready()
        if pin:
            pinned = pin_apart(dev.proc.pid)
    else:
        sock = connect
    ram = 64 << 20
    mem = GuestMemory.create_shared(ram)
    drv = VirtioNetDriver(VhostUserTransport(sock, mem, PageAllocator(0, ram), device_label="net0"), poll_us=poll_us)
    try:
        drv.probe(asyncio.get_running_loop())
        stack = GuestStack(drv)
        gw = ip_bytes("10.0.2.2")
        await stack.resolve(gw)
        warm_until = time.monotonic() + 0.5
        i = 0
        while time.monotonic() < warm_until or i < 10:  # warm-up: caches, first wake-ups, CPU placement
            await stack.ping(gw, (60000 + i) & 0xFFFF, busy_poll_us=busy_poll_us)
            i += 1
        rtts = []
        lost = 0
        handles = [h for h in (drv.rx, drv.tx) if h is not None]
        before = [(h.kicks, h.interrupts) for h in handles]
        for seq in range(count):
            rtt = await stack.ping(gw, seq, busy_poll_us=busy_poll_us)
            if rtt is None:
                lost += 1
            else:
                rtts.append(rtt)
            if interval:
                await asyncio.sleep(interval)
        kicks = sum(h.kicks - b[0] for h, b in zip(handles, before))
        irqs = sum(h.interrupts - b[1] for h, b in zip(handles, before))
        floor = eventfd_rtt(max(500, count), cpus=pinned[1] if pinned else None)
        lat = percentiles_us(rtts)
        return {
            "benchmark": "ping",
            "target": "10.0.2.2",
            "count": count,
            "received": len(rtts),
            "lost": lost,
            "rtt_us": lat,
            "eventfd_rtt_us": floor,
            "ratio_p50_to_eventfd_p50": round(lat["p50"] / floor["p50"], 3) if floor["p50"] else None,
            # What each ping paid in notifications (the driver's counts, both rings):
            # a busy-polled ping against a polling device pays none, an
            # interrupt-driven one pays a kick and an interrupt, like the floor.
            "per_ping": {"kicks": round(kicks / count, 3), "interrupts": round(irqs / count, 3)},
            "driver_busy_poll_us": busy_poll_us,
            "device_poll_us": device_poll_us if connect is None else None,
            "pinned_cpus": pinned[1] if pinned else None,
        }
    finally:
        unpin(pinned)
        drv.close()
        mem.close()
        if dev is not None:
            dev.stop()
