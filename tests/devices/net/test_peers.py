"""Net peers other than the responder: dgram between two devices, TAP to the host kernel."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from simvirt.devices.net.peers import parse_backend
from simvirt.drivers.net import VirtioNetDriver
from simvirt.drivers.netstack import GuestStack
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.net.packets import ip_bytes


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(sock: str, backend: str, *prefix: str) -> subprocess.Popen:
    p = subprocess.Popen([*prefix, sys.executable, "-m", "simvirt", "device", "net", "--socket", sock,
                          "--backend", backend], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if p.poll() is not None:
            raise AssertionError(p.stdout.read().decode() if p.stdout else "device died")
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return p


def _guest(sock: str, ip: str, loop: asyncio.AbstractEventLoop) -> tuple[GuestStack, GuestMemory]:
    mem = GuestMemory.create_shared(32 << 20)
    drv = VirtioNetDriver(VhostUserTransport(sock, mem, PageAllocator(0, 32 << 20)))
    drv.probe(loop)
    return GuestStack(drv, ip), mem


@pytest.mark.parametrize("spec,err", [
    ("tap", "takes 1"), ("stream:h", "takes 2"), ("stream:h:99999", "bad port"), ("dgram:a:1:b", "takes 4"),
    ("wire:x", "unknown net backend"),
])
def test_backend_specs_are_validated(spec, err):
    with pytest.raises(ValueError, match=err):
        parse_backend(spec)


def test_two_simvirt_guests_over_dgram(tmp_path):
    pa, pb = _free_udp_port(), _free_udp_port()
    sa, sb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    da = _start(sa, f"dgram:127.0.0.1:{pa}:127.0.0.1:{pb}")
    db = _start(sb, f"dgram:127.0.0.1:{pb}:127.0.0.1:{pa}")
    try:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            a, ma = _guest(sa, "10.0.2.15", loop)
            b, mb = _guest(sb, "10.0.2.16", loop)
            try:
                rtts = [await a.ping(ip_bytes("10.0.2.16"), i) for i in range(10)]
                assert all(r is not None for r in rtts)
                assert await b.ping(ip_bytes("10.0.2.15"), 99) is not None
            finally:
                for s, m in ((a, ma), (b, mb)):
                    s.drv.close()
                    m.close()

        asyncio.run(main())
    finally:
        for d in (da, db):
            d.terminate()
            d.wait(10)


def test_tap_without_cap_net_admin_is_a_clear_error(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to drop the capability) and setpriv")
    out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", sys.executable, "-m", "simvirt",
                          "device", "net", "--socket", str(tmp_path / "t.sock"), "--backend", "tap:svnocap0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "CAP_NET_ADMIN" in out.stderr and "svnocap0" in out.stderr, out.stderr


def test_tap_peer_host_kernel_answers_pings(tmp_path):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("TAP test needs root and iproute2 under CI")
        pytest.skip("needs root and iproute2")
    ns = f"simvirt{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    sock = str(tmp_path / "tap.sock")
    dev = None
    try:
        dev = _start(sock, "tap:svtap0", "ip", "netns", "exec", ns)
        subprocess.run(["ip", "-n", ns, "link", "set", "svtap0", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.0.2.2/24", "dev", "svtap0"], check=True)

        async def main() -> None:
            g, m = _guest(sock, "10.0.2.15", asyncio.get_running_loop())
            try:
                assert all([await g.ping(ip_bytes("10.0.2.2"), i) for i in range(5)])
            finally:
                g.drv.close()
                m.close()

        asyncio.run(main())
    finally:
        if dev is not None:
            dev.terminate()
            dev.wait(10)
        subprocess.run(["ip", "netns", "del", ns])
