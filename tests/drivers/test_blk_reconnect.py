"""A blk device process killed with SIGKILL under a verified write load, again and again.

Each time a new device process takes the socket, the driver reconnects
(same rings, same inflight area) and the load goes on. Proof of issue 7:
every acknowledged write reads back, no request completes twice (the
driver's used-ring bookkeeping refuses a head that is not in flight, and
any such error in a callback fails the test), and the writes in flight at
each kill complete after the restart.
"""
from __future__ import annotations

import asyncio
import mmap
import os
import random
import signal
import threading
import time

from simvirt.bench.procs import DeviceProcess, free_port
from simvirt.drivers.blk import VirtioBlkDriver
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.metrics import scrape

KILLS = int(os.environ.get("SIMVIRT_KILLS", "8"))
BLOCK = 4096
BLOCKS = 1024
WRITERS = 16


def _pattern(block: int, gen: int) -> bytes:
    head = f"blk{block:06d}gen{gen:08d}".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


async def _scrape_resubmitted(port: int) -> int:
    """The new device's count of resubmitted requests (its scrape port may lag its socket)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return int(scrape(port, "simvirt_errors_total", reason="inflight_resubmitted"))
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_blk_device_killed_repeatedly_loses_and_duplicates_nothing(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, BLOCK * BLOCKS)
    sock = str(tmp_path / "blk.sock")

    def start_device() -> tuple[DeviceProcess, int]:
        port = free_port()
        d = DeviceProcess("blk", ["--image", str(image), "--metrics-port", str(port)], socket_path=sock)
        d.wait_ready()
        return d, port

    dev, port = start_device()
    ram = 64 << 20
    mem = GuestMemory.create_shared(ram)
    drv = VirtioBlkDriver(VhostUserTransport(sock, mem, PageAllocator(0, ram), device_label="blk0", inflight=True),
                          queue_size=64)
    acked: dict[int, int] = {}          # block -> generation whose write was acknowledged
    completions = 0
    resubmitted = 0
    errors: list[str] = []
    rng = random.Random(7)

    async def main() -> None:
        nonlocal completions, dev, port, resubmitted
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _l, ctx: errors.append(str(ctx.get("exception") or ctx["message"])))
        drv.probe(loop)
        assert drv.transport.inflight_area is not None, "INFLIGHT_SHMFD was not negotiated"
        # Write-through: every acknowledged write is on the image (and each one keeps the device busy
        # long enough for kills to land with requests taken and not finished).
        await drv.set_writeback(False)
        stop = False

        async def writer(w: int) -> None:
            nonlocal completions
            mine = list(range(w, BLOCKS, WRITERS))
            gen = 0
            while not stop:
                block = rng.choice(mine)
                gen += 1
                await drv.write(block * BLOCK // 512, _pattern(block, gen))
                acked[block] = gen          # only after the device acknowledged it
                completions += 1

        tasks = [loop.create_task(writer(w)) for w in range(WRITERS)]
        # The killer runs on its own clock (a thread), so kills land while the device is busy.
        pids: list[int] = [dev.proc.pid]
        kill_times: list[float] = []

        fd, size, _off, _nq, qs = drv.transport.inflight_area
        area = mmap.mmap(fd, size, prot=mmap.PROT_READ)

        def taken() -> int:
            """Requests the device has marked taken and not finished (it writes this area)."""
            return sum(area[16 + 16 * h] for h in range(qs))

        def killer() -> None:
            krng = random.Random(11)
            for _ in range(KILLS):
                time.sleep(krng.uniform(0.05, 0.3))
                # A random moment, among those with requests in the device's hands.
                deadline = time.monotonic() + 1.0
                while not taken() and time.monotonic() < deadline:
                    pass
                os.kill(pids[-1], signal.SIGKILL)
                kill_times.append(time.monotonic())
                # The next kill only once the new device has made progress: a kill before its
                # first completion would leave nothing to tell a stall from bad luck.
                if not resumed.wait(30):
                    return
                resumed.clear()

        resumed = threading.Event()
        kill_thread = threading.Thread(target=killer, daemon=True)
        kill_thread.start()
        restarts = 0
        while restarts < KILLS:
            await asyncio.sleep(0.005)
            if dev.proc.poll() is None:
                continue
            before = completions
            dev.stop()
            dev, port = start_device()
            drv.reconnect()
            pids.append(dev.proc.pid)
            restarts += 1
            deadline = time.monotonic() + 10
            while completions < before + WRITERS and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert completions >= before + WRITERS, "writes stalled after the restart"
            resumed.set()
            resubmitted += await _scrape_resubmitted(port)
        kill_thread.join(10)
        area.close()
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for bq in drv.queues:
            assert bq.h.queue.in_flight == 0
        # Every acknowledged write reads back, through the device...
        for block, gen in acked.items():
            assert await drv.read(block * BLOCK // 512, BLOCK) == _pattern(block, gen), f"block {block}"

    try:
        asyncio.run(main())
    finally:
        drv.close()
        mem.close()
        dev.stop()
    # ...and in the image file itself.
    data = image.read_bytes()
    for block, gen in acked.items():
        assert data[block * BLOCK:(block + 1) * BLOCK] == _pattern(block, gen)
    assert not errors, errors
    assert completions > KILLS * WRITERS and len(acked) > BLOCKS // 4
    # Kills landed mid-batch: the new backends had requests to resubmit (the point of INFLIGHT_SHMFD).
    assert resubmitted > 0
    print(f"{KILLS} kills survived, {completions} writes acknowledged and verified, "
          f"{resubmitted} inflight requests resubmitted")
