"""``simvirt run``: the embedded default machine and a small machine with a balloon and a control socket."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from simvirt.control import ControlError, request
from simvirt.machine.config import parse_config
from simvirt.machine.run import Machine

# The default machine config (simvirt run with no argument runs the default scenario instead).
MACHINE = str(Path(__file__).resolve().parents[2] / "configs" / "machine.toml")

MiB = 1 << 20


def simvirt(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvirt", *args], capture_output=True, text=True, timeout=timeout)


def test_default_machine_runs_and_reports_json():
    r = simvirt("run", MACHINE, "--duration", "2", "--json", "--no-progress", timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # stdout is the JSON and nothing else (logs go to stderr)
    assert out["ok"] is True
    assert out["machine"] == "demo" and out["config"] == MACHINE
    assert 1.5 <= out["duration_s"] < 10
    assert [d["name"] for d in out["devices"]] == ["vda", "vdb", "net0", "balloon0"]
    (ping,) = out["net"]
    assert ping["device"] == "net0" and ping["mode"] == "ping" and ping["sent"] > 5 and ping["lost"] == 0
    assert all(isinstance(d["pid"], int) and d["pid"] > 0 for d in out["devices"])
    wl = {w["device"]: w for w in out["workloads"]}
    assert set(wl) == {"vda", "vdb"}
    for w in wl.values():
        assert w["errors"] == 0
        assert w["ios"] > 0 and w["iops"] > 0
    assert wl["vda"]["verified"] is True
    assert wl["vda"]["reads_checked"] > 0 and wl["vda"]["blocks_read_back"] > 0
    assert wl["vdb"]["verified"] is None
    bal = out["balloon"]
    assert bal["ram_bytes"] == 256 * MiB
    assert bal["features"] == ["MUST_TELL_HOST", "STATS_VQ", "DEFLATE_ON_OOM", "PAGE_REPORTING"]
    # The first scripted step (192M at 3 s) may or may not have fired within a 2 s run
    # (see test_balloon_steps_are_timed_from_the_workload_start); nothing else can have.
    assert bal["target_pages"] in (0, 16384)
    assert 0 <= bal["actual_pages"] <= bal["target_pages"]
    assert bal["stats"]["total_memory"] == 256 * MiB
    assert 0 < bal["stats"]["free_memory"] < 256 * MiB


CONFIG = """
[machine]
name = "ctltest"
ram = "64M"

[[device]]
type = "blk"
name = "disk"
backend = "memory"
size = "8M"

[[device]]
type = "balloon"
name = "bal"
stats_interval = 0.5
report_interval = 0.5

[[workload]]
device = "disk"
rw = "randrw"
bs = "4K"
iodepth = 4
verify = true
size = "2M"

[[workload]]
device = "bal"
steps = [{ at = 0.2, size = "48M" }]

[run]
duration = 4
"""


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def _machine(config: str, ctl: str, *args: str) -> Iterator[subprocess.Popen]:
    """``simvirt run CONFIG --control CTL --json``, yielded once its control socket is up; killed if
    the test leaves it running."""
    proc = subprocess.Popen([sys.executable, "-m", "simvirt", "run", config, "--control", ctl, "--json", "--no-progress",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: os.path.exists(ctl) or proc.poll() is not None, 30, "the machine control socket")
        assert proc.poll() is None, proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _report(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for the machine to end; it must exit 0 with its JSON report."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout)


def test_small_machine_with_balloon_and_control_socket(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(CONFIG)
    ctl = str(tmp_path / "machine.ctl")
    with _machine(str(cfg), ctl) as proc:
        # `simvirt ctl PATH info` lists the devices with their pids.
        r = simvirt("ctl", ctl, "info", "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["ok"] is True and info["machine"] == "ctltest" and info["ram_bytes"] == 64 * MiB
        assert sorted(info["devices"]) == ["bal", "disk"]
        assert all(isinstance(p, int) and p > 0 for p in info["devices"].values())
        assert info["balloon"]["ram_bytes"] == 64 * MiB

        # The scripted step (48M at 0.2 s) takes 4096 pages; the driver follows.
        _wait(lambda: request(ctl, {"cmd": "info"})["balloon"]["actual_pages"] == 4096, 10, "the scripted target")

        # balloon-stats through the machine socket, pretty-printed by the CLI.
        r = simvirt("ctl", ctl, "balloon-stats")
        assert r.returncode == 0, r.stderr
        assert "guest RAM 64M; balloon target 4096 pages (16M), actual 4096 pages" in r.stdout
        assert "free_memory" in r.stdout and "total_memory" in r.stdout

        # A balloon command is forwarded to the device; a bad one comes back as an error.
        r = simvirt("ctl", ctl, "balloon", "32M")
        assert r.returncode == 0, r.stderr
        assert "balloon target 8192 pages (32M)" in r.stdout
        r = simvirt("ctl", ctl, "balloon", "1G")
        assert r.returncode == 1
        assert "must be in (0, 67108864]" in r.stderr
        reply = request(ctl, {"cmd": "reboot"})
        assert reply["ok"] is False and "unknown command 'reboot'" in reply["error"]
        _wait(lambda: request(ctl, {"cmd": "info"})["balloon"]["actual_pages"] == 8192, 10, "the new target")
        free = request(ctl, {"cmd": "info"})["guest_free_bytes"]
        assert free <= 64 * MiB - 8192 * 4096

        out = _report(proc, timeout=30)
    assert out["ok"] is True
    [w] = out["workloads"]
    assert w["device"] == "disk" and w["errors"] == 0 and w["verified"] is True
    assert out["balloon"]["target_pages"] == 8192 and out["balloon"]["actual_pages"] == 8192
    assert out["balloon"]["guest_memory_bytes"] == 32 * MiB
    assert not os.path.exists(ctl) or _refused(ctl)


def _refused(path: str) -> bool:
    try:
        request(path, {"cmd": "info"}, timeout=1)
    except OSError:
        return True
    return False


def test_machine_without_balloon_refuses_balloon_commands(tmp_path):
    cfg = parse_config('[machine]\nram = "32M"\n[[device]]\ntype = "blk"\nname = "d"\n', "t.toml")
    from rich.console import Console

    m = Machine(cfg, Console(file=open(os.devnull, "w")))

    async def go():
        with pytest.raises(ControlError, match="no balloon device"):
            await m.control({"cmd": "balloon", "size": 1})
        with pytest.raises(ControlError, match="no balloon device"):
            await m.control({"cmd": "balloon-stats"})
        with pytest.raises(ControlError, match="unknown command 'x'"):
            await m.control({"cmd": "x"})
        info = await m.control({"cmd": "info"})
        assert info["machine"] == "sim" and info["ram_bytes"] == 32 * MiB and "balloon" not in info

    asyncio.run(go())
    os.rmdir(m.workdir)


def test_balloon_steps_are_timed_from_the_workload_start(monkeypatch):
    """``at`` counts from the start of the workloads, so a step after the end of the run never fires,
    however long the verification prefill before the workloads takes."""
    from rich.console import Console

    from simvirt.machine import run as runmod

    real_prefill = runmod.prefill

    async def slow_prefill(*args, **kw):
        await asyncio.sleep(1.6)  # e.g. a large verify area
        return await real_prefill(*args, **kw)

    monkeypatch.setattr(runmod, "prefill", slow_prefill)
    cfg = parse_config("""
