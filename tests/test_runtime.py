"""Host-side safety (simvirt/runtime.py): owner-only sockets, a private runtime directory."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from simvirt.control import serve_control
from simvirt.runtime import RuntimeDirError, bind_unix, check_private_dir, runtime_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_listening_sockets_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)          # the most permissive umask: bind() would make the socket 0777
    try:
        s = bind_unix(str(tmp_path / "a.sock"))
    finally:
        os.umask(old)
    try:
        assert _mode(tmp_path / "a.sock") == 0o600
    finally:
        s.close()


def test_control_socket_is_owner_only_and_works(tmp_path):
    path = str(tmp_path / "c.ctl")

    async def main() -> dict:
        srv = await serve_control(path, lambda req: {"echo": req["cmd"]})
        try:
            assert _mode(path) == 0o600
            from simvirt.control import request
            return await asyncio.get_running_loop().run_in_executor(None, request, path, {"cmd": "hi"})
        finally:
            srv.close()

    old = os.umask(0)
    try:
        assert asyncio.run(main()) == {"ok": True, "echo": "hi"}
    finally:
        os.umask(old)


def test_device_vhost_user_socket_is_owner_only(tmp_path):
    sock = tmp_path / "blk.sock"
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-c", "import os, sys; os.umask(0); from simvirt.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", "device", "blk", "--socket", str(sock),
                          "--null", "1M"], env=env)
    try:
        for _ in range(200):
            if sock.exists() or p.poll() is not None:
                break
            time.sleep(0.05)
        assert stat.S_ISSOCK(os.stat(sock).st_mode) and _mode(sock) == 0o600
    finally:
        p.terminate()
        p.wait(10)


def test_runtime_dir_is_created_private(tmp_path, monkeypatch):
    monkeypatch.delenv("SIMVIRT_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = runtime_dir()
    assert d == str(tmp_path / "simvirt") and _mode(d) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o701])
def test_runtime_dir_others_can_enter_is_refused(tmp_path, monkeypatch, mode):
    d = tmp_path / "rt"
    d.mkdir()
    d.chmod(mode)
    monkeypatch.setenv("SIMVIRT_RUNTIME_DIR", str(d))
    with pytest.raises(RuntimeDirError, match="chmod 700"):
        runtime_dir()


def test_runtime_dir_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(RuntimeDirError, match="not a directory"):
        check_private_dir(str(link))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a directory owned by another user")
def test_runtime_dir_owned_by_someone_else_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(RuntimeDirError, match="belongs to uid 65534"):
        check_private_dir(str(d))


def test_metrics_and_machine_scrape_ports_default_to_loopback():
    from simvirt.cli import build_parser
    ap = build_parser()
    for argv in (["device", "blk", "--socket", "x", "--null", "1M"], ["device", "net", "--socket", "x"],
                 ["device", "balloon", "--socket", "x"], ["run"]):
        assert ap.parse_args(argv).metrics_addr == "127.0.0.1", argv


def test_guest_ram_segment_is_owner_only():
    from simvirt.memory import GuestMemory
    old = os.umask(0)
    try:
        mem = GuestMemory.create_shared(1 << 20)
    finally:
        os.umask(old)
    try:
        assert _mode(f"/dev/shm/{mem.shm_name.lstrip('/')}") == 0o600
    finally:
        mem.close()
