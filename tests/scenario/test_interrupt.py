"""Ctrl-C (SIGINT) or SIGTERM in the middle of a scenario: the running phase ends now, every kind
of job winds down cleanly, the report covers what ran, and no VM or device process is left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

SCENARIO = """
[scenario]
name = "interrupted"

[machine]
ram = "256M"

[[device]]
type = "blk"
name = "vda"
backend = "memory"
size = "64M"

[[device]]
type = "net"
name = "net0"

[[device]]
type = "balloon"
name = "balloon0"

[[phase]]
name = "long"
duration = "60s"
[[phase.job]]
name = "disk"
kind = "blk"
device = "vda"
rw = "randrw"
iodepth = 8
size = "16M"
verify = true
[[phase.job]]
name = "ping"
kind = "ping"
device = "net0"
interval = "20ms"
[[phase.job]]
name = "rr"
kind = "udp-rr"
device = "net0"
[[phase.job]]
name = "tx"
kind = "tx"
device = "net0"
frame_size = 1514
rate_pps = 2000
[[phase.job]]
name = "squeeze"
kind = "balloon"
device = "balloon0"
target = "192M"
at = "50s"
[[phase.job]]
name = "hog"
kind = "pressure"
size = "16M"
at = "50s"
[[phase.fault]]
device = "vda"
action = "kill"
at = "50s"

[[phase]]
name = "never"
duration = "60s"
[[phase.job]]
name = "ping2"
kind = "ping"
device = "net0"
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_running_phase_and_reports_it(tmp_path, sig):
    f = tmp_path / "interrupted.toml"
    f.write_text(SCENARIO)
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "simvirt", "run", str(f), "--json", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 90
        while "phase 1/2 'long'" not in (tmp_path / "stderr").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(3)
        t_sig = time.monotonic()
        proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    log = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert took < 30, log[-3000:]                   # not the 50 s left in the phase
    r = json.loads(stdout)
    assert r["stopped_early"] is True and r["ok"] is True, r["errors"]
    (phase,) = r["phases"]                         # 'never' never started
    assert phase["name"] == "long" and phase["stopped_early"] is True
    assert phase["faults"] == []                   # the kill at 50 s was not due
    jobs = {j["name"]: j for j in phase["jobs"]}
    assert set(jobs) == {"disk", "ping", "rr", "tx", "squeeze", "hog"}
    assert jobs["disk"]["verified"] is True and jobs["disk"]["summary"]["errors"] == 0
    assert jobs["disk"]["runtime_s"] < 30
    assert jobs["ping"]["ping"]["sent"] > 20 and jobs["ping"]["ping"]["lost"] == 0
    assert jobs["rr"]["rr"]["transactions"] > 0 and jobs["tx"]["stream"]["frames"] > 0
    assert jobs["squeeze"]["summary"]["errors"] == 0 and jobs["squeeze"]["balloon"]["took_s"] is None
    assert jobs["hog"]["pressure"]["allocated"] == 0 and jobs["hog"]["pressure"]["took_s"] is None
    assert "phase 'long' ends now" in log
    pids = [vm["pid"] for vm in r["vms"]] + [d["pid"] for vm in r["vms"] for d in vm["devices"] if d["pid"]]
    assert len(pids) == 4
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
