"""A real Linux guest's virtio_net driver (via QEMU's vhost-user netdev) on `simvirt device net`."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import require_tool

from .linux_guest import run_guest

pytestmark = pytest.mark.interop


@pytest.fixture
def net_device(tmp_path):
    procs = []

    def start(*extra: str) -> str:
        sock = str(tmp_path / f"net{len(procs)}.sock")
        log = open(tmp_path / f"net{len(procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "simvirt", "device", "net", "--socket", sock, *extra],
                             stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert p.poll() is None, (tmp_path / f"net{len(procs) - 1}.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return sock

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def _netdev_args(sock: str) -> list[str]:
    # QEMU 7.2 under TCG crashes with MSI-X on vhost-user virtio-net-pci: vectors=0 (INTx).
    return ["-chardev", f"socket,id=c1,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c1",
            "-device", "virtio-net-pci,netdev=n0,vectors=0"]


GUEST_NET_UP = """
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
"""


def test_linux_guest_pings_responder_20_of_20(net_device, tmp_path):
    sock = net_device()
    r = run_guest(GUEST_NET_UP + "ping -c 20 -i 0.2 -W 2 10.0.2.2\n", _netdev_args(sock), timeout=150)
    assert r.rc == 0, r.describe()
    assert "20 packets transmitted, 20 packets received, 0% packet loss" in r.output, r.describe()


def test_tcpdump_reads_pcap_of_the_icmp_exchange(net_device, tmp_path):
    tcpdump = require_tool("tcpdump")
    pcap = tmp_path / "guest.pcap"
    sock = net_device("--pcap", str(pcap))
    r = run_guest(GUEST_NET_UP + "ping -c 3 -W 2 10.0.2.2\n", _netdev_args(sock), timeout=150)
    assert r.rc == 0, r.describe()
    time.sleep(0.5)
    out = subprocess.run([tcpdump, "-nn", "-r", str(pcap)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    requests = [line for line in lines if "10.0.2.15 > 10.0.2.2: ICMP echo request" in line]
    replies = [line for line in lines if "10.0.2.2 > 10.0.2.15: ICMP echo reply" in line]
    assert len(requests) == 3 and len(replies) == 3, out.stdout
    assert any("ARP, Request who-has 10.0.2.2" in line for line in lines), out.stdout
    assert any("ARP, Reply 10.0.2.2 is-at 52:55:0a:00:02:02" in line for line in lines), out.stdout


def test_two_linux_guests_ping_each_other_through_a_switch(tmp_path):
    import threading

    env = dict(os.environ, SIMVIRT_RUNTIME_DIR=str(tmp_path))
    socks = [str(tmp_path / "g0.sock"), str(tmp_path / "g1.sock")]
    sw = subprocess.Popen([sys.executable, "-m", "simvirt", "device", "net", "--backend", "switch:lan",
                           "--socket", socks[0], "--socket", socks[1]], env=env,
                          stdout=open(tmp_path / "switch.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not all(os.path.exists(s) for s in socks):
            assert sw.poll() is None and time.monotonic() < deadline, (tmp_path / "switch.log").read_text()
            time.sleep(0.05)
        results: dict[int, object] = {}

        def guest(i: int) -> None:
            me, other = f"10.0.2.{15 + i}", f"10.0.2.{16 - i}"
            script = f"""
ip link set eth0 up
ip addr add {me}/24 dev eth0
n=0
until ping -c 1 -W 1 {other} >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 90 ] && break; done
ping -c 20 -i 0.3 {other}
rc=$?
sleep 5  # stay up until the other guest has its 20 replies too
exit $rc
"""
            args = ["-chardev", f"socket,id=c1,path={socks[i]}", "-netdev", "vhost-user,id=n0,chardev=c1",
                    "-device", f"virtio-net-pci,netdev=n0,vectors=0,mac=52:54:00:00:00:{10 + i:02x}"]
            results[i] = run_guest(script, args, timeout=180)

        threads = [threading.Thread(target=guest, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            r = results[i]
            assert "20 packets transmitted, 20 packets received" in r.output, r.describe()  # type: ignore[attr-defined]
    finally:
        sw.terminate()
        sw.wait(10)


def test_linux_guest_on_qemu_netdev_stream_pings_a_simvirt_guest(tmp_path):
    """QEMU's own `-netdev stream` on one side, `simvirt device net --backend stream:` on the other."""
    import asyncio
    import socket
    import threading

    from simvirt.drivers.net import VirtioNetDriver
    from simvirt.drivers.netstack import GuestStack
    from simvirt.drivers.transport import VhostUserTransport
    from simvirt.memory import GuestMemory, PageAllocator

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = str(tmp_path / "stream.sock")
    dev = subprocess.Popen([sys.executable, "-m", "simvirt", "device", "net", "--socket", sock,
                            "--backend", f"stream:127.0.0.1:{port}"], stdout=open(tmp_path / "dev.log", "wb"),
                           stderr=subprocess.STDOUT)
    stop = threading.Event()
    answered: list[int] = []

    def simvirt_guest() -> None:
        async def main() -> None:
            mem = GuestMemory.create_shared(32 << 20)
            drv = VirtioNetDriver(VhostUserTransport(sock, mem, PageAllocator(0, 32 << 20)))
            drv.probe(asyncio.get_running_loop())
            stack = GuestStack(drv, "10.0.2.15")
            try:
                while not stop.is_set():
                    await asyncio.sleep(0.05)
                answered.append(drv.rx_frames)
            finally:
                drv.close()
                mem.close()
            del stack

        asyncio.run(main())

    t = threading.Thread(target=simvirt_guest)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert dev.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        t.start()
        script = GUEST_NET_UP.replace("10.0.2.15", "10.0.2.16") + """
n=0
until ping -c 1 -W 1 10.0.2.15 >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 60 ] && break; done
ping -c 10 -i 0.2 10.0.2.15
"""
        r = run_guest(script, ["-netdev", f"stream,id=n0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                               "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:20"], timeout=150)
        assert "10 packets transmitted, 10 packets received" in r.output, r.describe()
    finally:
        stop.set()
        if t.is_alive():
            t.join(10)
        dev.terminate()
        dev.wait(10)
    assert answered and answered[0] >= 10
