"""`simvirt bench ping` and `simvirt bench net`: the guest net driver end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "simvirt", "bench", *args, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_ping_gets_every_reply_and_measures_the_eventfd_floor():
    r = _run("ping", "--count", "50")
    assert r["received"] == 50 and r["lost"] == 0
    assert r["driver_busy_poll_us"] > 0
    if len(os.sched_getaffinity(0)) >= 2:
        assert r["pinned_cpus"] is not None and len(set(r["pinned_cpus"])) == 2
    assert 0 < r["rtt_us"]["p50"] <= r["rtt_us"]["p99"] <= r["rtt_us"]["max"]
    assert 0 < r["eventfd_rtt_us"]["p50"]
    assert r["ratio_p50_to_eventfd_p50"] == round(r["rtt_us"]["p50"] / r["eventfd_rtt_us"]["p50"], 3)


def test_interrupt_driven_ping_unpinned_gets_every_reply():
    r = _run("ping", "--count", "30", "--busy-poll-us", "0", "--device-poll-us", "0", "--no-pin")
    assert r["received"] == 30 and r["lost"] == 0 and r["pinned_cpus"] is None


def test_net_tx_frames_are_counted_by_the_device():
    r = _run("net", "--direction", "tx", "--frame-size", "512", "--runtime", "1")
    assert r["frames"] > 1000 and r["drops"] == 0
    # The device saw every frame the guest queued, plus the ARP request of the resolve.
    assert r["frames"] == r["sent"] + 1
    assert abs(r["gbps"] - r["pps"] * 512 * 8 / 1e9) < 1e-3


def test_net_rx_stream_reaches_the_guest():
    r = _run("net", "--direction", "rx", "--frame-size", "1514", "--runtime", "1")
    assert r["frames"] > 1000 and r["drops"] == 0
    assert abs(r["gbps"] - r["frames"] * 1514 * 8 / r["runtime_s"] / 1e9) < 0.01


def test_net_tx_jumbo_frames_grow_the_mtu_and_are_counted():
    r = _run("net", "--direction", "tx", "--frame-size", "65549", "--runtime", "1")
    assert r["frames"] > 100 and r["drops"] == 0 and r["frames"] == r["sent"] + 1
    assert r["gbps"] > 0.5


def test_net_rx_jumbo_frames_fill_64k_buffers():
    r = _run("net", "--direction", "rx", "--frame-size", "65549", "--runtime", "1")
    assert r["frames"] > 100 and r["drops"] == 0 and r["rx_buf"] >= 65549 + 12


def test_net_rx_jumbo_frames_span_page_sized_mergeable_buffers_without_drops():
    """17 pages per frame: the device waits for a refill instead of dropping half-placed frames."""
    r = _run("net", "--direction", "rx", "--frame-size", "65549", "--runtime", "1", "--rx-buf", "4096")
    assert r["frames"] > 100 and r["drops"] == 0 and r["rx_buf"] == 4096
