"""Boot a throw-away Linux guest under QEMU (TCG) and run a shell script in it.

The guest (kernel + busybox initramfs with the virtio modules) is built once
by ``tools/build-guest.sh`` and cached in ``$SIMVIRT_GUEST_DIR`` (default
``~/.cache/simvirt/guest``).  Each :func:`run_guest` call appends a second,
tiny gzip'd newc cpio archive carrying ``/test.sh`` to the cached initrd
(Linux unpacks concatenated initramfs archives in order), boots QEMU with
guest RAM in a shared memfd (so vhost-user back ends can map it), and parses
the ``SIMVIRT-GUEST-EXIT <rc>`` line that the guest's ``/init`` prints after
running the script.

Usage from a test::

    from .linux_guest import run_guest

    res = run_guest("cat /sys/block/vda/size",
                    ["-drive", "file=x.img,if=none,id=d0,format=raw",
                     "-device", "virtio-blk-pci,drive=d0"])
    assert res.rc == 0, res.describe()

Manual self-check (QEMU's built-in virtio-blk, no simvirt involved)::

    python tests/interop/linux_guest.py
"""
from __future__ import annotations

import dataclasses
import fcntl
import gzip
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "build-guest.sh"
QEMU = "qemu-system-x86_64"
EXIT_MARKER = "SIMVIRT-GUEST-EXIT"
_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[^\[])")
INIT_MARKER = "simvirt-guest: kernel "   # first line /init prints, before any insmod
_EXIT_RE = re.compile(rf"^{EXIT_MARKER} (\d+)\b", re.MULTILINE)


