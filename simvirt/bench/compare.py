"""``simvirt bench blk-compare``: our null device vs qemu-storage-daemon's null-co.

Both backends are driven by the same simvirt driver with the same workload,
in alternating short rounds within one run, so machine noise hits both
alike; the report gives each side's median and the ratio of medians.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import replace
from typing import Optional

from simvirt.bench.blk import BlkBenchOptions, run_blk_bench
from simvirt.bench.procs import ChildExited, DeviceProcess, stop_child, wait_for_path


class QsdProcess:
    """qemu-storage-daemon exporting a null-co (or file) node over vhost-user-blk."""

    def __init__(self, size: int, image: Optional[str] = None) -> None:
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise FileNotFoundError("qemu-storage-daemon not found (Debian package qemu-system-common)")
        self.dir = tempfile.mkdtemp(prefix="simvirt-qsd-")
        self.socket_path = os.path.join(self.dir, "qsd.sock")
        if image is None:
            node = f"driver=null-co,node-name=n0,size={size}"
        else:
            node = f"driver=file,node-name=n0,filename={image}"
        self.proc = subprocess.Popen(
            [qsd, "--blockdev", node, "--export",
             f"type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,addr.path={self.socket_path},writable=on"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 15.0) -> str:
        try:
            wait_for_path([self.socket_path], self.proc, timeout)
        except ChildExited:
            raise RuntimeError(f"qemu-storage-daemon exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}") from None
        except TimeoutError:
            raise TimeoutError("qemu-storage-daemon socket did not appear") from None
        return self.socket_path

    def stop(self) -> None:
        stop_child(self.proc)


async def run_compare(o: BlkBenchOptions, rounds: int = 5) -> dict:
    size = o.size or (1 << 30)
    ours = DeviceProcess("blk", ["--null", str(size)])
    qsd = QsdProcess(size)
    try:
        ours_sock = ours.wait_ready()
        qsd_sock = qsd.wait_ready()
        results: dict[str, list[dict]] = {"simvirt": [], "qsd": []}
        for r in range(rounds):
            order = [("simvirt", ours_sock), ("qsd", qsd_sock)]
            if r % 2:
                order.reverse()
            for name, sock in order:
                res = await run_blk_bench(replace(o, connect=sock, size=size))
                results[name].append(res)
        summary = {}
        for name, rs in results.items():
            iops = [x["iops"] for x in rs]
            summary[name] = {
                "iops_median": statistics.median(iops),
                "iops_rounds": iops,
                "lat_p50_us_median": statistics.median(x["lat_us"]["p50"] for x in rs),
                "lat_p99_us_median": statistics.median(x["lat_us"]["p99"] for x in rs),
                "errors": sum(x["errors"] for x in rs),
            }
        ratio = summary["simvirt"]["iops_median"] / summary["qsd"]["iops_median"] if summary["qsd"]["iops_median"] else None
        return {
            "benchmark": "blk-compare",
            "rw": o.rw, "bs": o.bs, "iodepth": o.iodepth, "runtime_per_round_s": o.runtime, "rounds": rounds,
            "simvirt_null": summary["simvirt"],
            "qsd_null_co": summary["qsd"],
            "ratio_iops": round(ratio, 3) if ratio else None,
        }
    finally:
        ours.stop()
        qsd.stop()
