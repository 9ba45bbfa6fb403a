"""Peers of the virtio-net device: what sits on the other end of the wire."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from simvirt.devices.net.device import NetDevice
from simvirt.net.responder import Responder, UdpStream

log = logging.getLogger(__name__)


class ResponderPeer:
    """QEMU-user-networking-like gateway at 10.0.2.2 (ARP, ICMP echo, UDP echo/discard).

    Replies go to the guest at once, from inside the transmit batch that
    carried the requests (before the device busy-polls its transmit ring
    again), because every microsecond here is ping latency.  Replies that
    find no receive buffer wait in the device's backlog for the next refill.
    """

    accepts_offload = False
    accepts_partial_csum = True  # a local endpoint: see Responder.receive

    def __init__(self, device: NetDevice, loop: asyncio.AbstractEventLoop) -> None:
        self.device = device
        self.loop = loop
        self.responder = Responder()
        self._stream: Optional[UdpStream] = None
        self._stream_task: Optional[asyncio.Task] = None
        self._rate: Optional[float] = None  # frames per second, None = as fast as buffers allow
        self._paced_t0 = 0.0
        self._paced_sent = 0
        self._stream_port = 0

    def send(self, frames: list[bytes]) -> None:
        receive = self.responder.receive
        out: list[bytes] = []
        for f in frames:
            out += receive(f)
        if out:
            self.device.deliver(out, self.device.tx_pair)

    def start_stream(self, frame_size: int, port: int = 5001, rate_pps: Optional[float] = None) -> None:
        """Stream UDP frames into the guest as fast as it posts buffers (rx throughput),
        or at most ``rate_pps`` frames per second. Replaces a stream already running."""
        if rate_pps is not None and not rate_pps > 0:
            raise ValueError(f"rate_pps must be > 0, not {rate_pps}")
        if not 0 < port < 65536:
            raise ValueError(f"port must be 1..65535, not {port}")
        self._stream = UdpStream(frame_size, dst_mac=self.device.mac, dst_port=port)
        self._stream_port = port
        self._rate = rate_pps
        self._paced_t0 = time.monotonic()
        self._paced_sent = 0
        if self._stream_task is None:
            self._stream_task = self.loop.create_task(self._pump())

    def stop_stream(self) -> None:
        self._stream = None
        if self._stream_task is not None:
            self._stream_task.cancel()
            self._stream_task = None

    def stream_info(self) -> dict[str, Any]:
        st = self._stream
        if st is None:
            return {"running": False}
        return {"running": True, "frame_size": st.size, "port": self._stream_port, "rate_pps": self._rate,
                "frames": st.frames}

    def _allowance(self) -> int:
        """Frames the pacing lets out now (at most 5 ms worth at once after a stall)."""
        rate = self._rate
        assert rate is not None
        target = int((time.monotonic() - self._paced_t0) * rate) + 1
        burst = max(1, int(rate * 0.005))
        if target - self._paced_sent > burst:  # the guest had no buffers for a while: no catch-up flood
            self._paced_sent = target - burst
        return target - self._paced_sent

    async def _pump(self) -> None:
        dev = self.device
        while self._stream is not None:
            stream = self._stream
            q = dev.rx_queues.get(0)
            if q is None:
                await asyncio.sleep(0.01)  # no guest (yet)
                continue
            room = q.pending()
            if room and dev.backlog:
                dev.deliver([])  # buffers arrived without a kick reaching us: drain the backlog first
                await asyncio.sleep(0)
                continue
            # Frames an rx impairment holds are in flight: they will need those buffers.
            room -= dev.rx_held()
            if room > 0 and self._rate is not None:
                allowed = self._allowance()
                if allowed <= 0:
                    # The next frame is due when (now - t0) * rate reaches the frames sent.
                    due = self._paced_t0 + self._paced_sent / self._rate
                    await asyncio.sleep(max(0.0002, due - time.monotonic()))
                    continue
                room = min(room, allowed)
            if room > 0:
                before = stream.frames
                dev.deliver_stream(stream, min(room, 256))
                self._paced_sent += stream.frames - before
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.0001)


class TapPeer:
    """A Linux TAP interface: the host kernel is the peer (needs CAP_NET_ADMIN)."""

    accepts_offload = False
    TUNSETIFF = 0x400454CA
    IFF_TAP = 0x0002
    IFF_NO_PI = 0x1000

    def __init__(self, device: NetDevice, loop: asyncio.AbstractEventLoop, ifname: str) -> None:
        import fcntl
        import os
        import struct

        if not ifname or len(ifname) > 15:
            raise ValueError(f"invalid TAP interface name {ifname!r}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"cannot open /dev/net/tun for tap:{ifname}: {e.strerror}") from None
        try:
            fcntl.ioctl(fd, self.TUNSETIFF, struct.pack("16sH", ifname.encode(), self.IFF_TAP | self.IFF_NO_PI))
        except OSError as e:
            os.close(fd)
            hint = " (needs CAP_NET_ADMIN: run as root or grant the capability)" if e.errno in (1, 13) else ""
            raise OSError(e.errno, f"cannot create TAP interface {ifname}: {e.strerror}{hint}") from None
        self.fd = fd
        self.device = device
        self.loop = loop
        self.ifname = ifname
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        import os

        frames = []
        for _ in range(64):
            try:
                frames.append(os.read(self.fd, 65536))
            except BlockingIOError:
                break
        if frames:
            self.device.deliver(frames)

    def send(self, frames: list[bytes]) -> None:
        import os

        for f in frames:
            try:
                os.write(self.fd, f)
            except OSError:
                self.device._drop("tap_write_failed")

    def close(self) -> None:
        import os

        self.loop.remove_reader(self.fd)
        os.close(self.fd)


class StreamPeer:
    """QEMU's ``-netdev stream`` framing (4-byte big-endian length + frame) over TCP.

    ``stream:HOST:PORT`` connects to a listening peer (e.g. QEMU with
    ``-netdev stream,server=on,addr.type=inet,...``) and reconnects when it
    goes away, so a simvirt guest shares a LAN with real QEMU VMs.
    """

    accepts_offload = False

    def __init__(self, device: NetDevice, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        from simvirt.net.framing import StreamDeframer

        self.device = device
        self.loop = loop
        self.host = host
        self.port = port
        self.writer: Optional[asyncio.StreamWriter] = None
        self._deframer_cls = StreamDeframer
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as e:
                log.info("stream peer %s:%d: %s; retrying", self.host, self.port, e)
                await asyncio.sleep(0.5)
                continue
            log.info("stream peer %s:%d connected", self.host, self.port)
            self.writer = writer
            deframer = self._deframer_cls()
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    try:
                        frames = deframer.feed(data)
                    except ValueError as e:
                        self.device._drop("stream_bad_framing")
                        log.warning("stream peer: %s; reconnecting", e)
                        break
                    if frames:
                        self.device.deliver(frames)
            finally:
                self.writer = None
                writer.close()
            await asyncio.sleep(0.2)

    def send(self, frames: list[bytes]) -> None:
        from simvirt.net.framing import frames_for_stream

        if self.writer is None:
            self.device._drop("stream_not_connected", len(frames))
            return
        self.writer.write(frames_for_stream(frames))

    def close(self) -> None:
        self._task.cancel()


class DgramPeer(asyncio.DatagramProtocol):
    """QEMU's ``-netdev dgram``: one frame per UDP datagram, no prefix.

    ``dgram:LHOST:LPORT:RHOST:RPORT`` binds the local address and sends to
    the remote one (QEMU: ``local.type=inet,...,remote.type=inet,...``).
    """

    accepts_offload = False

    def __init__(self, device: NetDevice, loop: asyncio.AbstractEventLoop, local: tuple[str, int],
                 remote: tuple[str, int]) -> None:
        self.device = device
        self.remote = remote
        self.transport: Optional[asyncio.DatagramTransport] = None
        loop.create_task(loop.create_datagram_endpoint(lambda: self, local_addr=local))

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        self.device.deliver([data])

    def send(self, frames: list[bytes]) -> None:
        if self.transport is None:
            self.device._drop("dgram_not_ready", len(frames))
            return
        for f in frames:
            self.transport.sendto(f, self.remote)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def parse_backend(spec: str) -> tuple[str, list[str]]:
    """``responder`` | ``tap:IFNAME`` | ``stream:HOST:PORT`` | ``dgram:LHOST:LPORT:RHOST:RPORT`` | ``switch:NAME``."""
    kind, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []
    want = {"responder": 0, "tap": 1, "stream": 2, "dgram": 4, "switch": 1}
    if kind not in want:
        raise ValueError(f"unknown net backend {spec!r} (responder, switch:NAME, tap:IFNAME, stream:HOST:PORT, "
                         "dgram:LHOST:LPORT:RHOST:RPORT)")
    if len(args) != want[kind] or any(not a for a in args):
        raise ValueError(f"backend {spec!r}: {kind} takes {want[kind]} ':'-separated field(s)")
    for i in ((1,) if kind == "stream" else (1, 3) if kind == "dgram" else ()):
        if not args[i].isdigit() or not 0 < int(args[i]) < 65536:
            raise ValueError(f"backend {spec!r}: bad port {args[i]!r}")
    return kind, args
