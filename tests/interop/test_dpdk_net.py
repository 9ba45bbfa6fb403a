"""DPDK's virtio_user PMD (dpdk-testpmd) driving `simvirt device net`.

DPDK is an independent virtio-net driver implementation: if its txonly
stream lands in our device packet for packet, our vhost-user-net backend and
split rings speak the same protocol it does.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import require_tool

pytestmark = pytest.mark.interop


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


def test_testpmd_txonly_counts_match_device(tmp_path):
    testpmd = require_tool("dpdk-testpmd")
    sock = str(tmp_path / "net.sock")
    port = _free_port()
    dev = subprocess.Popen([sys.executable, "-m", "simvirt", "device", "net", "--socket", sock,
                            "--metrics-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert dev.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pmd = subprocess.Popen(
            ["stdbuf", "-oL", testpmd, "-l", "0,1", "--no-huge", "-m", "1024", "--no-pci",
             f"--file-prefix=simvirt{os.getpid()}", "--vdev", f"net_virtio_user0,path={sock},queues=1", "--",
             "--no-mlockall", "--total-num-mbufs=4096", "--forward-mode=txonly", "--txpkts=64", "-a"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(6)
        pmd.send_signal(signal.SIGINT)
        out, _ = pmd.communicate(timeout=30)
        m = re.findall(r"TX-packets:\s+(\d+)", out)
        assert m, out
        sent = int(m[-1])
        assert sent > 1000, out
        time.sleep(0.5)
        seen = _metric(port, "simvirt_requests_total", device="net", op="tx")
        assert seen == sent, f"testpmd sent {sent}, simvirt device counted {seen}\n{out[-2000:]}"
        # 64-byte frames to an unknown destination are counted by the responder, not errors of the device.
        assert _metric(port, "simvirt_errors_total", device="net", reason="tx_short_frame") == 0
    finally:
        dev.terminate()
        dev.wait(10)
