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
        out, err = proc.communicate(timeout=150)  # a loaded CI box: shutdown waits on each device
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


BALLOON = """
[machine]
name = "bal"
ram = "64M"

[[device]]
type = "balloon"
name = "bal"
stats_interval = 0.5

[[workload]]
device = "bal"
steps = [{ at = 0.2, size = "48M" }]

[run]
duration = 6
"""


def test_killed_balloon_comes_back_with_the_target_and_the_same_page_count(tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text(BALLOON)
    ctl = str(tmp_path / "b.ctl")
    proc = subprocess.Popen([sys.executable, "-m", "simvirt", "run", str(cfg), "--control", ctl, "--json",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: os.path.exists(ctl) or proc.poll() is not None, 30, "the machine control socket")
        _wait(lambda: request(ctl, {"cmd": "info"})["balloon"]["actual_pages"] == 4096, 15, "the scripted target")
        before = request(ctl, {"cmd": "info"})
        os.kill(before["devices"]["bal"], signal.SIGKILL)
        _wait(lambda: request(ctl, {"cmd": "info"})["devices"]["bal"] != before["devices"]["bal"], 15, "the restart")
        # The new device has the host's target and the guest's count of pages out, and they agree.
        _wait(lambda: request(ctl, {"cmd": "info"})["balloon"].get("actual_pages") == 4096, 10,
              "the balloon's state in the new process")
        after = request(ctl, {"cmd": "info"})["balloon"]
        assert after["target_pages"] == 4096 and after["actual_pages"] == 4096
        # Still handed back to the host: the segment's resident size did not grow back by 16 MiB.
        assert after["resident_bytes"] <= before["balloon"]["resident_bytes"] + (2 << 20)
        out, err = proc.communicate(timeout=150)  # a loaded CI box: shutdown waits on each device
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = json.loads(out)
    assert [x["device"] for x in r["restarts"]] == ["bal"], err[-2000:]
