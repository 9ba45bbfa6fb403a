"""``simvirt bench ...`` dispatch."""
from __future__ import annotations

import argparse
import asyncio
import json

from simvirt.devices.runner import install_uvloop


def run_bench_command(args: argparse.Namespace) -> int:
    install_uvloop()
    if args.bench == "blk":
        from simvirt.bench.blk import BlkBenchOptions, format_human, run_blk_bench
        o = BlkBenchOptions(connect=args.connect, backend=args.backend, rw=args.rw, bs=args.bs, iodepth=args.iodepth,
                            runtime=args.runtime, size=args.size, verify=args.verify, num_queues=args.num_queues,
                            queue_size=args.queue_size, mix=args.mix, guest_ram=args.guest_ram, poll_us=args.poll_us)
        result = asyncio.run(run_blk_bench(o))
        print(json.dumps(result) if args.json else format_human(result))
        if result["verified"] is False or result["errors"]:
            return 1
        return 0
    raise ValueError(f"unknown benchmark {args.bench}")
