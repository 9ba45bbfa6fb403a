"""Start simvirt device processes for benchmarks and tests, and wait for their socket."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional


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
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log if log_path else None)

    def wait_ready(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.socket_path):
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
