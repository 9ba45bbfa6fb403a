"""``simvirt bench blk-metrics``: the cost of metrics on the blk hot path.

Two null devices driven by the same driver and workload (4 KiB randread
QD32) in alternating rounds: one with per-request accounting off, one with
it on *and* a Prometheus-like scraper reading its /metrics once a second.
The report is the ratio of median IOPS; the budget is 5 %.
"""
from __future__ import annotations

import statistics
import threading
import urllib.request
from dataclasses import replace

from simvirt.bench.blk import BlkBenchOptions, run_blk_bench
from simvirt.bench.procs import DeviceProcess
from simvirt.bench.procs import free_port


def _scraper(port: int, stop: threading.Event, counter: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            counter[0] += 1
        except OSError:
            pass


async def run_metrics_overhead(o: BlkBenchOptions, rounds: int) -> dict:
    port = free_port()
    plain = DeviceProcess("blk", ["--null", "1G", "--no-metrics"])
    counted = DeviceProcess("blk", ["--null", "1G", "--metrics-port", str(port)])
    stop = threading.Event()
    scrapes = [0]
    t = threading.Thread(target=_scraper, args=(port, stop, scrapes), daemon=True)
    try:
        socks = {"without": plain.wait_ready(), "with": counted.wait_ready()}
        t.start()
        iops: dict[str, list[float]] = {"without": [], "with": []}
        for r in range(rounds):
            order = ["without", "with"] if r % 2 == 0 else ["with", "without"]
            for name in order:
                res = await run_blk_bench(replace(o, connect=socks[name]))
                iops[name].append(res["iops"])
        a, b = statistics.median(iops["without"]), statistics.median(iops["with"])
        return {
            "benchmark": "blk-metrics",
            "rw": o.rw, "bs": o.bs, "iodepth": o.iodepth, "rounds": rounds, "runtime_per_round_s": o.runtime,
            "iops_without_metrics": iops["without"], "iops_with_metrics": iops["with"],
            "median_without": a, "median_with": b,
            "overhead": round(1 - b / a, 4) if a else None,
            "scrapes": scrapes[0],
        }
    finally:
        stop.set()
        plain.stop()
        counted.stop()