def require_tool(name: str) -> str:
    """Same policy as ``tests/conftest.py:require_tool`` (kept local so this
    module imports regardless of pytest's rootdir/import mode): a missing
    tool is a skip on a developer box but a failure under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        msg = f"required tool {name!r} not found on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def guest_dir() -> Path:
    env = os.environ.get("SIMVIRT_GUEST_DIR")
    return Path(env) if env else Path.home() / ".cache" / "simvirt" / "guest"


_guest_cache: tuple[Path, Path] | None = None


def ensure_guest() -> tuple[Path, Path]:
    """Return ``(vmlinuz, initrd)``, building them with build-guest.sh if needed.

    Skips (fails under CI=true) if QEMU is not installed; a failing build is
    always a test failure, with the builder's log in the message.
    """
    global _guest_cache
    require_tool(QEMU)
    if _guest_cache is not None and all(p.exists() for p in _guest_cache):
        return _guest_cache
    out = guest_dir()
    vmlinuz, initrd = out / "vmlinuz", out / "initrd.gz"
    if not (vmlinuz.exists() and initrd.exists()):
        out.mkdir(parents=True, exist_ok=True)
        # Serialise concurrent builders (pytest-xdist, parallel sessions).
        with open(out / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (vmlinuz.exists() and initrd.exists()):
                proc = subprocess.run(
                    ["bash", str(BUILD_SCRIPT), str(out)],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, errors="replace",
                )
                if proc.returncode != 0 or not (vmlinuz.exists() and initrd.exists()):
                    pytest.fail(
                        f"{BUILD_SCRIPT} {out} failed (rc={proc.returncode}):\n{proc.stdout}",
                        pytrace=False,
                    )
    _guest_cache = (vmlinuz, initrd)
    return _guest_cache


# --------------------------------------------------------------------- cpio

def _cpio_entry(ino: int, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> bytes:
    """One "newc" (SVR4, no CRC) cpio member; name and data 4-byte aligned."""
    bname = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(bname), 0)
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + bname
    hdr += b"\0" * (-len(hdr) % 4)
    return hdr + data + b"\0" * (-len(data) % 4)


def make_cpio(files: Mapping[str, bytes | str | tuple[bytes | str, int]]) -> bytes:
    """Build an uncompressed newc cpio archive.

    ``files`` maps guest paths (leading ``/`` optional) to contents, or to
    ``(contents, mode)``; default mode 0644.  Parent directories are created.
    The archive also carries ``/dev/console`` (char 5:1) so the kernel has
    an initial console even if the base initrd was built without root.
    """
    out, ino, dirs = [], 1, set()

    def add(name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink: int = 1):
        nonlocal ino
        out.append(_cpio_entry(ino, name, mode, data, rdev, nlink))
        ino += 1

    def add_parents(path: str):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                add(d, 0o040755, nlink=2)

    add_parents("dev/console")
    add("dev/console", 0o020600, rdev=(5, 1))
    for path, spec in files.items():
        data, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
        if isinstance(data, str):
            data = data.encode()
        path = path.lstrip("/")
        add_parents(path)
        add(path, 0o100000 | (mode & 0o7777), data)
    add("TRAILER!!!", 0, nlink=1)
    return b"".join(out)


# --------------------------------------------------------------------- run

@dataclasses.dataclass
class GuestResult:
    rc: int | None            # exit status of /test.sh; None if no exit marker
    output: str = dataclasses.field(repr=False)   # full console (kernel + init + script)
    duration: float = 0.0     # wall-clock seconds QEMU ran
    timed_out: bool = False
    qemu_returncode: int | None = None
    cmdline: list[str] = dataclasses.field(default_factory=list, repr=False)
    boot_retries: int = 0     # boots abandoned because the kernel never reached /init

    @property
    def script_output(self) -> str:
        """Console output between the "running /test.sh" line and the marker."""
        start = self.output.find("simvirt-guest: running /test.sh")
        start = 0 if start < 0 else self.output.find("\n", start) + 1
        m = None
        for m in _EXIT_RE.finditer(self.output):
            pass
        return self.output[start:m.start() if m else len(self.output)]

    def describe(self) -> str:
        """Human-readable summary for assertion messages."""
        what = "TIMED OUT" if self.timed_out else f"guest rc={self.rc}"
        return (
            f"{what}, qemu rc={self.qemu_returncode}, {self.duration:.1f}s, "
            f"boot retries {self.boot_retries}\n"
            f"cmdline: {' '.join(self.cmdline)}\n"
            f"----- guest console -----\n{self.output}\n----- end console -----"
        )

    def __str__(self) -> str:
        return self.describe()


def run_guest(
    script: str,
    qemu_args: Sequence[str] = (),
    timeout: float = 120,
    *,
    memory_mb: int = 512,
    files: Mapping[str, bytes | str | tuple[bytes | str, int]] | None = None,
    append: str = "",
    machine: str | None = None,
    boot_timeout: float = 60,
    boot_retries: int = 2,
) -> GuestResult:
    """Boot the guest, run ``script`` as ``/test.sh``, return its exit code.

    Guest RAM is a shared memfd (``memory-backend-memfd,share=on``), as
    vhost-user needs.  ``qemu_args`` are appended verbatim (devices,
    chardevs, ``-smp`` ...).  ``files`` are extra guest files for the
    appended archive.  On timeout QEMU is killed and ``rc`` is None.
    A boot whose kernel prints nothing from /init within ``boot_timeout``
    seconds is abandoned and retried (at most ``boot_retries`` times; see
    ``GuestResult.boot_retries``); ``timeout`` applies to each boot.
    """
    vmlinuz, base_initrd = ensure_guest()
    qemu = require_tool(QEMU)
    files = dict(files or {})
    files["test.sh"] = (script, 0o755)
    overlay = gzip.compress(make_cpio(files), compresslevel=6, mtime=0)

    with tempfile.TemporaryDirectory(prefix="simvirt-guest-run.") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        base = base_initrd.read_bytes()
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + overlay)
        mach = f"{machine},memory-backend=mem" if machine else "memory-backend=mem"
        cmd = [
            qemu, "-accel", "tcg",
            "-m", str(memory_mb),
            "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
            "-machine", mach,
            "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 {append}".strip(),
            *qemu_args,
        ]
        t0 = time.monotonic()
        raw = b""
        retries = 0
        while True:
            attempt, timed_out, stuck, rcode = _run_qemu(cmd, time.monotonic() + timeout,
                                                         boot_timeout)
            raw += attempt
            if stuck and retries < boot_retries:
                # The kernel never reached /init: no virtio driver had been
                # loaded yet (they are modules /init inserts), so this is
                # TCG's intermittent SMP bring-up hang, not the device under
                # test.  Boot again, keeping the stuck console in the output.
                retries += 1
                raw += (f"\n[harness: no '{INIT_MARKER}' within {boot_timeout:.0f}s; "
                        f"QEMU killed, booting again (retry {retries})]\n").encode()
                continue
            timed_out = timed_out or stuck
            break
        duration = time.monotonic() - t0

    output = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "")
    output = _ANSI_RE.sub("", output)   # SeaBIOS/QEMU terminal resets
    rc = None
    for m in _EXIT_RE.finditer(output):
        rc = int(m.group(1))
    return GuestResult(rc=rc, output=output, duration=duration, timed_out=timed_out,
                       qemu_returncode=rcode, cmdline=cmd, boot_retries=retries)


def _run_qemu(cmd: list[str], deadline: float, boot_timeout: float) -> tuple[bytes, bool, bool, int | None]:
    """Run QEMU once; returns (console bytes, timed_out, stuck_before_init, returncode).

    The console is read as it arrives so that a kernel that never reaches
    /init is noticed after ``boot_timeout`` seconds instead of at the end of
    the whole timeout.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    started = time.monotonic()
    chunks: list[bytes] = []
    seen_init = False
    tail = b""
    marker = INIT_MARKER.encode()
    timed_out = stuck = False
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if not seen_init and now - started >= boot_timeout:
                stuck = True
                break
            if sel.select(timeout=min(1.0, deadline - now)):
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                chunks.append(data)
                if not seen_init:
                    # Serial output arrives a few bytes at a time: look in a rolling tail.
                    tail = (tail + data)[-4096:]
                    seen_init = marker in tail
    if timed_out or stuck:
        proc.kill()
    proc.wait()
    try:
        rest = os.read(fd, 1 << 20)
        chunks.append(rest)
    except (BlockingIOError, OSError):
        pass
    proc.stdout.close()
    return b"".join(chunks), timed_out, stuck, proc.returncode


