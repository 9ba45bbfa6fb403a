"""Start simvirt device processes for benchmarks and tests, and wait for their socket."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from simvirt.devices.runner import PARENT_ENV


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for metrics endpoints)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeviceProcess:
    """``python -m simvirt device ...`` as a child, listening on a fresh socket path."""

    def __init__(self, kind: str, args: list[str], socket_path: Optional[str] = None,
                 log_path: Optional[str] = None) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="simvirt-")
        self.socket_path = socket_path or os.path.join(self.tmpdir, f"{kind}.sock")
        cmd = [sys.executable, "-m", "simvirt", "device", kind, "--socket", self.socket_path, *args]
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})   # the device exits with us
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log if log_path else None, env=env)

    def wait_ready(self, timeout: float = 20.0, also: Sequence[str] = ()) -> str:
        """Wait for the socket (and the ``also`` paths: a switch's other ports) to appear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.socket_path) and all(os.path.exists(p) for p in also):
                return self.socket_path
            if self.proc.poll() is not None:
                raise RuntimeError(f"device process exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise TimeoutError(f"device socket {self.socket_path} did not appear")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]

    def __enter__(self) -> "DeviceProcess":
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pin_apart(device_pid: int) -> Optional[tuple[set[int], list[int]]]:
    """Put this process (the driver) and a device process on different CPUs.

    Two busy-polling processes left to the scheduler are often woken onto one
    CPU (wake-affine), where each spins against the other and both run at
    half speed or worse; latency-tuned setups pin them apart (DPDK lcores,
    vhost worker affinity).  Returns (saved affinity, [driver cpu, device
    cpu]) for :func:`unpin`, or None with fewer than two usable CPUs.
    """
    saved = os.sched_getaffinity(0)
    cpus = sorted(saved)
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(device_pid, {cpus[1]})
    os.sched_setaffinity(0, {cpus[0]})
    return saved, [cpus[0], cpus[1]]


def unpin(pinned: Optional[tuple[set[int], list[int]]]) -> None:
    if pinned is not None:
        os.sched_setaffinity(0, pinned[0])
