"""net impairments and the responder's stream on a real ``simvirt device net --control`` process.

The simvirt guest (driver + GuestStack) pings the responder: a 2 ms delay
on either direction raises every round trip by at least 2 ms, loss 1.0
loses every ping until cleared. The ``stream`` command sends UDP into the
guest at the rate asked for and stops. Bad commands are refused and change
nothing; ``stream`` and ``--control`` are refused where they cannot work.
Sans-IO checks cover what the process tests cannot see: frames the guest
sends are copied out of its RAM before their descriptors go back, and the
held count read by ``info`` and the metrics is what the lanes hold.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client import generate_latest

from simvirt import metrics
from simvirt.bench.procs import DeviceProcess
from simvirt.control import arequest, request
from simvirt.devices.net.device import NetDevice
from simvirt.drivers.net import VirtioNetDriver
from simvirt.drivers.netstack import GuestStack
from simvirt.drivers.transport import VhostUserTransport
from simvirt.impair.settings import NetSettings
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.metrics import QueueStats
from simvirt.net import packets as pk
from simvirt.net import spec as ns
from simvirt.virtio.spec import VIRTIO_F_VERSION_1, bit

from simvirt_testlib import MiB, R, RawRing, bytearray_memory

GW = pk.ip_bytes("10.0.2.2")


class Proc:
    """A net device process with a control socket."""

    def __init__(self, *args: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="simvirt-net-ctl-")
        self.control = os.path.join(self.dir, "net.ctl")
        self.log_path = os.path.join(self.dir, "device.log")
        self.dp = DeviceProcess("net", ["--control", self.control, *args], log_path=self.log_path)
        try:
            self.socket_path = self.dp.wait_ready()
            deadline = time.monotonic() + 10
            while not os.path.exists(self.control):
                assert time.monotonic() < deadline and self.dp.proc.poll() is None, self.log()
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        self.dp.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.dp.tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def device():
    d = Proc()
    yield d
    log = d.log()
    d.stop()
    assert "Traceback" not in log, log


@pytest.fixture
def dev(device):
    yield device
    assert request(device.control, {"cmd": "impair"}) == {"ok": True, "impair": {}}
    request(device.control, {"cmd": "stream", "stop": True})
    assert device.dp.proc.poll() is None, device.log()


def impair(d, **fields) -> None:
    r = request(d.control, {"cmd": "impair", **fields})
    assert r["ok"], r


def guest(d, fn):
    """Run ``await fn(stack)`` with a fresh simvirt guest on the device."""
    async def go():
        mem = GuestMemory.create_shared(32 * MiB)
        drv = VirtioNetDriver(VhostUserTransport(d.socket_path, mem, PageAllocator(0, 32 * MiB)))
        try:
            drv.probe(asyncio.get_running_loop())
            return await fn(GuestStack(drv))
        finally:
            drv.close()
            mem.close()
    return asyncio.run(go())


async def pings(stack: GuestStack, n: int, seq0: int = 0, timeout: float = 1.0) -> list:
    await stack.resolve(GW)
    return [await stack.ping(GW, seq0 + i, timeout=timeout) for i in range(n)]


@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_2ms_delay_raises_every_ping_by_2ms(dev, direction):
    async def fn(stack):
        base = await pings(stack, 20)
        impair(dev, delay=0.002, direction=direction)
        slow = await pings(stack, 20, 100)
        return base, slow
    base, slow = guest(dev, fn)
    assert None not in base and None not in slow
    assert min(slow) >= 2_000_000  # every frame is held 2 ms: no round trip can be shorter
    # Floors, not medians: a busy machine (tests run in parallel) moves medians by milliseconds,
    # while the fastest round trips of 20 stay put.
    raised = min(slow) - min(base)
    assert 1_900_000 <= raised < 5_000_000, (min(base), min(slow), statistics.median(base), statistics.median(slow))
    info = request(dev.control, {"cmd": "info"})
    assert info[direction]["delayed"] >= 20 and info["impair"]["direction"] == direction


def test_loss_1_loses_every_ping_then_clearing_restores_them(dev):
    before = request(dev.control, {"cmd": "info"})["tx"]["dropped"]

    async def fn(stack):
        await stack.resolve(GW)
        impair(dev, loss=1.0)
        lost = await pings(stack, 5, 0, timeout=0.2)
        impair(dev)
        back = await pings(stack, 5, 100)
        return lost, back
    lost, back = guest(dev, fn)
    assert lost == [None] * 5
    assert None not in back
    assert request(dev.control, {"cmd": "info"})["tx"]["dropped"] - before == 5


def test_stream_delivers_at_the_rate_asked_then_stops(dev):
    async def fn(stack):
        got = []
        stack.udp_handlers[5001] = lambda src, sport, payload: got.append(len(payload))
        r = await arequest(dev.control, {"cmd": "stream", "frame_size": 256, "port": 5001, "rate_pps": 2000})
        assert r["ok"] and r["stream"]["running"], r
        await asyncio.sleep(1.0)
        r = await arequest(dev.control, {"cmd": "stream", "stop": True})
        assert r["ok"] and not r["stream"]["running"], r
        n = len(got)
        await asyncio.sleep(0.2)
        return n, len(got), r["stream"]["frames"], set(got)
    n, later, sent, sizes = guest(dev, fn)
    assert 1500 <= n <= 2500, n
    assert later == n and sent >= n  # nothing after the stop
    assert sizes == {256 - 42}  # Ethernet + IPv4 + UDP headers


def test_stream_goes_through_an_rx_impairment(dev):
    impair(dev, direction="rx", rate=1_000_000)  # 1 Mbit/s: 100 frames of 1250 bytes per second

    async def fn(stack):
        got = []
        stack.udp_handlers[5001] = lambda src, sport, payload: got.append(time.monotonic())
        assert (await arequest(dev.control, {"cmd": "stream", "frame_size": 1250, "port": 5001}))["ok"]
        await asyncio.sleep(1.0)
        assert (await arequest(dev.control, {"cmd": "stream", "stop": True}))["ok"]
        return len(got)
    assert 80 <= guest(dev, fn) <= 120


def test_bad_commands_are_refused_and_change_nothing(dev):
    impair(dev, delay=0.001)
    for req, msg in [
        ({"cmd": "impair", "loss": 2}, "loss"),
        ({"cmd": "impair", "direction": "sideways"}, "direction"),
        ({"cmd": "impair", "rate": -5}, "rate"),
        ({"cmd": "impair", "latency": 0.1}, "unknown"),
        ({"cmd": "stream"}, "frame_size"),
        ({"cmd": "stream", "frame_size": 10}, "stream"),
        ({"cmd": "stream", "frame_size": 256, "port": 70000}, "port"),
        ({"cmd": "stream", "frame_size": 256, "rate_pps": "fast"}, "rate_pps"),
        ({"cmd": "balloon", "size": 1}, "unknown command"),
    ]:
        r = request(dev.control, req)
        assert r["ok"] is False and msg in r["error"], (req, r)
    info = request(dev.control, {"cmd": "info"})
    assert info["impair"]["delay"] == 0.001 and not info["stream"]["running"]
    assert None not in guest(dev, lambda stack: pings(stack, 3))


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stream_needs_the_responder_backend():
    d = Proc("--backend", f"dgram:127.0.0.1:{_free_udp_port()}:127.0.0.1:{_free_udp_port()}")
    try:
        r = request(d.control, {"cmd": "stream", "frame_size": 256})
        assert r["ok"] is False and "responder" in r["error"], r
        assert request(d.control, {"cmd": "impair", "loss": 0.5})["ok"]  # impairments work on any backend
    finally:
        d.stop()


def test_control_is_refused_with_the_switch_backend(tmp_path):
    out = subprocess.run([sys.executable, "-m", "simvirt", "device", "net", "--socket", str(tmp_path / "s.sock"),
                          "--backend", "switch:imptest", "--control", str(tmp_path / "c.ctl")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--control" in out.stderr and "switch" in out.stderr, out.stderr


# ---------------------------------------------------------------------------
# sans-IO: held transmit frames are copies, not views of guest RAM
# ---------------------------------------------------------------------------
class _Timer:
    spin_below = 0.0

    def __init__(self) -> None:
        self.pending = []

    def call_later(self, delay, cb):
        self.pending.append(cb)
        return self

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Capture:
    accepts_offload = False
    accepts_partial_csum = True
    borrows_frames = True  # would get views of guest RAM if the device did not copy

    def __init__(self) -> None:
        self.frames: list = []

    def send(self, frames) -> None:
        self.frames.extend(frames)


def test_held_tx_frames_are_copied_before_their_buffers_go_back():
    mem = bytearray_memory(4 * MiB)
    alloc = PageAllocator(0, 4 * MiB)
    dev = NetDevice(mac=pk.parse_mac("52:54:00:12:34:56"))
    dev.set_features(bit(VIRTIO_F_VERSION_1))
    peer = dev.peer = _Capture()
    timer = _Timer()
    now = [0.0]
    dev.set_impairment(NetSettings(delay=0.001), clock=lambda: now[0], timers=lambda: timer)
    ring = RawRing(mem, alloc, 16)
    q = ring.device_queue()
    frame = pk.pad_frame(pk.arp_frame(1, dev.mac, pk.ip_bytes("10.0.2.15"), bytes(6), GW))
    buf = alloc.alloc(4096)
    mem.write(buf, ns.VirtioNetHdr().pack() + frame)
    ring.push(ring.chain([(buf, ns.VIRTIO_NET_HDR_SIZE + len(frame), R)]))
    dev.process_queue(1, q, QueueStats("t", "net", "1"))
    assert ring.pop_used() == [(0, 0)] and peer.frames == []  # buffer back, frame held
    mem.write(buf, bytes(ns.VIRTIO_NET_HDR_SIZE + len(frame)))  # the guest reuses its buffer
    now[0] = 0.001
    timer.pending.pop()()
    assert peer.frames == [frame] and type(peer.frames[0]) is bytes


def test_the_held_count_is_what_the_lanes_hold():
    dev = NetDevice(mac=pk.parse_mac("52:54:00:12:34:57"), label="net-held")
    dev.set_features(bit(VIRTIO_F_VERSION_1))
    peer = dev.peer = _Capture()
    timers: list[_Timer] = []
    now = [0.0]

    def impair(**fields) -> None:
        dev.set_impairment(NetSettings(**fields), clock=lambda: now[0],
                           timers=lambda: timers.append(_Timer()) or timers[-1])

    def held() -> tuple[int, int, int, int]:
        """(tx + rx held per info, ImpairStats.held, the /metrics gauge, frames the lanes hold)."""
        info = dev.impair_info()
        scraped = metrics.sample_sum(generate_latest(metrics.REGISTRY).decode(), "simvirt_impaired_held",
                                     device=dev.label)
        lanes = sum(len(lane) for lane in dev.impairer.lanes.values()) if dev.impairer is not None else 0
        return info["tx"]["held"] + info["rx"]["held"], dev.impair_stats.held, int(scraped), lanes

    mem = bytearray_memory(4 * MiB)
    alloc = PageAllocator(0, 4 * MiB)
    ring = RawRing(mem, alloc, 16)
    frame = pk.pad_frame(pk.arp_frame(1, dev.mac, pk.ip_bytes("10.0.2.15"), bytes(6), GW))
    impair(delay=0.001, direction="both")
    for k in range(2):  # the guest transmits two frames
        buf = alloc.alloc(4096)
        mem.write(buf, ns.VirtioNetHdr().pack() + frame)
        ring.push(ring.chain([(buf, ns.VIRTIO_NET_HDR_SIZE + len(frame), R)], first=k))
    dev.process_queue(1, ring.device_queue(), QueueStats("t", "net-held", "1"))
    dev.deliver([frame] * 3)  # and the peer sends it three
    assert dev.impair_info()["rx"]["held"] == 3 and dev.impair_info()["tx"]["held"] == 2
    assert held() == (5, 5, 5, 5) and dev.rx_held() == 3
    now[0] = 0.001
    timers[0].pending.pop()()  # the tx lane's timer
    assert held() == (3, 3, 3, 3) and len(peer.frames) == 2
    impair(delay=0.002, direction="rx")  # rx frames keep their times; tx has nothing held
    assert held() == (3, 3, 3, 3)
    impair(delay=0.002, direction="tx")  # rx no longer impaired: its frames go now (to the backlog)
    assert held() == (0, 0, 0, 0) and len(dev.backlog) == 3
    dev.deliver([frame])
    assert held() == (0, 0, 0, 0) and len(dev.backlog) == 4  # not held: the rx direction is unimpaired
    impair(delay=0.002, direction="rx")
    dev.deliver([frame] * 2)
    assert held() == (2, 2, 2, 2)
    dev.reset()  # the receiving guest went away
    assert held() == (0, 0, 0, 0)
    dev.deliver([frame])
    dev.set_impairment(None)
    assert held() == (0, 0, 0, 0) and dev.impair_stats.holder is None
