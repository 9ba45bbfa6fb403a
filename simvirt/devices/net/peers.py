"""Peers of the virtio-net device: what sits on the other end of the wire."""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from simvirt.devices.net.device import NetDevice
from simvirt.net.pcap import PcapWriter
from simvirt.net.responder import Responder, UdpStream

log = logging.getLogger(__name__)


class ResponderPeer:
    """QEMU-user-networking-like gateway at 10.0.2.2 (ARP, ICMP echo, UDP echo/discard).

    Replies are delivered on the next loop turn, never from inside the
    transmit handler, so a reply's receive buffers can come from the same
    kick's batch of refills.
    """

    accepts_offload = False

    def __init__(self, device: NetDevice, loop: asyncio.AbstractEventLoop) -> None:
        self.device = device
        self.loop = loop
        self.responder = Responder()
        self._pending: list[bytes] = []
        self._stream: Optional[UdpStream] = None
        self._stream_task: Optional[asyncio.Task] = None

    def send(self, frames: list[bytes]) -> None:
        out = self._pending
        schedule = not out
        for f in frames:
            out.extend(self.responder.receive(f))
        if out and schedule:
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        self.device.deliver(frames)

    def start_stream(self, frame_size: int, port: int = 5001) -> None:
        """Stream UDP frames into the guest as fast as it posts buffers (rx throughput)."""
        self._stream = UdpStream(frame_size, dst_mac=self.device.mac, dst_port=port)
        if self._stream_task is None:
            self._stream_task = self.loop.create_task(self._pump())

    def stop_stream(self) -> None:
        self._stream = None
        if self._stream_task is not None:
            self._stream_task.cancel()
            self._stream_task = None

    async def _pump(self) -> None:
        dev = self.device
        while self._stream is not None:
            q = dev.rx_queues.get(0)
            if q is None:
                await asyncio.sleep(0.01)  # no guest (yet)
                continue
            room = q.pending()
            if room and not dev.backlog:
                dev.deliver(self._stream.take(min(room, 256)))
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.0001)


class PcapPeer:
    """Wraps a peer and the device's receive path to capture every frame."""

    def __init__(self, inner, device: NetDevice, path: str) -> None:
        self.inner = inner
        self.accepts_offload = False
        self.writer = PcapWriter.open(path)
        orig = device.deliver

        def deliver(frames: list[bytes], pair: int = 0) -> int:
            if frames:
                self.writer.write_many(frames)
                self.writer.flush()
            return orig(frames, pair)

        device.deliver = deliver  # type: ignore[method-assign]

    def send(self, frames: list[bytes]) -> None:
        self.writer.write_many(frames)
        self.writer.flush()
        self.inner.send(frames)

    def close(self) -> None:
        self.writer.close()
