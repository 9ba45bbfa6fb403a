"""``simvirt bench balloon``: memory really goes back to the host, and comes back empty."""
from __future__ import annotations

import json
import subprocess
import sys

MiB = 1 << 20


def simvirt(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvirt", *args], capture_output=True, text=True, timeout=timeout)


def test_bench_balloon_json():
    r = simvirt("bench", "balloon", "--ram", "512M", "--inflate", "256M", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["benchmark"] == "balloon"
    assert out["ram_bytes"] == 512 * MiB and out["inflate_bytes"] == 256 * MiB
    assert isinstance(out["inflate_s"], float) and 0 < out["inflate_s"] < 60
    assert isinstance(out["deflate_s"], float) and 0 < out["deflate_s"] < 60
    assert out["released_ratio"] >= 0.95
    assert out["deflated_page_reads_zero"] is True
    # The numbers behind the ratio are consistent with it.
    before, after = out["resident_before_bytes"], out["resident_after_inflate_bytes"]
    assert before >= 0.99 * 512 * MiB
    assert before - after >= 0.95 * 256 * MiB
    assert abs((before - after) / (256 * MiB) - out["released_ratio"]) < 1e-3
    # The device process sees the same segment shrink.
    assert out["device_resident_bytes"] <= after + 4 * MiB
    assert out["inflate_gib_per_s"] > 0


def test_bench_balloon_refuses_inflate_not_below_ram():
    r = simvirt("bench", "balloon", "--ram", "64M", "--inflate", "64M", "--json")
    assert r.returncode == 2, r.stdout
    assert "--inflate must be positive and smaller than --ram" in r.stderr
    assert r.stdout == ""
