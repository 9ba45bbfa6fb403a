"""A real Linux guest (QEMU/TCG, Debian 6.1 kernel, virtio_blk driver) against
``python -m simvirt device blk`` over vhost-user.

Each test boots one guest (~6-15 s under TCG).  The guest prints checksums of
what it wrote; after it powers off the host checks the image file holds
exactly those bytes.  Failures print the guest console and the back end log.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .linux_guest import REPO_ROOT, GuestResult, ensure_guest, run_guest

pytestmark = pytest.mark.interop

MiB = 1 << 20
SERIAL = "simvirt-blk-0"

# Common guest shell prelude: helpers + wait for the disk node.
PRELUDE = r"""
fail() { echo "GUEST-FAIL: $*"; exit 1; }
check_eq() { [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"; echo "ok: $1 = $2"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
i=0
while [ ! -b /dev/vda ] && [ $i -lt 10 ]; do sleep 1; i=$((i+1)); done
[ -b /dev/vda ] || fail "/dev/vda did not appear ($(ls /sys/block | tr '\n' ' '))"
"""


# --------------------------------------------------------------------- helpers

def _require_cli() -> None:
    """The simvirt CLI is developed alongside these tests: skip until it
    exists (fail under CI=true, like a missing tool)."""
    if (REPO_ROOT / "simvirt" / "cli.py").exists() or (REPO_ROOT / "simvirt" / "cli").is_dir():
        return
    msg = "simvirt.cli not present yet (python -m simvirt device blk)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


class Backend:
    """``python -m simvirt device blk`` running in a subprocess."""

    def __init__(self, socket: Path, args: list[str], log: Path):
        self.socket, self.log_path = socket, log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.cmd = [sys.executable, "-m", "simvirt", "-vv", "device", "blk", "--socket", str(socket), *args]
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._logf, stderr=subprocess.STDOUT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"

    def describe(self) -> str:
        return (f"backend: {' '.join(self.cmd)} (rc={self.proc.poll()})\n"
                f"----- backend log -----\n{self.log()}\n----- end backend log -----")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"backend exited before creating its socket\n{self.describe()}",
                            pytrace=False)
            try:
                if stat.S_ISSOCK(os.stat(self.socket).st_mode):
                    time.sleep(0.2)   # bind() happens just before listen()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        pytest.fail(f"backend socket {self.socket} did not appear within {timeout}s\n"
                    f"{self.describe()}", pytrace=False)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode


@pytest.fixture
def workdir():
    # Short path: AF_UNIX socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="svblk."))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_backend(workdir):
    """``start_backend(image, *extra_args) -> Backend`` (stopped at teardown)."""
    ensure_guest()      # skip early (no QEMU) before spawning anything
    _require_cli()
    started: list[Backend] = []

    def start(image: Path, *extra: str, serial: str = SERIAL) -> Backend:
        sock = workdir / f"blk{len(started)}.sock"
        be = Backend(sock, ["--image", str(image), "--serial", serial, *extra],
                     workdir / f"backend{len(started)}.log")
        started.append(be)
        be.wait_ready()
        return be

    yield start
    for be in started:
        be.stop()


def blk_qemu_args(sock: Path, num_queues: int = 1) -> list[str]:
    return ["-chardev", f"socket,id=c0,path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"]


def boot(be: Backend, script: str, *, num_queues: int = 1, smp: int = 1,
         timeout: float = 180) -> tuple[GuestResult, str]:
    """Boot the guest against backend ``be``; returns (result, failure context)."""
    args = blk_qemu_args(be.socket, num_queues)
    if smp > 1:
        args += ["-smp", str(smp)]
    res = run_guest(PRELUDE + script, args, timeout=timeout)
    return res, f"{res.describe()}\n{be.describe()}"


def guest_values(res: GuestResult, key: str) -> list[str]:
    """Values of ``KEY value`` lines the guest printed."""
    return re.findall(rf"^{key} (\S+)\s*$", res.output, re.MULTILINE)


def guest_value(res: GuestResult, key: str, ctx: str) -> str:
    vals = guest_values(res, key)
    assert vals, f"guest did not print {key!r}\n{ctx}"
    return vals[-1]


def sha256_at(path: Path, off: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(length)
    assert len(data) == length, f"{path} shorter than {off}+{length}"
    return hashlib.sha256(data).hexdigest()


def make_image(path: Path, size: int, chunks: dict[int, bytes] | None = None) -> None:
    """Sparse image of ``size`` bytes with ``chunks`` ({offset: data}) written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in (chunks or {}).items():
            f.seek(off)
            f.write(data)


# --------------------------------------------------------------------- control

def test_harness_control_qemu_builtin_virtio_blk(workdir):
    """Control: the same guest against QEMU's *built-in* virtio-blk.

    If this fails the problem is the harness (kernel, initramfs, QEMU), not
    simvirt."""
    ensure_guest()
    img = workdir / "control.img"
    make_image(img, 16 * MiB)
    res = run_guest(PRELUDE + r"""
check_eq size "$(cat /sys/block/vda/size)" 32768
check_eq serial "$(cat /sys/block/vda/serial)" ctl-serial
dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null || fail urandom
dd if=/tmp/p of=/dev/vda bs=1M seek=2 oflag=direct || fail write
echo "PATTERN $(sha /tmp/p)"
""", ["-drive", f"file={img},format=raw,if=none,id=d0,cache=none",
      "-device", "virtio-blk-pci,drive=d0,serial=ctl-serial"])
    assert res.rc == 0, res.describe()
    assert guest_value(res, "PATTERN", res.describe()) == sha256_at(img, 2 * MiB, MiB), res.describe()


# --------------------------------------------------------------------- simvirt

def test_blk_identity_and_readwrite(workdir, start_backend):
    size = 40 * MiB + 12 * 1024          # deliberately not a power of two
    sectors = size // 512
    host_pat, tail = os.urandom(MiB), os.urandom(4096)
    img = workdir / "disk.img"
    make_image(img, size, {8 * MiB: host_pat, size - 4096: tail})
    be = start_backend(img)

    res, ctx = boot(be, rf"""
check_eq size "$(cat /sys/block/vda/size)" {sectors}
check_eq serial "$(cat /sys/block/vda/serial)" {SERIAL}
check_eq ro "$(cat /sys/block/vda/ro)" 0

# data the host put in the image is visible at the right offset
dd if=/dev/vda of=/tmp/h bs=1M skip=8 count=1 iflag=direct || fail "read host pattern"
echo "HOSTPAT $(sha /tmp/h)"
dd if=/dev/vda of=/tmp/last bs=512 skip=$(({sectors} - 8)) count=8 iflag=direct || fail "read last 4K"
echo "LAST4K $(sha /tmp/last)"

# O_DIRECT write, read back uncached
dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null || fail urandom
dd if=/tmp/d of=/dev/vda bs=1M seek=16 oflag=direct || fail "direct write"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/d2 bs=1M skip=16 count=4 iflag=direct || fail "direct read"
check_eq direct-readback "$(sha /tmp/d2)" "$(sha /tmp/d)"
echo "DIRECT $(sha /tmp/d)"

# buffered write + fsync/sync (exercises flush), read back after dropping caches
dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null || fail urandom
dd if=/tmp/b of=/dev/vda bs=1M seek=24 conv=fsync || fail "buffered write"
sync
blockdev --flushbufs /dev/vda || fail flushbufs
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/b2 bs=1M skip=24 count=4 || fail "buffered read"
check_eq buffered-readback "$(sha /tmp/b2)" "$(sha /tmp/b)"
echo "BUFFERED $(sha /tmp/b)"

# unaligned-in-the-middle, small write (single sector) at an odd sector
dd if=/dev/urandom of=/tmp/s bs=512 count=1 2>/dev/null || fail urandom
dd if=/tmp/s of=/dev/vda bs=512 seek=12345 count=1 oflag=direct || fail "sector write"
echo "SECTOR $(sha /tmp/s)"
""")
    assert res.rc == 0, ctx
    assert guest_value(res, "HOSTPAT", ctx) == hashlib.sha256(host_pat).hexdigest(), ctx
    assert guest_value(res, "LAST4K", ctx) == hashlib.sha256(tail).hexdigest(), ctx
    be.stop()
    assert guest_value(res, "DIRECT", ctx) == sha256_at(img, 16 * MiB, 4 * MiB), ctx
    assert guest_value(res, "BUFFERED", ctx) == sha256_at(img, 24 * MiB, 4 * MiB), ctx
    assert guest_value(res, "SECTOR", ctx) == sha256_at(img, 12345 * 512, 512), ctx
    assert os.path.getsize(img) == size, "backend changed the image size\n" + ctx
    # untouched neighbours are still what the host wrote
    assert sha256_at(img, 8 * MiB, MiB) == hashlib.sha256(host_pat).hexdigest(), ctx
    assert sha256_at(img, size - 4096, 4096) == hashlib.sha256(tail).hexdigest(), ctx


def test_blk_readonly(workdir, start_backend):
    size = 16 * MiB
    pat = os.urandom(2 * MiB)
    img = workdir / "ro.img"
    make_image(img, size, {4 * MiB: pat})
    before = sha256_at(img, 0, size)
    be = start_backend(img, "--readonly", serial="ro-disk")

    res, ctx = boot(be, rf"""
check_eq size "$(cat /sys/block/vda/size)" {size // 512}
check_eq serial "$(cat /sys/block/vda/serial)" ro-disk
check_eq ro "$(cat /sys/block/vda/ro)" 1
dd if=/dev/vda of=/tmp/r bs=1M skip=4 count=2 iflag=direct || fail "read on ro disk"
echo "READ $(sha /tmp/r)"
dd if=/dev/urandom of=/tmp/w bs=1M count=1 2>/dev/null
if dd if=/tmp/w of=/dev/vda bs=1M seek=4 oflag=direct; then fail "direct write to ro disk succeeded"; fi
echo "ok: direct write refused"
if dd if=/tmp/w of=/dev/vda bs=1M seek=4 conv=fsync; then fail "buffered write to ro disk succeeded"; fi
echo "ok: buffered write refused"
""")
    assert res.rc == 0, ctx
    assert guest_value(res, "READ", ctx) == hashlib.sha256(pat).hexdigest(), ctx
    be.stop()
    assert sha256_at(img, 0, size) == before, "read-only image was modified\n" + ctx


def test_blk_discard(workdir, start_backend):
    size = 32 * MiB
    img = workdir / "discard.img"
    data = os.urandom(8 * MiB)                     # allocated region [8M, 16M)
    make_image(img, size, {8 * MiB: data})
    os.sync()
    blocks_before = os.stat(img).st_blocks
    d_off, d_len = 9 * MiB, 4 * MiB                # discard [9M, 13M)
    be = start_backend(img)

    res, ctx = boot(be, rf"""
echo "discard_granularity=$(cat /sys/block/vda/queue/discard_granularity) discard_max_bytes=$(cat /sys/block/vda/queue/discard_max_bytes)"
[ "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0 ] || fail "device does not advertise discard"
blkdiscard -o {d_off} -l {d_len} /dev/vda || fail "blkdiscard -o {d_off} -l {d_len}"
echo "ok: blkdiscard"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/after bs=1M skip=8 count=8 iflag=direct || fail "read after discard"
echo "AFTER $(sha /tmp/after)"
""")
    assert res.rc == 0, ctx
    be.stop()
    os.sync()
    blocks_after = os.stat(img).st_blocks
    zeros = sha256_at(img, d_off, d_len) == hashlib.sha256(bytes(d_len)).hexdigest()
    assert zeros or blocks_after < blocks_before, (
        f"discarded range neither reads as zeros nor was deallocated "
        f"(st_blocks {blocks_before} -> {blocks_after})\n{ctx}")
    # neighbours of the discarded range are intact
    assert sha256_at(img, 8 * MiB, MiB) == hashlib.sha256(data[:MiB]).hexdigest(), ctx
    assert sha256_at(img, 13 * MiB, 3 * MiB) == hashlib.sha256(data[5 * MiB:]).hexdigest(), ctx
    assert os.path.getsize(img) == size, ctx
    if zeros:   # then the guest must have read zeros there too
        expect = data[:MiB] + bytes(d_len) + data[5 * MiB:]
        assert guest_value(res, "AFTER", ctx) == hashlib.sha256(expect).hexdigest(), ctx


def test_blk_two_queues_two_cpus(workdir, start_backend):
    size = 32 * MiB
    img = workdir / "mq.img"
    make_image(img, size)
    be = start_backend(img, "--num-queues", "2")

    res, ctx = boot(be, r"""
check_eq cpus "$(nproc)" 2
check_eq hw-queues "$(ls /sys/block/vda/mq | wc -l)" 2
dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null || fail urandom
dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null || fail urandom
# one writer pinned to each CPU -> each CPU's hardware queue carries I/O
taskset 1 dd if=/tmp/a of=/dev/vda bs=64K seek=64 oflag=direct 2>/dev/null & pa=$!
taskset 2 dd if=/tmp/b of=/dev/vda bs=64K seek=256 oflag=direct 2>/dev/null & pb=$!
wait $pa || fail "writer on cpu0"
wait $pb || fail "writer on cpu1"
echo 3 > /proc/sys/vm/drop_caches
taskset 2 dd if=/dev/vda of=/tmp/a2 bs=1M skip=4 count=4 iflag=direct || fail "read a"
taskset 1 dd if=/dev/vda of=/tmp/b2 bs=1M skip=16 count=4 iflag=direct || fail "read b"
check_eq readback-a "$(sha /tmp/a2)" "$(sha /tmp/a)"
check_eq readback-b "$(sha /tmp/b2)" "$(sha /tmp/b)"
echo "A $(sha /tmp/a)"
echo "B $(sha /tmp/b)"
# per-virtqueue MSI-X vectors are named virtioN-req.Q
grep -- '-req\.' /proc/interrupts | sed 's/^/INTR /'
""", num_queues=2, smp=2)
    assert res.rc == 0, ctx
    # Both request virtqueues must have signalled completions.
    irqs: dict[str, int] = {}
    for line in re.findall(r"^INTR (.*)$", res.output, re.MULTILINE):
        parts = line.split()
        irqs[parts[-1]] = sum(int(p) for p in parts[1:3] if p.isdigit())
    per_queue = {name.rsplit(".", 1)[1]: n for name, n in irqs.items()}
    assert set(per_queue) == {"0", "1"}, f"expected 2 request-queue vectors, got {irqs}\n{ctx}"
    assert all(n > 0 for n in per_queue.values()), f"a virtqueue carried no I/O: {irqs}\n{ctx}"
    be.stop()
    assert guest_value(res, "A", ctx) == sha256_at(img, 4 * MiB, 4 * MiB), ctx
    assert guest_value(res, "B", ctx) == sha256_at(img, 16 * MiB, 4 * MiB), ctx


def test_guest_survives_a_sigkilled_backend_with_reconnect_and_inflight(workdir, start_backend):
    """QEMU's `-chardev socket,reconnect=1`: the device process is SIGKILLed while the guest
    writes; a new one takes the socket, QEMU reconnects and hands it the inflight area,
    and the guest's writes complete without an I/O error; the image holds what it wrote."""
    import threading
    from simvirt.bench.procs import free_port
    from simvirt.metrics import scrape

    img = workdir / "rc.img"
    make_image(img, 32 * MiB)
    port = free_port()
    be = start_backend(img, "--metrics-port", str(port))
    script = PRELUDE + r"""
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null || fail urandom
for pass in 1 2 3 4 5 6 7 8; do
    dd if=/tmp/pat of=/dev/vda bs=64K seek=16 oflag=direct 2>/dev/null || fail "write pass $pass"
done
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=64K skip=16 count=128 iflag=direct 2>/dev/null || fail readback
check_eq readback "$(sha /tmp/back)" "$(sha /tmp/pat)"
echo "PATTERN $(sha /tmp/pat)"
"""
    args = ["-chardev", f"socket,id=c0,path={be.socket},reconnect=1",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("res", run_guest(script, args, timeout=240)))
    t.start()
    # Wait until the guest is writing, then kill the device process mid-stream.
    deadline = time.monotonic() + 120
    writes = 0.0
    while time.monotonic() < deadline and t.is_alive():
        try:
            writes = scrape(port, "simvirt_requests_total", op="write")
        except OSError:
            writes = 0.0
        if writes >= 64:
            break
        time.sleep(0.05)
    assert writes >= 64, "the guest never started writing"
    be.proc.send_signal(signal.SIGKILL)
    be.proc.wait()
    time.sleep(0.5)
    # The new process takes the same socket (QEMU reconnects to the path it knows).
    be2 = Backend(be.socket, ["--image", str(img), "--serial", SERIAL], be.log_path.with_suffix(".2.log"))
    be2.wait_ready()
    try:
        t.join(240)
    finally:
        be2.stop()
    res = box["res"]
    ctx = f"{res.describe()}\n{be.describe()}\n{be2.describe()}"
    assert res.rc == 0, ctx
    assert guest_value(res, "PATTERN", ctx) == sha256_at(img, 16 * 64 * 1024, 8 * MiB), ctx
    # QEMU handed the new process the inflight area (the second backend's log shows the trace).
    assert "SET_INFLIGHT_FD" in be2.log(), ctx
