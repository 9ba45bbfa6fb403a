"""`simvirt run --metrics-port`: one scrape address for the driver and every device process."""
from __future__ import annotations

from pathlib import Path
import collections
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from simvirt.bench.procs import free_port

# The default machine config (simvirt run with no argument runs the default scenario instead).
MACHINE = str(Path(__file__).resolve().parents[2] / "configs" / "machine.toml")


def test_one_scrape_address_covers_every_process_without_duplicate_series():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "simvirt", "run", MACHINE, "--duration", "6", "--no-progress",
                             "--metrics-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        text = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                if 'device="balloon0"' in text and 'op="read"' in text:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        seen = collections.Counter()
        by_name = collections.defaultdict(list)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                seen[(s.name, tuple(sorted(s.labels.items())))] += 1
                by_name[s.name].append(s.labels)
        assert [k for k, n in seen.items() if n > 1] == []
        devices = {lab.get("device") for lab in by_name["simvirt_requests_total"]}
        assert {"vda", "vdb", "net0"} <= devices
        roles = {lab.get("role") for lab in by_name["simvirt_process_cpu_seconds_total"]}
        assert roles == {"driver", "device-vda", "device-vdb", "device-net0", "device-balloon0"}
        assert by_name["simvirt_guest_ram_resident_bytes"] and by_name["simvirt_balloon_pages"]
        assert all(lab.get("vm") == "demo" for lab in by_name["simvirt_kicks_received_total"])
        # docs/metrics.md names every family a machine exports.
        import pathlib

        doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
        families = {fam.name for fam in text_string_to_metric_families(text) if fam.name.startswith("simvirt_")}
        assert families and not [f for f in families if f not in doc and f + "_total" not in doc]
    finally:
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
