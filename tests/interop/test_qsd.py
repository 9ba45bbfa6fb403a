"""The simvirt guest driver against qemu-storage-daemon's vhost-user-blk export.

qemu-storage-daemon is QEMU's own libvhost-user-based backend: if our driver
(status handshake, rings, EVENT_IDX, vhost-user frontend) works with it, with
data verified end to end, we speak vhost-user-blk and not a private dialect.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import require_tool

pytestmark = pytest.mark.interop


def _qsd(tmp_path, blockdev: str, node: str):
    qsd = require_tool("qemu-storage-daemon")
    sock = str(tmp_path / "qsd.sock")
    log = open(tmp_path / "qsd.log", "wb")
    proc = subprocess.Popen([qsd, "--blockdev", blockdev,
                             "--export", f"type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,"
                                         f"addr.path={sock},writable=on"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"qemu-storage-daemon did not start: {(tmp_path / 'qsd.log').read_text()}")
        time.sleep(0.05)
    return proc, sock


def _bench(sock: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "simvirt", "bench", "blk", "--connect", sock, "--json", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def qsd_file(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    proc, sock = _qsd(tmp_path, f"driver=file,node-name=file0,filename={img}", "file0")
    yield sock, img
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def qsd_null(tmp_path):
    proc, sock = _qsd(tmp_path, "driver=null-co,node-name=null0,size=1073741824,read-zeroes=on", "null0")
    yield sock
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("rw", ["randrw", "write"])
def test_driver_verifies_data_on_qsd_file_export(qsd_file, rw):
    sock, img = qsd_file
    r = _bench(sock, "--rw", rw, "--bs", "4K", "--iodepth", "16", "--runtime", "1.5", "--verify", "--size", "16M")
    assert r["errors"] == 0
    assert r["verified"] is True
    assert r["ios"] > 100
    checked = r["verify"]["reads_checked"] + r["verify"]["blocks_read_back"]
    assert checked > 100
    # The data really is in qemu-storage-daemon's image file, pattern and all.
    with open(img, "rb") as f:
        data = f.read(16 << 20)
    assert data.count(b"\0" * 4096) < len(data) // 4096  # most blocks were written


def test_driver_large_sequential_io_on_qsd(qsd_file):
    sock, _ = qsd_file
    r = _bench(sock, "--rw", "write", "--bs", "1M", "--iodepth", "4", "--runtime", "1", "--verify", "--size", "32M")
    assert r["errors"] == 0 and r["verified"] is True


def test_driver_reads_zeroes_from_qsd_null_co(qsd_null):
    r = _bench(qsd_null, "--rw", "randrw", "--bs", "4K", "--iodepth", "32", "--runtime", "1.5", "--verify=zeroes")
    assert r["errors"] == 0
    assert r["verified"] is True
    assert r["verify"]["reads_checked"] > 100


def test_driver_api_against_qsd(qsd_file):
    """get_id, flush, discard and write_zeroes through the awaitable API."""
    import asyncio

    from simvirt.drivers.blk import VirtioBlkDriver
    from simvirt.drivers.transport import VhostUserTransport
    from simvirt.memory import GuestMemory, PageAllocator

    sock, img = qsd_file

    async def main() -> None:
        mem = GuestMemory.create_shared(32 << 20)
        drv = VirtioBlkDriver(VhostUserTransport(sock, mem, PageAllocator(0, 32 << 20)))
        try:
            cfg = drv.probe(asyncio.get_running_loop())
            assert cfg.capacity == (64 << 20) // 512
            data = os.urandom(128 << 10)
            await drv.write(2048, data)
            await drv.flush()
            assert await drv.read(2048, len(data)) == data
            await drv.write_zeroes([(2048, 8)])
            assert await drv.read(2048, 4096) == bytes(4096)
            assert await drv.read(2056, 4096) == data[4096:8192]
            await drv.discard([(2064, 16)])
            assert isinstance(await drv.get_id(), str)
        finally:
            drv.close()
            mem.close()

    asyncio.run(main())
