"""``simvirt ctl SOCKET COMMAND``: exit codes, what it prints, and what it really changes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "devices" / "balloon"))
from balloon_testlib import BalloonProc, MiB, RawBalloon, wait_for  # noqa: E402

from simvirt.cli import main  # noqa: E402
from simvirt.ctl import build_request  # noqa: E402


def simvirt(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvirt", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def device():
    dev = BalloonProc(metrics=False)
    yield dev
    dev.stop()


@pytest.fixture
def guest(device):
    r = RawBalloon(device.socket_path, ram=128 * MiB)
    yield r
    r.close()


def test_build_request():
    assert build_request("balloon", ["64M"]) == {"cmd": "balloon", "size": 64 * MiB}
    assert build_request("balloon", ["4096"]) == {"cmd": "balloon", "size": 4096}
    assert build_request("balloon-stats", []) == {"cmd": "balloon-stats"}
    assert build_request("info", []) == {"cmd": "info"}
    with pytest.raises(ValueError, match="usage: simvirt ctl SOCKET balloon SIZE"):
        build_request("balloon", [])
    with pytest.raises(ValueError, match="usage"):
        build_request("balloon", ["1M", "2M"])
    with pytest.raises(ValueError, match="invalid size"):
        build_request("balloon", ["lots"])
    with pytest.raises(ValueError, match="takes no arguments"):
        build_request("info", ["x"])
    with pytest.raises(ValueError, match="unknown command 'pop'"):
        build_request("pop", [])


def test_ctl_balloon_sets_the_target_process(device, guest):
    """The real CLI in its own process: exit 0, a human summary, and the device's target changed."""
    r = simvirt("ctl", device.control_path, "balloon", "64M")
    assert r.returncode == 0, r.stderr
    assert "guest RAM 128M; balloon target 16384 pages (64M), actual 0 pages" in r.stdout
    assert guest.config()[0] == 16384
    assert device.info()["target_pages"] == 16384


def test_ctl_balloon_refused_exits_1_with_the_reason(device, guest):
    r = simvirt("ctl", device.control_path, "balloon", "1G")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip() == "simvirt ctl: target guest memory 1073741824 must be in (0, 134217728]"


def test_ctl_missing_socket_exits_non_zero_with_a_clear_message():
    path = os.path.join(tempfile.mkdtemp(prefix="simvirt-ctl-test-"), "nope.sock")
    r = simvirt("ctl", path, "info")
    assert r.returncode == 2
    assert f"cannot reach control socket {path}" in r.stderr
    assert "Traceback" not in r.stderr


def test_ctl_info_and_stats(device, guest, capsys):
    guest.fe.set_config(4, (123).to_bytes(4, "little"))
    assert main(["ctl", device.control_path, "balloon", "96M"]) == 0
    out = capsys.readouterr().out
    assert "balloon target 8192 pages (32M)" in out
    assert main(["ctl", device.control_path, "info"]) == 0
    out = capsys.readouterr().out
    assert "guest RAM 128M; balloon target 8192 pages (32M), actual 123 pages" in out
    assert "host-resident" in out
    assert main(["ctl", device.control_path, "balloon-stats", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["ok"] is True and reply["actual_pages"] == 123 and reply["ram_bytes"] == 128 * MiB


def _no_guest(device) -> None:
    wait_for(lambda: device.info()["ram_bytes"] == 0, 5, "the previous guest to be gone")


def test_ctl_json_error_reply(device, capsys):
    # No guest connected in this test: the device cannot know the RAM size.
    _no_guest(device)
    assert main(["ctl", device.control_path, "balloon", "1M", "--json"]) == 1
    reply = json.loads(capsys.readouterr().out)
    assert reply == {"ok": False, "error": "no guest connected: guest RAM size unknown"}


def test_ctl_no_guest(device, capsys):
    _no_guest(device)
    assert main(["ctl", device.control_path, "balloon", "1M"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "simvirt ctl: no guest connected: guest RAM size unknown"


@pytest.mark.parametrize("args,needle", [
    (["balloon"], "usage: simvirt ctl SOCKET balloon SIZE"),
    (["balloon", "12Q"], "invalid size '12Q'"),
    (["balloon", "1M", "2M"], "usage"),
    (["info", "now"], "info takes no arguments"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_ctl_usage_errors_exit_2(device, capsys, args, needle):
    assert main(["ctl", device.control_path, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simvirt: error: ")
    assert needle in err
    assert device.alive and device.info()["ok"]


def test_ctl_stale_socket_file(capsys):
    path = os.path.join(tempfile.mkdtemp(prefix="simvirt-ctl-test-"), "stale.sock")
    so = socket.socket(socket.AF_UNIX)
    so.bind(path)
    so.close()  # a socket file nobody listens on
    assert main(["ctl", path, "info"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach control socket {path}" in err


def test_ctl_missing_socket_in_process(capsys):
    assert main(["ctl", "/nonexistent/dir/ctl.sock", "balloon", "64M"]) == 2
    assert "cannot reach control socket /nonexistent/dir/ctl.sock" in capsys.readouterr().err


def test_impair_and_stream_requests_use_the_scenario_syntax():
    assert build_request("impair", ["delay=2ms", "jitter=0.5ms", "loss=1%", "rate=10mbit", "direction=both"]) == {
        "cmd": "impair", "delay": 0.002, "jitter": 0.0005, "loss": 0.01, "rate": 1e7, "direction": "both"}
    assert build_request("impair", ["iops=1000", "bandwidth=10M", "error_rate=0.5"]) == {
        "cmd": "impair", "iops": 1000, "bandwidth": 10 << 20, "error_rate": 0.5}
    assert build_request("impair", []) == {"cmd": "impair"}          # clears
    with pytest.raises(ValueError, match="mixes net and blk keys"):
        build_request("impair", ["delay=2ms", "iops=10"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        build_request("impair", ["delay"])
    with pytest.raises(ValueError, match="loss: expected a fraction"):
        build_request("impair", ["loss=lots"])
    assert build_request("stream", ["1514", "2000"]) == {"cmd": "stream", "frame_size": 1514, "rate_pps": 2000.0}
    assert build_request("stream", ["stop"]) == {"cmd": "stream", "stop": True}


def test_ctl_impair_reaches_a_blk_device_and_a_bad_value_is_refused(tmp_path):
    from simvirt.bench.procs import DeviceProcess
    ctl = str(tmp_path / "blk.ctl")
    with DeviceProcess("blk", ["--null", "64M", "--control", ctl]) as _dev:
        r = simvirt("ctl", ctl, "impair", "iops=1000", "latency=1ms", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["impair"]["iops"] == 1000
        r = simvirt("ctl", ctl, "info", "--json")
        assert json.loads(r.stdout)["impair"]["latency"] == 0.001
        r = simvirt("ctl", ctl, "impair", "delay=2ms")       # a net key at a blk device: the device says no
        assert r.returncode == 1 and "delay" in r.stderr
        r = simvirt("ctl", ctl, "impair")
        assert r.returncode == 0 and json.loads(simvirt("ctl", ctl, "info", "--json").stdout)["impair"] == {}
