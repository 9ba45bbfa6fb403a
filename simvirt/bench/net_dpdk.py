"""``simvirt bench net-dpdk``: DPDK's virtio_user driving our device vs DPDK's own vhost backend.

Both runs use the same frontend (dpdk-testpmd, virtio_user PMD, txonly,
64-byte frames) in the same invocation; one sends into ``simvirt device
net``, the other into a second testpmd running DPDK's ``net_vhost0``
backend in rxonly mode. The receiving side counts. Reported, no target: a C
vhost backend on polling cores is the ceiling, not a peer.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from simvirt.bench.procs import DeviceProcess, free_port, wait_for_path
from simvirt.metrics import scrape


def _testpmd(vdev: str, mode: str, prefix: str) -> subprocess.Popen:
    testpmd = shutil.which("dpdk-testpmd")
    if testpmd is None:
        raise FileNotFoundError("dpdk-testpmd not found (Debian package dpdk)")
    return subprocess.Popen(
        ["stdbuf", "-oL", testpmd, "-l", "0,1", "--no-huge", "-m", "1024", "--no-pci", f"--file-prefix={prefix}",
         "--vdev", vdev, "--", "--no-mlockall", "--total-num-mbufs=4096", f"--forward-mode={mode}", "--txpkts=64", "-a"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    return out


def _last(pattern: str, out: str) -> int:
    m = re.findall(pattern, out)
    if not m:
        raise RuntimeError(f"testpmd printed no statistics:\n{out[-1500:]}")
    return int(m[-1])


def run_net_dpdk_bench(runtime: float) -> dict:
    tmp = tempfile.mkdtemp(prefix="simvirt-dpdk-")
    tag = str(os.getpid())
    # 1. virtio_user -> simvirt device net (responder discards what is not for it)
    sock = os.path.join(tmp, "simvirt.sock")
    port = free_port()
    dev = DeviceProcess("net", ["--metrics-port", str(port)], socket_path=sock)
    try:
        dev.wait_ready()
        fe = _testpmd(f"net_virtio_user0,path={sock},queues=1", "txonly", f"sa{tag}")
        time.sleep(runtime)
        _stop(fe)
        ours = scrape(port, "simvirt_requests_total", op="tx")
    finally:
        dev.stop()
    # 2. virtio_user -> DPDK net_vhost0 (rxonly)
    vsock = os.path.join(tmp, "vhost.sock")
    be = _testpmd(f"net_vhost0,iface={vsock},queues=1", "rxonly", f"vb{tag}")
    try:
        wait_for_path([vsock], be, 15.0)
        fe = _testpmd(f"net_virtio_user0,path={vsock},queues=1", "txonly", f"va{tag}")
        time.sleep(runtime)
        _stop(fe)
    finally:
        be_out = _stop(be)
    theirs = _last(r"RX-packets:\s+(\d+)", be_out)
    return {
        "benchmark": "net-dpdk",
        "frame_size": 64,
        "runtime_s": runtime,
        "simvirt_device_pps": round(ours / runtime, 1),
        "dpdk_vhost_pps": round(theirs / runtime, 1),
        "ratio_pps": round(ours / theirs, 4) if theirs else None,
    }
