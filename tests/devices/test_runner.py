"""The device process framework: a device started by a process that dies hard goes with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_PARENT = r"""
import sys, time
from simvirt.bench.procs import DeviceProcess
d = DeviceProcess("blk", ["--memory", "1M"])
d.wait_ready()
print(d.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its reaper is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_device_exits_when_its_starter_is_sigkilled():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        device_pid = int(parent.stdout.readline())
        assert _alive(device_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(device_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(device_pid), "the device process outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()


def test_device_without_a_starter_to_watch_keeps_running(tmp_path):
    """Started by hand (no SIMVIRT_PARENT_PID), a device serves on; only a signal stops it."""
    sock = str(tmp_path / "blk.sock")
    env = {k: v for k, v in os.environ.items() if k != "SIMVIRT_PARENT_PID"}
    dev = subprocess.Popen([sys.executable, "-m", "simvirt", "device", "blk", "--socket", sock, "--memory", "1M"],
                           env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(sock)
        time.sleep(0.3)
        assert dev.poll() is None
        dev.terminate()
        assert dev.wait(10) == 0
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