[machine]
name = "steptime"
ram = "32M"
[[device]]
type = "blk"
name = "d"
size = "4M"
[[device]]
type = "balloon"
name = "b"
stats_interval = 0
report_interval = 0
[[workload]]
device = "d"
rw = "randread"
iodepth = 2
verify = true
size = "256K"
[[workload]]
device = "b"
steps = [{ at = 1.4, size = "16M" }]
[run]
duration = 1.0
""", "steptime.toml")
    with open(os.devnull, "w") as devnull:
        out = asyncio.run(runmod.run_machine(cfg, metrics_port=None, progress=False, console=Console(file=devnull)))
    assert out["ok"] is True
    assert out["balloon"]["target_pages"] == 0, "the step at 1.4 s fired inside a 1.0 s run"


def test_udp_tx_workload_streams_to_the_discard_port(tmp_path):
    cfg = tmp_path / "udp.toml"
    cfg.write_text('[machine]\nram = "64M"\n[[device]]\ntype = "net"\nname = "n"\n'
                   '[[workload]]\ndevice = "n"\nmode = "udp-tx"\nframe_size = 1000\n[run]\nduration = 1\n')
    r = simvirt("run", str(cfg), "--json", "--no-progress", timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    (tx,) = json.loads(r.stdout)["net"]
    assert tx["mode"] == "udp-tx" and tx["frames"] > 1000
    assert tx["gbps"] == pytest.approx(tx["pps"] * 1000 * 8 / 1e9, rel=0.01)


def _run_until_sigterm(config: str, tmp_path, after: float) -> dict:
    """``simvirt run CONFIG --duration 120``, SIGTERM ``after`` s past its control socket; its JSON."""
    with _machine(config, str(tmp_path / "machine.ctl"), "--duration", "120") as proc:
        time.sleep(after)
        proc.terminate()
        out = _report(proc, timeout=60)
    assert out["stopped_early"] is True and out["ok"] is True
    assert out["duration_s"] < 60            # the net job ended with the rest, not at its 120 s deadline
    return out


def test_sigterm_ends_the_default_machine_early_with_a_full_report(tmp_path):
    """SIGTERM mid-run: every workload (disk, ping) stops, the disks are verified, the report
    says it stopped early, and nothing counts as failed: pings in flight get their replies."""
    out = _run_until_sigterm(MACHINE, tmp_path, after=3)     # past the prefill: disks and ping are running
    (ping,) = out["net"]
    assert "error" not in ping and ping["sent"] > 0 and ping["lost"] == 0
    wl = {w["device"]: w for w in out["workloads"]}
    assert wl["vda"]["verified"] is True and wl["vda"]["ios"] > 0
    assert all(w["errors"] == 0 for w in wl.values())


def test_sigterm_stops_a_udp_stream(tmp_path):
    cfg = tmp_path / "udp.toml"
    cfg.write_text('[machine]\nram = "64M"\n[[device]]\ntype = "net"\nname = "n"\n'
                   '[[workload]]\ndevice = "n"\nmode = "udp-tx"\nframe_size = 1000\n')
    (tx,) = _run_until_sigterm(str(cfg), tmp_path, after=1)["net"]
    assert "error" not in tx and tx["frames"] > 1000
