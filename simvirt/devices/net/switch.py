"""``--backend switch:NAME``: one process, many vhost-user-net ports, an L2 learning switch.

Every port is a full virtio-net device with its own vhost-user socket and its
own guest's RAM mapped into this one process, so a frame goes from the
sender's transmit buffers to the receiver's receive buffers inside one
process: one copy, straight from the sender's RAM into each receiver's.
The first ``simvirt device net --backend switch:NAME`` starts the switch;
later ones with the same NAME hand their socket to it over the switch's
control socket and exit.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Optional

from simvirt import metrics
from simvirt.control import ControlError, request, serve_control
from simvirt.devices.net.device import NetDevice
from simvirt.net.pcap import PcapWriter
from simvirt.devices.runner import install_uvloop
from simvirt.net.packets import parse_mac
from simvirt.net.switch import L2Switch
from simvirt.runtime import runtime_dir
from simvirt.vhost_user.server import VhostUserServer

log = logging.getLogger(__name__)


def control_path(name: str) -> str:
    """The switch's control socket, in the private runtime directory (simvirt/runtime.py)."""
    return os.path.join(runtime_dir(), f"switch-{name}.ctl")


class SwitchPort:
    """The peer of one port's device: hands transmitted frames to the switch.

    Frames arrive as views of the sender's RAM (``borrows_frames``) and each
    receiving port's device writes them straight into its guest's receive
    buffers: one copy per receiver.  A frame that has to wait for buffers is
    copied into that port's backlog before the sender gets its buffer back.
    """

    accepts_offload = False
    borrows_frames = True

    def __init__(self, hub: "SwitchHub", port: int) -> None:
        self.hub = hub
        self.port = port

    def send(self, frames: list[bytes]) -> None:
        self.hub.forward(self.port, frames)


class SwitchHub:
    def __init__(self, name: str, *, mtu: int = 1500, pcap: Optional[str] = None, vm: str = "standalone") -> None:
        self.name = name
        self.mtu = mtu
        self.vm = vm
        self.core = L2Switch(max_age=300.0)
        self.devices: dict[int, NetDevice] = {}
        self.servers: dict[int, VhostUserServer] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.sockets: dict[int, str] = {}
        self.pcap = pcap
        self._next = 0

    def add_port(self, socket_path: str, mac: Optional[str] = None) -> int:
        if socket_path in self.sockets.values():
            raise ControlError(f"{socket_path} is already a port of switch {self.name}")
        port = self._next
        self._next += 1
        # Locally administered, unique per port: the device's own MAC as seen in its config space.
        dev_mac = parse_mac(mac) if mac else bytes([0x52, 0x54, 0x00, 0x5A, (port >> 8) & 0xFF, port & 0xFF])
        dev = NetDevice(mac=dev_mac, mtu=self.mtu, vm=self.vm, label=f"{self.name}-p{port}")
        dev.promisc = True  # a switch port takes every frame the switch decides to send it
        dev.peer = SwitchPort(self, port)
        if self.pcap:
            dev.capture = PcapWriter.open(f"{self.pcap}.p{port}")
        loop = asyncio.get_running_loop()
        server = VhostUserServer(dev, socket_path, loop=loop, poll_us=20.0)
        server.listen()
        self.devices[port] = dev
        self.servers[port] = server
        self.sockets[port] = socket_path
        self.tasks[port] = loop.create_task(server.serve_forever())
        self.core.add_port(port)
        log.info("switch %s: port %d on %s", self.name, port, socket_path)
        return port

    def forward(self, in_port: int, frames: list[bytes]) -> None:
        now = time.monotonic()
        for frame in frames:
            for out in self.core.forward(in_port, frame, now):
                dev = self.devices.get(out)
                if dev is not None:
                    dev.deliver([frame])

    def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for dev in self.devices.values():
            if dev.capture is not None:
                dev.capture.close()
        for server in self.servers.values():
            server.close()

    async def control(self, req: dict) -> dict:
        cmd = req["cmd"]
        if cmd == "add-port":
            sock = req.get("socket")
            if not isinstance(sock, str):
                raise ControlError("add-port needs 'socket'")
            return {"port": self.add_port(sock, req.get("mac"))}
        if cmd == "info":
            return {"switch": self.name, "ports": {str(p): s for p, s in self.sockets.items()},
                    "fdb": {k.hex(":"): v[0] for k, v in self.core.fdb.items()},
                    "counters": dict(self.core.counters)}
        raise ControlError(f"unknown command {cmd!r} (add-port, info)")


def run_switch(name: str, sockets: list[str], *, mtu: int, pcap: Optional[str], metrics_port: Optional[int],
               metrics_addr: str, vm: str) -> int:
    ctl = control_path(name)
    if os.path.exists(ctl):
        try:
            for s in sockets:
                reply = request(ctl, {"cmd": "add-port", "socket": s}, timeout=5)
                if not reply.get("ok"):
                    raise ValueError(f"switch {name}: {reply.get('error')}")
                print(f"added {s} as port {reply['port']} of switch {name}")
            return 0
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(ctl)  # a stale socket of a switch that is gone: become the switch

    async def main() -> None:
        hub = SwitchHub(name, mtu=mtu, pcap=pcap, vm=vm)
        for s in sockets:
            hub.add_port(s)
        server = await serve_control(ctl, hub.control)
        metrics.serve(metrics_port, metrics_addr)
        metrics.mark_process(vm, f"switch-{name}")
        log.info("switch %s: control socket %s", name, ctl)
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        try:
            await stop
        finally:
            server.close()
            hub.close()
            try:
                os.unlink(ctl)
            except FileNotFoundError:
                pass

    install_uvloop()
    asyncio.run(main())
    return 0
