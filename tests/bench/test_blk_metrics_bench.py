"""`simvirt bench blk-metrics`: both devices run, the scraper scrapes, the ratio is computed."""
from __future__ import annotations

import json
import subprocess
import sys


def test_blk_metrics_overhead_report():
    out = subprocess.run([sys.executable, "-m", "simvirt", "bench", "blk-metrics", "--rounds", "2", "--runtime", "1.5",
                          "--json"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert len(r["iops_with_metrics"]) == len(r["iops_without_metrics"]) == 2
    assert min(r["iops_with_metrics"] + r["iops_without_metrics"]) > 1000
    assert r["scrapes"] >= 2
    assert r["overhead"] == round(1 - r["median_with"] / r["median_without"], 4)


def test_no_metrics_device_really_skips_request_accounting(tmp_path):
    """--no-metrics leaves simvirt_requests_total at zero while I/O flows."""
    from simvirt.bench.procs import DeviceProcess
    from simvirt.bench.procs import free_port
    from simvirt.metrics import scrape

    port = free_port()
    dev = DeviceProcess("blk", ["--null", "64M", "--no-metrics", "--metrics-port", str(port)])
    try:
        sock = dev.wait_ready()
        res = subprocess.run([sys.executable, "-m", "simvirt", "bench", "blk", "--connect", sock, "--runtime", "0.5",
                              "--json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and json.loads(res.stdout)["ios"] > 100
        assert scrape(port, "simvirt_requests_total", op="read") == 0
        assert scrape(port, "simvirt_chains_processed_total") > 100  # ring bookkeeping still counts
    finally:
        dev.stop()
