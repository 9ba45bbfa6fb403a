#!/usr/bin/env python3
"""Where a ping's time goes inside the net device: one ICMP echo per call, in-process.

The device logic (``NetDevice.process_queue`` on the transmit ring, the
responder's echo, the reply placed in a receive buffer) runs over rings in a
bytearray, with no other process and no eventfd, so what it prints is the
Python cost per echo of each stage (wrapped with perf_counter_ns, which adds
about 0.1 µs per stage). Run from the repository root:

    .venv/bin/python tools/net-echo-profile.py [COUNT]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "devices" / "net")]

from test_net_device import GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, HDR, R, W, Rig  # noqa: E402

from simvirt.devices.net import device as nd  # noqa: E402
from simvirt.devices.net.peers import ResponderPeer  # noqa: E402
from simvirt.net import packets as pk, responder as rsp, spec as ns  # noqa: E402
from simvirt.virtio.spec import bit  # noqa: E402


def main(count: int) -> None:
    rig = Rig(bit(ns.VIRTIO_NET_F_CSUM) | bit(ns.VIRTIO_NET_F_GUEST_CSUM) | bit(ns.VIRTIO_NET_F_MRG_RXBUF))
    rig.dev.peer = ResponderPeer(rig.dev, None)
    frame = bytes(HDR) + pk.icmp_echo_frame(GUEST_MAC, GW_MAC, GUEST_IP, GW_IP, 8, 0x5356, 1, b"simvirt-ping" * 4)
    txq = rig.queues[1]
    tx_gpa, rx_gpa = rig.buf(frame), rig.alloc.alloc(2048)
    pc = time.perf_counter_ns
    acc: dict[str, int] = {}

    def timed(owner: type, name: str, label: str) -> None:
        f = getattr(owner, name)

        def wrapper(*a, **k):
            t = pc()
            try:
                return f(*a, **k)
            finally:
                acc[label] = acc.get(label, 0) + pc() - t
        setattr(owner, name, wrapper)

    timed(rsp.Responder, "_fast_echo", "answer the echo (responder fast path)")
    timed(ResponderPeer, "send", "peer: answer + deliver the reply")
    timed(nd.NetDevice, "_place", "place the reply in a receive buffer")

    def run(n: int) -> None:
        for _ in range(n):
            rig.next_desc = [0, 0, 0]
            rig.post(0, [(rx_gpa, 2048, W)])
            rig.post(1, [(tx_gpa, len(frame), R)])
            t = pc()
            rig.dev.process_queue(1, txq, rig.stats)
            acc["total: process_queue on the tx ring"] = acc.get("total: process_queue on the tx ring", 0) + pc() - t

    run(count // 5)       # warm-up
    acc.clear()
    run(count)
    for label, ns_total in acc.items():
        print(f"{ns_total / count / 1000:7.2f} µs  {label}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
