"""The shared child-process helpers: spawn with the parent-pid watch, and waiting for a child's sockets."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Iterator

import pytest

from simvirt.bench.procs import (ChildExited, DeviceProcess, async_wait_for_path, spawn, stop_child, stop_children,
                                 wait_for_path)
from simvirt.devices.runner import PARENT_ENV


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _creates_after(path: str, delay: float) -> list[str]:
    return _python(f"import time; time.sleep({delay}); open({path!r}, 'w').close(); time.sleep(30)")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children started by a test, killed at its end whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def _spawn(children: list[subprocess.Popen[bytes]], cmd: list[str], **kw) -> subprocess.Popen[bytes]:
    proc, log = spawn(cmd, **kw)
    children.append(proc)
    if log is not None:
        log.close()   # the child holds its own descriptor
    return proc


def test_spawn_sets_parent_pid_and_appends_both_streams_to_the_log(tmp_path, children):
    log_path = tmp_path / "child.log"
    log_path.write_bytes(b"earlier run\n")
    code = (f"import os, sys; print(os.environ[{PARENT_ENV!r}]); print(os.environ.get('EXTRA'), flush=True); "
            "print('err', file=sys.stderr)")
    proc = _spawn(children, _python(code), log_path=str(log_path), env={"EXTRA": "yes"})
    assert proc.wait(10) == 0
    assert log_path.read_text().splitlines() == ["earlier run", str(os.getpid()), "yes", "err"]


def test_spawn_without_log_returns_no_file(children):
    proc, log = spawn(_python("print('discarded')"))
    children.append(proc)
    assert log is None and proc.wait(10) == 0


def test_spawn_failure_closes_the_log(tmp_path, monkeypatch):
    opened = []
    real_open = open

    def tracking_open(*a, **kw):
        f = real_open(*a, **kw)
        opened.append(f)
        return f

    monkeypatch.setattr("simvirt.bench.procs.open", tracking_open, raising=False)
    with pytest.raises(FileNotFoundError):
        spawn([str(tmp_path / "no-such-program")], log_path=str(tmp_path / "x.log"))
    assert opened and all(f.closed for f in opened)


def test_wait_for_path_returns_once_the_child_creates_it(tmp_path, children):
    path = str(tmp_path / "late.sock")
    proc = _spawn(children, _creates_after(path, 0.3))
    t0 = time.monotonic()
    wait_for_path([path], proc, timeout=20)
    assert time.monotonic() - t0 >= 0.25


def test_wait_for_path_waits_for_every_path(tmp_path, children):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    open(first, "w").close()
    proc = _spawn(children, _creates_after(second, 0.2))
    wait_for_path([first, second], proc, timeout=20)


def test_wait_for_path_names_the_exit_code_when_the_child_dies_first(tmp_path, children):
    path = str(tmp_path / "never.sock")
    proc = _spawn(children, _python("import sys; sys.exit(3)"))
    t0 = time.monotonic()
    with pytest.raises(ChildExited, match="exited with 3") as info:
        wait_for_path([path], proc, timeout=20)
    assert info.value.returncode == 3 and path in str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert time.monotonic() - t0 < 10          # the death is noticed, not the timeout


def test_wait_for_path_timeout_names_the_missing_path(tmp_path, children):
    present, missing = str(tmp_path / "there"), str(tmp_path / "absent.sock")
    open(present, "w").close()
    proc = _spawn(children, _python("import time; time.sleep(30)"))
    with pytest.raises(TimeoutError, match="absent.sock") as info:
        wait_for_path([present, missing], proc, timeout=0.2)
    assert present not in str(info.value)


def test_a_child_that_made_its_path_and_exited_is_ready(tmp_path, children):
    path = str(tmp_path / "done")
    proc = _spawn(children, _python(f"open({path!r}, 'w').close()"))
    proc.wait(10)
    wait_for_path([path], proc, timeout=1)


def test_async_wait_keeps_the_event_loop_running(tmp_path, children):
    path = str(tmp_path / "late.sock")
    proc = _spawn(children, _creates_after(path, 0.3))

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        await async_wait_for_path([path], proc, timeout=20)
        ticker.cancel()
        return ticks

    assert asyncio.run(main()) > 5


def test_async_wait_errors_match_the_sync_ones(tmp_path, children):
    dead = _spawn(children, _python("import sys; sys.exit(5)"))
    alive = _spawn(children, _python("import time; time.sleep(30)"))
    with pytest.raises(ChildExited, match="exited with 5"):
        asyncio.run(async_wait_for_path([str(tmp_path / "x")], dead, timeout=20))
    with pytest.raises(TimeoutError, match="y.sock"):
        asyncio.run(async_wait_for_path([str(tmp_path / "y.sock")], alive, timeout=0.2))


def test_device_process_keeps_its_messages(tmp_path):
    # An unknown device kind: argparse exits with 2 before any socket exists.
    dp = DeviceProcess("no-such-kind", [], log_path=str(tmp_path / "dev.log"))
    try:
        with pytest.raises(RuntimeError, match=r"^device process exited with 2$"):
            dp.wait_ready()
    finally:
        dp.stop()
    assert dp._log is not None and dp._log.closed


def test_stop_child_terminates_a_polite_child(children):
    proc = _spawn(children, _python("import time; time.sleep(30)"))
    stop_child(proc)
    assert proc.returncode == -15


def test_stop_child_kills_and_reaps_a_child_that_ignores_sigterm(tmp_path, children):
    ready = tmp_path / "ready"
    proc = _spawn(children, _python(
        f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open({str(ready)!r}, 'w').close(); time.sleep(30)"))
    wait_for_path([str(ready)], proc, 10)
    stop_child(proc, timeout=0.3)
    assert proc.returncode == -9
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)   # already reaped: no zombie left behind


def test_stop_children_signals_all_before_waiting_on_any(tmp_path, children):
    """Two children that ignore SIGTERM: both get it at once, so shutdown costs one timeout,
    not one per child (a machine with four devices stopped serially took 40 s)."""
    procs = []
    for i in range(2):
        ready, got = tmp_path / f"ready{i}", tmp_path / f"term{i}"
        procs.append(_spawn(children, _python(
            "import signal, time\n"
            f"signal.signal(signal.SIGTERM, lambda *a: open({str(got)!r}, 'w').write(repr(time.monotonic())))\n"
            f"open({str(ready)!r}, 'w').close()\n"
            "while True: time.sleep(1)")))
        wait_for_path([str(ready)], procs[-1], 10)
    stop_children(procs, timeout=1.5)
    assert [p.returncode for p in procs] == [-9, -9]
    t0, t1 = (float((tmp_path / f"term{i}").read_text()) for i in range(2))
    assert abs(t1 - t0) < 0.75      # serially, the second SIGTERM would come 1.5 s after the first
    for p in procs:
        with pytest.raises(ChildProcessError):
            os.waitpid(p.pid, os.WNOHANG)
