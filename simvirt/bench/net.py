"""``simvirt bench net``: frame throughput through the simvirt guest net driver.

tx: the guest sends UDP frames to the responder's discard port (9) as fast
as transmit slots free up; the device completes checksums, hands frames to
the responder, which counts them. rx: the device's responder streams UDP
frames into every receive buffer the guest posts (``--rx-stream``). Rates
are counted by the receiving side, drops are what the device counted.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from simvirt.bench.procs import DeviceProcess, pin_apart, unpin
from simvirt.drivers.net import VirtioNetDriver
from simvirt.drivers.netstack import GuestStack
from simvirt.drivers.transport import VhostUserTransport
from simvirt.bench.procs import free_port
from simvirt.metrics import scrape
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.net import packets as pk
from simvirt.net import spec as ns


async def run_net_bench(direction: str, frame_size: int, runtime: float, connect: Optional[str] = None,
                        pin: bool = True, rx_buf: int = 0) -> dict:
    """One direction's frame rate; ``pin`` puts driver and started device on different CPUs."""
    if direction not in ("tx", "rx"):
        raise ValueError("--direction must be tx or rx")
    if not 64 <= frame_size <= 65549:
        raise ValueError("--frame-size must be 64..65549 bytes (above 1514 the link MTU grows to fit: jumbo frames)")
    port = free_port()
    mtu = max(1500, frame_size - 14)
    args = ["--metrics-port", str(port), "--poll-us", "50", "--mtu", str(mtu)]
    if direction == "rx":
        args += ["--rx-stream", str(frame_size)]
    dev = None
    pinned = None
    if connect is None:
        dev = DeviceProcess("net", args)
        sock = dev.wait_ready()
        if pin:
            pinned = pin_apart(dev.proc.pid)
    else:
        sock = connect
    ram = 256 << 20
    mem = GuestMemory.create_shared(ram)
    drv = VirtioNetDriver(VhostUserTransport(sock, mem, PageAllocator(0, ram), device_label="net0"), poll_us=50,
                          tx_buf=max(2048, -(-(frame_size + 12) // 4096) * 4096),
                          rx_buf=rx_buf or max(4096, -(-(frame_size + 12) // 4096) * 4096))
    loop = asyncio.get_running_loop()
    try:
        drv.probe(loop)
        stack = GuestStack(drv)
        gw = pk.ip_bytes("10.0.2.2")
        received = 0
        rx_bytes = 0
        if direction == "tx":
            mac = await stack.resolve(gw)
            payload = bytes(frame_size - 42)
            if drv.transport.has(ns.VIRTIO_NET_F_CSUM):
                # Checksum offload, as a Linux guest does for every UDP/TCP frame once
                # VIRTIO_NET_F_CSUM is negotiated: the field holds the pseudo-header sum.
                frame = pk.udp_frame(drv.mac, mac, stack.ip, gw, 40000, 9, payload, checksum="partial")
                hdr = ns.VirtioNetHdr(flags=ns.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6).pack()
            else:
                frame = pk.udp_frame(drv.mac, mac, stack.ip, gw, 40000, 9, payload)
                hdr = None
            sent = 0
            t0 = time.perf_counter()
            deadline = t0 + runtime
            while time.perf_counter() < deadline:
                burst = 0
                while burst < 64 and drv.try_send(frame, hdr, publish=False):
                    burst += 1
                if burst:
                    drv.tx.publish()  # type: ignore[union-attr]
                    sent += burst
                else:
                    await asyncio.sleep(0)
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0.3)
            counted = sent
            drops = 0.0
            if dev is not None:
                # Count what the device really handed to its peer, not what we queued.
                counted = int(scrape(port, "simvirt_requests_total", device="net", op="tx"))
                drops = scrape(port, "simvirt_errors_total", device="net")
            return _result("tx", frame_size, counted, counted * frame_size, elapsed, drops, sent=sent,
                           pinned_cpus=pinned[1] if pinned else None)
        else:
            def on_frame(frame: bytes) -> None:
                nonlocal received, rx_bytes
                received += 1
                rx_bytes += len(frame)

            def on_view(view: memoryview) -> None:
                nonlocal received, rx_bytes
                received += 1
                rx_bytes += len(view)

            drv.on_frame = on_frame
            drv.on_frame_view = on_view  # count in place, as a zero-copy consumer would
            await asyncio.sleep(0.2)  # let the stream start
            r0, b0 = received, rx_bytes
            t0 = time.perf_counter()
            await asyncio.sleep(runtime)
            elapsed = time.perf_counter() - t0
            drops = scrape(port, "simvirt_errors_total", device="net") if dev is not None else 0.0
            return _result("rx", frame_size, received - r0, rx_bytes - b0, elapsed, drops,
                           pinned_cpus=pinned[1] if pinned else None, rx_buf=drv.rx_buf or 4096)
    finally:
        unpin(pinned)
        drv.close()
        mem.close()
        if dev is not None:
            dev.stop()


def _result(direction: str, frame_size: int, frames: int, nbytes: int, elapsed: float, drops: float, **extra) -> dict:
    return {
        "benchmark": "net",
        "direction": direction,
        "frame_size": frame_size,
        "runtime_s": round(elapsed, 3),
        "frames": frames,
        "pps": round(frames / elapsed, 1),
        "gbps": round(nbytes * 8 / elapsed / 1e9, 4),
        "drops": int(drops),
        **extra,
    }
