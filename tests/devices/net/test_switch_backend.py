"""`simvirt device net --backend switch:NAME`: guests on one L2 switch reach each other."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import msgpack  # noqa: F401  (the control socket speaks it; imported to fail early if missing)

from simvirt.control import request
from simvirt.drivers.net import VirtioNetDriver
from simvirt.drivers.netstack import GuestStack
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.net.packets import ip_bytes


def _wait(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        assert proc.poll() is None, "switch process died"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_two_simvirt_guests_ping_each_other_and_a_late_port_joins(tmp_path):
    env = dict(os.environ, SIMVIRT_RUNTIME_DIR=str(tmp_path))
    a, b, c = (str(tmp_path / f"{n}.sock") for n in "abc")
    sw = subprocess.Popen([sys.executable, "-m", "simvirt", "device", "net", "--backend", "switch:lan0",
                           "--socket", a, "--socket", b], env=env)
    try:
        _wait(b, sw)
        ctl = str(tmp_path / "switch-lan0.ctl")
        _wait(ctl, sw)
        # A later `simvirt device net --backend switch:lan0` hands its socket to the running switch.
        out = subprocess.run([sys.executable, "-m", "simvirt", "device", "net", "--backend", "switch:lan0",
                              "--socket", c], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "port 2" in out.stdout, out.stderr
        _wait(c, sw)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stacks = []
            mems = []
            for sock, ip in ((a, "10.0.2.15"), (b, "10.0.2.16"), (c, "10.0.2.17")):
                mem = GuestMemory.create_shared(32 << 20)
                mems.append(mem)
                drv = VirtioNetDriver(VhostUserTransport(sock, mem, PageAllocator(0, 32 << 20)))
                drv.probe(loop)
                stacks.append(GuestStack(drv, ip))
            try:
                for seq in range(10):
                    assert await stacks[0].ping(ip_bytes("10.0.2.16"), seq) is not None
                assert await stacks[2].ping(ip_bytes("10.0.2.15"), 1) is not None
                info = request(ctl, {"cmd": "info"})
                assert info["ok"] and len(info["ports"]) == 3
                # Every guest's MAC was learned on its own port.
                macs = {s.drv.mac.hex(":"): str(i) for i, s in enumerate(stacks)}
                assert {m: str(p) for m, p in info["fdb"].items()} == macs
                # Unicast between 0 and 1 did not reach 2 (it only saw the flooded ARP broadcasts).
                assert stacks[2].counters.get("rx_not_for_us", 0) <= 4
            finally:
                for s, m in zip(stacks, mems):
                    s.drv.close()
                    m.close()

        asyncio.run(main())
    finally:
        sw.terminate()
        sw.wait(10)
    assert not os.path.exists(str(tmp_path / "switch-lan0.ctl"))
