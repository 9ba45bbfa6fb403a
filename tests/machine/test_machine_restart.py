"""``simvirt run`` restarts device processes that die and reconnects their drivers (issue 7)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from simvirt.control import request

CONFIG = """
[machine]
name = "crashy"
ram = "64M"

[[device]]
type = "blk"
name = "disk"
backend = "file:{image}"
size = "16M"

[[device]]
type = "net"
name = "nic"

[[workload]]
device = "disk"
rw = "randrw"
bs = "4K"
iodepth = 8
verify = true
size = "4M"

[[workload]]
device = "nic"
mode = "ping"
target = "10.0.2.2"
interval = 0.02

[run]
duration = 5
"""


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_killed_devices_are_restarted_and_the_verified_workload_never_notices(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(CONFIG.format(image=tmp_path / "disk.img"))
    ctl = str(tmp_path / "m.ctl")
    proc = subprocess.Popen([sys.executable, "-m", "simvirt", "run", str(cfg), "--control", ctl, "--json",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: os.path.exists(ctl) or proc.poll() is not None, 30, "the machine control socket")
        assert proc.poll() is None, proc.stderr.read()
        pids = request(ctl, {"cmd": "info"})["devices"]
        time.sleep(1.0)
        os.kill(pids["disk"], signal.SIGKILL)
        _wait(lambda: request(ctl, {"cmd": "info"})["devices"]["disk"] != pids["disk"], 15, "the disk's restart")
        time.sleep(0.5)
        os.kill(pids["nic"], signal.SIGKILL)
        _wait(lambda: request(ctl, {"cmd": "info"})["devices"]["nic"] != pids["nic"], 15, "the nic's restart")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = json.loads(out)
    (disk,) = r["workloads"]
    assert disk["errors"] == 0 and disk["verified"] is True and disk["reads_checked"] > 0, err[-3000:]
    assert [(x["device"], x["old_pid"], x["cause"]) for x in r["restarts"]] == [
        ("disk", pids["disk"], "signal 9"), ("nic", pids["nic"], "signal 9")]
    assert all(x["seconds"] < 10 for x in r["restarts"])
    (ping,) = r["net"]
    assert ping["sent"] > 20 and ping["sent"] - ping["lost"] > 20
    assert {d["name"]: d["pid"] for d in r["devices"]} == {x["device"]: x["new_pid"] for x in r["restarts"]}
