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
    if args.bench == "net":
        from simvirt.bench.net import run_net_bench
        r = asyncio.run(run_net_bench(args.direction, args.frame_size, args.runtime, args.connect, pin=not args.no_pin,
                                      rx_buf=args.rx_buf))
        if args.json:
            print(json.dumps(r))
        else:
            print(f"net {r['direction']} {r['frame_size']}-byte frames: {r['pps']:,.0f} pps, {r['gbps']} Gbps, "
                  f"drops {r['drops']}")
        return 0
    if args.bench == "net-dpdk":
        from simvirt.bench.net_dpdk import run_net_dpdk_bench
        r = run_net_dpdk_bench(args.runtime)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"virtio_user txonly 64B: into simvirt {r['simvirt_device_pps']:,.0f} pps, "
                  f"into DPDK vhost {r['dpdk_vhost_pps']:,.0f} pps, ratio {r['ratio_pps']}")
        return 0
    if args.bench == "ping":
        from simvirt.bench.ping import run_ping_bench
        r = asyncio.run(run_ping_bench(args.connect, args.count, args.interval, args.poll_us,
                                       busy_poll_us=args.busy_poll_us, device_poll_us=args.device_poll_us,
                                       pin=not args.no_pin))
        if args.json:
            print(json.dumps(r))
        else:
            lat, fl = r["rtt_us"], r["eventfd_rtt_us"]
            print(f"ping 10.0.2.2: {r['received']}/{r['count']} replies, lost {r['lost']}")
            print(f"  rtt us: p50={lat['p50']} p99={lat['p99']} max={lat['max']}")
            print(f"  eventfd round trip us: p50={fl['p50']} p99={fl['p99']}  (ratio p50 {r['ratio_p50_to_eventfd_p50']})")
        return 0 if r["lost"] == 0 else 1
    if args.bench == "balloon":
        from simvirt.bench.balloon import run_balloon_bench
        r = asyncio.run(run_balloon_bench(args.ram, args.inflate))
        if args.json:
            print(json.dumps(r))
        else:
            print(f"balloon: inflate {r['inflate_bytes'] >> 20} MiB of {r['ram_bytes'] >> 20} MiB in {r['inflate_s']} s "
                  f"({r['released_ratio'] * 100:.1f}% handed back), deflate in {r['deflate_s']} s")
        return 0
    if args.bench == "blk-metrics":
        from simvirt.bench.blk import BlkBenchOptions
        from simvirt.bench.metrics_overhead import run_metrics_overhead
        r = asyncio.run(run_metrics_overhead(BlkBenchOptions(runtime=args.runtime), args.rounds))
        if args.json:
            print(json.dumps(r))
        else:
            print(f"blk metrics overhead: {r['overhead'] * 100:.1f}% (median IOPS {r['median_with']:.0f} with vs "
                  f"{r['median_without']:.0f} without, {r['scrapes']} scrapes)")
        return 0
    if args.bench == "blk-compare":
        from simvirt.bench.blk import BlkBenchOptions
        from simvirt.bench.compare import run_compare
        o = BlkBenchOptions(rw=args.rw, bs=args.bs, iodepth=args.iodepth, runtime=args.runtime, poll_us=args.poll_us)
        result = asyncio.run(run_compare(o, rounds=args.rounds))
        if args.json:
            print(json.dumps(result))
        else:
            a, b = result["simvirt_null"], result["qsd_null_co"]
            print(f"blk-compare {args.rw} bs={args.bs} iodepth={args.iodepth}, {args.rounds} rounds of {args.runtime}s")
            print(f"  simvirt null   median iops={a['iops_median']:.0f}  rounds={a['iops_rounds']}")
            print(f"  qsd null-co    median iops={b['iops_median']:.0f}  rounds={b['iops_rounds']}")
            print(f"  ratio simvirt/qsd = {result['ratio_iops']}")
        return 0
    raise ValueError(f"unknown benchmark {args.bench}")
