"""A running scenario tells Prometheus which phase it is in, next to every VM's and device's metrics."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from simvirt.bench.procs import free_port

SCENARIO = """
[scenario]
name = "two-phases"
[[device]]
type = "blk"
name = "vda"
backend = "null"
size = "64M"
[[phase]]
name = "first"
duration = "2s"
[[phase.job]]
kind = "blk"
device = "vda"
[[phase]]
name = "second"
duration = "4s"
[[phase.job]]
kind = "blk"
device = "vda"
rw = "randwrite"
"""


def _samples(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_phase_gauges_follow_the_timeline_and_vm_metrics_are_federated(tmp_path):
    f = tmp_path / "two.toml"
    f.write_text(SCENARIO)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "simvirt", "run", str(f), "--no-progress", "--json",
                             "--metrics-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen_index: set[float] = set()
        writes_seen = False
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                fams = _samples(port)
            except OSError:
                time.sleep(0.2)
                continue
            idx = [s.value for s in fams.get("simvirt_scenario_phase_index", [])]
            seen_index.update(idx)
            running = {s.labels["phase"] for s in fams.get("simvirt_scenario_phase", []) if s.value == 1}
            if idx == [1.0]:
                assert running == {"second"}
                writes_seen = writes_seen or any(
                    s.labels.get("op") == "write" and s.labels.get("vm") == "vm0" and s.value > 0
                    for s in fams.get("simvirt_requests", []))
            time.sleep(0.3)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert {0.0, 1.0} <= seen_index
        assert writes_seen, "the device's write counter never reached the scenario's scrape address"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
