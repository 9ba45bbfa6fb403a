"""Run one device as its own OS process: uvloop, signals, metrics, reconnects; the process-lifecycle
helpers (signals, parent watch) that the machine and scenario processes share."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Callable, Optional

from simvirt import metrics
from simvirt.devices.base import VirtioDevice
from simvirt.vhost_user.server import VhostUserServer

log = logging.getLogger(__name__)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - it is a hard dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_device(device: VirtioDevice, socket_path: str, *, metrics_port: Optional[int] = None,
                       metrics_addr: str = "127.0.0.1", poll_us: float = 0.0,
                       control_path: Optional[str] = None, control_handler=None, on_ready: Optional[Callable[[], None]] = None) -> None:
    """Serve ``device`` on ``socket_path`` until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    # Signal handlers first: the socket appearing is how callers know we are up, and a
    # SIGTERM right after that must be a clean stop, not the default action.
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    parent_fd = watch_parent(loop, stop)
    server = VhostUserServer(device, socket_path, loop=loop, poll_us=poll_us)
    server.listen()
    port = metrics.serve(metrics_port, metrics_addr)
    metrics.mark_process(device.vm, f"device-{device.name}")
    log.info("%s: vhost-user backend listening on %s%s", device.label, socket_path,
             f", metrics on {metrics_addr}:{port}" if port else "")
    control = None
    if control_path is not None and control_handler is not None:
        from simvirt.control import serve_control
        control = await serve_control(control_path, control_handler)
        log.info("%s: control socket on %s", device.label, control_path)
    if on_ready is not None:
        on_ready()
    task = asyncio.ensure_future(server.serve_forever())
    try:
        done, _ = await asyncio.wait([stop, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
    finally:
        task.cancel()
        if control is not None:
            control.close()
        server.close()
        if server.session is not None:
            server.session.close()
        if parent_fd is not None:
            loop.remove_reader(parent_fd)
            os.close(parent_fd)
        log.info("%s: stopped", device.label)


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The first SIGINT/SIGTERM sets ``stop`` (wind down, report); a second one acts as if unhandled.

    A run interrupted once still owes its user the report of what it did; a
    user who presses Ctrl-C again wants out now (KeyboardInterrupt, or the
    default SIGTERM death: the children's parent watch then stops them).
    """
    sigs = (signal.SIGINT, signal.SIGTERM)

    def first() -> None:
        stop.set()
        for s in sigs:
            loop.remove_signal_handler(s)

    for sig in sigs:
        loop.add_signal_handler(sig, first)


async def sleep_until(t: float, event: asyncio.Event) -> None:
    """Sleep until monotonic time ``t``, or less if ``event`` is set meanwhile (a stop, a halt)."""
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=max(0.0, t - time.monotonic()))
    finally:
        waiter.cancel()


PARENT_ENV = "SIMVIRT_PARENT_PID"


def watch_parent(loop: asyncio.AbstractEventLoop, stop: "asyncio.Future[object]") -> Optional[int]:
    """Stop when the process that started us dies, even by SIGKILL.

    A ``simvirt run`` killed hard cannot stop its device processes, and
    orphans would hold sockets, RAM and ports. A pidfd becomes readable when
    its process exits; unlike PR_SET_PDEATHSIG it follows the parent process,
    not the thread that happened to fork us.
    """
    want = os.environ.get(PARENT_ENV)
    if not want:
        return None
    ppid = int(want)
    try:
        fd = os.pidfd_open(ppid)
    except (OSError, AttributeError):
        fd = None
    if os.getppid() != ppid:            # already gone (or the pidfd names a reused pid)
        if fd is not None:
            os.close(fd)
        log.warning("parent process %d is gone; stopping", ppid)
        stop.done() or stop.set_result("parent exited")
        return None
    if fd is None:
        return None
    loop.add_reader(fd, lambda: stop.done() or (log.warning("parent process %d exited; stopping", ppid),
                                                stop.set_result("parent exited")))
    return fd


def run_device(device: VirtioDevice, socket_path: str, **kw) -> int:
    install_uvloop()
    asyncio.run(serve_device(device, socket_path, **kw))
    return 0