# --------------------------------------------------------------------- self-check

_SELFTEST_SCRIPT = r"""
set -e
echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
test -b /dev/vda
echo "size=$(cat /sys/block/vda/size) serial=$(cat /sys/block/vda/serial) ro=$(cat /sys/block/vda/ro)"
dd if=/dev/urandom of=/tmp/pat bs=1M count=1 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M seek=1 oflag=direct 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=1 iflag=direct 2>/dev/null
echo "guest-sha256 $(sha256sum /tmp/pat | cut -d' ' -f1)"
cmp /tmp/pat /tmp/back
exit 7
"""


def _selftest() -> int:  # pragma: no cover - manual tool
    import hashlib


    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "disk.img"
        img.write_bytes(b"")
        os.truncate(img, 64 << 20)
        res = run_guest(_SELFTEST_SCRIPT, [
            "-drive", f"file={img},format=raw,if=none,id=d0,cache=none",
            "-device", "virtio-blk-pci,drive=d0,serial=abc",
        ])
        print(res.output)
        print(f"rc={res.rc} duration={res.duration:.1f}s")
        m = re.search(r"guest-sha256 ([0-9a-f]{64})", res.output)
        host = hashlib.sha256(img.read_bytes()[1 << 20:2 << 20]).hexdigest()
        ok = (res.rc == 7 and "size=131072 serial=abc ro=0" in res.output
              and m is not None and m.group(1) == host)
        print("SELFTEST", "OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_selftest())
