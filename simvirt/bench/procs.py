"""Start simvirt child processes (devices, VMs) for benchmarks, tests and runs, and wait for their sockets."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Mapping, Optional, Sequence

from simvirt.devices.runner import PARENT_ENV


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for metrics endpoints)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: Sequence[str], *, log_path: Optional[str] = None,
          env: Optional[Mapping[str, str]] = None) -> tuple[subprocess.Popen[bytes], Optional[IO[bytes]]]:
    """Start ``cmd`` as a child that exits when this process does; returns (process, open log or None).

    The child gets ``SIMVIRT_PARENT_PID`` (on top of ``env``, default our
    environment): simvirt children watch that pid and stop when it dies, so a
    starter killed hard leaves no orphans holding sockets, RAM and ports.
    With ``log_path`` the child's stdout and stderr are appended there (the
    caller closes the returned file once the child is gone); without it stdout
    is discarded and stderr stays ours, so a crash still shows.

    The child leads its own process group: a Ctrl-C at the terminal reaches
    only the starter, which then winds its workloads down while the devices
    still serve them, and stops its children itself (QEMU's backends are
    not the terminal's to kill either).
    """
    child_env = dict(os.environ if env is None else env, **{PARENT_ENV: str(os.getpid())})
    log = open(log_path, "ab") if log_path else None
    try:
        proc = subprocess.Popen(list(cmd), stdout=log if log is not None else subprocess.DEVNULL,
                                stderr=log, env=child_env, process_group=0)
    except BaseException:
        if log is not None:
            log.close()
        raise
    return proc, log


class ChildExited(RuntimeError):
    """The child died before the paths it should create appeared."""

    def __init__(self, returncode: int, missing: str) -> None:
        super().__init__(f"process exited with {returncode} before {missing} appeared")
        self.returncode = returncode


def _missing(paths: Sequence[str]) -> Optional[str]:
    return next((p for p in paths if not os.path.exists(p)), None)


def _check(paths: Sequence[str], proc: Optional[subprocess.Popen[Any]], deadline: Optional[float],
           timeout: Optional[float]) -> bool:
    """One round of waiting: True when every path exists, an exception when waiting is pointless."""
    missing = _missing(paths)
    if missing is None:
        return True
    if proc is not None and proc.poll() is not None:
        raise ChildExited(proc.returncode, missing)
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"{missing} did not appear in {timeout:g} s")
    return False


def wait_for_path(paths: Sequence[str], proc: Optional[subprocess.Popen[Any]], timeout: Optional[float],
                  *, interval: float = 0.02) -> None:
    """Wait until all ``paths`` exist (a child's sockets), polling every ``interval`` s.

    Raises :class:`ChildExited` if ``proc`` dies first (a child that crashed
    would otherwise cost the whole timeout), :class:`TimeoutError` naming the
    first missing path after ``timeout`` s.  ``proc=None`` skips the exit
    check, ``timeout=None`` waits for ever.  Paths are checked before the
    child, so one that made its sockets and then exited still counts as ready.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _check(paths, proc, deadline, timeout):
        time.sleep(interval)


async def async_wait_for_path(paths: Sequence[str], proc: Optional[subprocess.Popen[Any]],
                              timeout: Optional[float], *, interval: float = 0.02) -> None:
    """:func:`wait_for_path` for coroutines: sleeps with asyncio, so the event loop (drivers,
    other restarts, the control socket) keeps running while a child starts."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _check(paths, proc, deadline, timeout):
        await asyncio.sleep(interval)


def stop_children(procs: Sequence[subprocess.Popen[Any]], timeout: float = 10.0) -> None:
    """SIGTERM to every child at once, SIGKILL to those still up ``timeout`` s later; all reaped.

    Signalling all before waiting on any bounds a machine's shutdown by one
    timeout, not one per device; reaping means no zombie outlives its starter.
    """
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_child(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """:func:`stop_children` for one child."""
    stop_children([proc], timeout)


class DeviceProcess:
    """``python -m simvirt device ...`` as a child, listening on a fresh socket path."""

    def __init__(self, kind: str, args: list[str], socket_path: Optional[str] = None,
                 log_path: Optional[str] = None) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="simvirt-")
        self.socket_path = socket_path or os.path.join(self.tmpdir, f"{kind}.sock")
        cmd = [sys.executable, "-m", "simvirt", "device", kind, "--socket", self.socket_path, *args]
        self.proc, self._log = spawn(cmd, log_path=log_path)

    def wait_ready(self, timeout: float = 20.0, also: Sequence[str] = ()) -> str:
        """Wait for the socket (and the ``also`` paths: a switch's other ports) to appear."""
        try:
            wait_for_path([self.socket_path, *also], self.proc, timeout)
        except ChildExited as e:
            raise RuntimeError(f"device process exited with {e.returncode}") from None
        except TimeoutError:
            raise TimeoutError(f"device socket {self.socket_path} did not appear") from None
        return self.socket_path

    def stop(self) -> None:
        stop_child(self.proc)
        if self._log is not None:
            self._log.close()

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
