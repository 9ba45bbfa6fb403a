"""The ``simvirt`` command line.

``simvirt device blk``  a standalone vhost-user-blk backend (QEMU can use it)
``simvirt bench blk``   drive a blk backend with the simvirt guest driver
``simvirt run``         a scenario (VMs, phases of load, impairments, faults) or a machine config
``simvirt compare``     two scenario results, job by job
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from simvirt.sizes import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simvirt", description="A virtio lab: guest drivers and vhost-user devices as real processes.")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for protocol traces)")
    sub = ap.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("device", help="run a standalone vhost-user device backend")
    dsub = dev.add_subparsers(dest="device", required=True)
    blk = dsub.add_parser("blk", help="vhost-user-blk backend")
    blk.add_argument("--socket", required=True, help="unix socket path to listen on")
    src = blk.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="raw image file (created with --size if missing)")
    src.add_argument("--null", type=_size, metavar="SIZE", help="null backend of SIZE (reads leave buffers untouched)")
    src.add_argument("--memory", type=_size, metavar="SIZE", help="RAM disk of SIZE")
    blk.add_argument("--size", type=_size, help="with --image: create/extend the image to SIZE")
    blk.add_argument("--readonly", action="store_true", help="offer VIRTIO_BLK_F_RO and refuse writes")
    blk.add_argument("--serial", default="simvirt", help="GET_ID serial (up to 20 bytes)")
    blk.add_argument("--num-queues", type=_positive_int, default=1, help="request queues offered (VIRTIO_BLK_F_MQ)")
    blk.add_argument("--seg-max", type=_positive_int, default=254)
    blk.add_argument("--size-max", type=_size, default=1 << 20)
    blk.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = any)")
    blk.add_argument("--metrics-addr", default="127.0.0.1")
    blk.add_argument("--name", help="the device's name in metric labels (default: its type)")
    blk.add_argument("--vm", default="standalone", help="value of the 'vm' metric label")
    blk.add_argument("--no-metrics", action="store_true",
                     help="skip per-request metric accounting (only to measure its cost)")
    blk.add_argument("--poll-us", type=float, default=200.0,
                     help="busy-poll the ring this long after a batch before sleeping (0 = never)")
    blk.add_argument("--control", metavar="PATH",
                     help="msgpack control socket: impair (latency, iops, bandwidth, error_rate...), info")

    bal = dsub.add_parser("balloon", help="vhost-user virtio-balloon backend")
    bal.add_argument("--socket", required=True, help="unix socket path to listen on")
    bal.add_argument("--control", help="msgpack control socket (simvirt ctl PATH balloon SIZE)")
    bal.add_argument("--stats-interval", type=float, default=0.0,
                     help="ask the guest for memory statistics every SECONDS (0 = only on request)")
    bal.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = any)")
    bal.add_argument("--metrics-addr", default="127.0.0.1")
    bal.add_argument("--name", help="the device's name in metric labels (default: its type)")
    bal.add_argument("--vm", default="standalone", help="value of the 'vm' metric label")

    net = dsub.add_parser("net", help="vhost-user-net backend")
    net.add_argument("--socket", required=True, action="append",
                     help="unix socket path to listen on (switch:NAME takes several)")
    net.add_argument("--backend", default="responder",
                     help="responder (QEMU user-net-like gateway at 10.0.2.2) | switch:NAME (L2 switch between guests)")
    net.add_argument("--mac", default="52:54:00:12:34:56")
    net.add_argument("--mtu", type=int, default=1500)
    net.add_argument("--queues", type=_positive_int, default=1, help="queue pairs (VIRTIO_NET_F_MQ when > 1)")
    net.add_argument("--pcap", help="write every frame (both directions) to this pcap file")
    net.add_argument("--rx-stream", type=int, metavar="BYTES",
                     help="responder: stream UDP frames of BYTES into the guest whenever it has buffers (rx tests)")
    net.add_argument("--metrics-port", type=int)
    net.add_argument("--metrics-addr", default="127.0.0.1")
    net.add_argument("--name", help="the device's name in metric labels (default: its type)")
    net.add_argument("--vm", default="standalone")
    net.add_argument("--poll-us", type=float, default=20.0)
    net.add_argument("--control", metavar="PATH",
                     help="msgpack control socket: impair (delay, jitter, loss, rate, direction), info, "
                          "stream (responder); not with switch:NAME")

    ctl = sub.add_parser("ctl", help="talk to a control socket (device process or simvirt run)")
    ctl.add_argument("control_socket", metavar="SOCKET")
    ctl.add_argument("ctl_command", metavar="COMMAND",
                     help="balloon SIZE | balloon-stats | info | impair [KEY=VALUE ...] | stream FRAME_SIZE [PPS] | stream stop")
    ctl.add_argument("ctl_args", metavar="ARG", nargs="*")
    ctl.add_argument("--json", action="store_true", help="print the raw reply as JSON")

    bench = sub.add_parser("bench", help="benchmarks (JSON with --json)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    bb = bsub.add_parser("blk", help="block I/O through the simvirt guest driver")
    target = bb.add_mutually_exclusive_group()
    target.add_argument("--connect", metavar="SOCKET", help="drive an existing vhost-user-blk backend")
    target.add_argument("--backend", default="null", help="null | memory | file:PATH (simvirt starts its own device)")
    bb.add_argument("--rw", choices=["read", "write", "randread", "randwrite", "randrw"], default="randread")
    bb.add_argument("--bs", type=_size, default=4096)
    bb.add_argument("--iodepth", type=_positive_int, default=32)
    bb.add_argument("--runtime", type=float, default=5.0, help="seconds")
    bb.add_argument("--size", type=_size, help="bytes of the disk to use (default: all, or 1G for own backends)")
    bb.add_argument("--verify", nargs="?", const="data", choices=["data", "zeroes"],
                    help="check data read back (data: what was written; zeroes: reads return zeros)")
    bb.add_argument("--num-queues", type=_positive_int, default=1)
    bb.add_argument("--queue-size", type=_positive_int, default=256)
    bb.add_argument("--mix", type=int, default=50, help="randrw: percent reads")
    bb.add_argument("--guest-ram", type=_size, default=None, help="guest RAM of the driver process")
    bb.add_argument("--poll-us", type=float, default=50.0,
                    help="driver busy-polls the used ring this long before sleeping on the interrupt (0 = never)")
    bb.add_argument("--json", action="store_true", help="print one JSON object")

    bm = bsub.add_parser("blk-metrics", help="what metrics cost: null device with accounting + 1 Hz scrapes vs without")
    bm.add_argument("--rounds", type=_positive_int, default=4)
    bm.add_argument("--runtime", type=float, default=3.0, help="seconds per round")
    bm.add_argument("--json", action="store_true")

    bc = bsub.add_parser("blk-compare", help="simvirt's null device vs qemu-storage-daemon null-co, same driver, one run")
    bc.add_argument("--rw", choices=["read", "write", "randread", "randwrite", "randrw"], default="randread")
    bc.add_argument("--bs", type=_size, default=4096)
    bc.add_argument("--iodepth", type=_positive_int, default=32)
    bc.add_argument("--runtime", type=float, default=3.0, help="seconds per round")
    bc.add_argument("--rounds", type=_positive_int, default=5)
    bc.add_argument("--poll-us", type=float, default=50.0)
    bc.add_argument("--json", action="store_true")

    bp = bsub.add_parser("ping", help="ICMP echo round trips from the simvirt guest to 10.0.2.2")
    bp.add_argument("--connect", metavar="SOCKET", help="an existing vhost-user-net backend (default: start one)")
    bp.add_argument("--count", type=_positive_int, default=200)
    bp.add_argument("--interval", type=float, default=0.0, help="seconds between pings")
    bp.add_argument("--poll-us", type=float, default=50.0,
                    help="driver polls the rx used ring this long after an interrupt before sleeping again")
    bp.add_argument("--busy-poll-us", type=float, default=1000.0,
                    help="driver spins on the rx used ring this long for each reply instead of waiting for the "
                         "interrupt (like SO_BUSY_POLL; 0 = interrupt-driven)")
    bp.add_argument("--device-poll-us", type=float, default=200.0,
                    help="the started device busy-polls its transmit ring this long after a batch (0 = kicks only)")
    bp.add_argument("--no-pin", action="store_true",
                    help="leave CPU placement to the scheduler (default: driver and device on different CPUs)")
    bp.add_argument("--json", action="store_true")

    bn = bsub.add_parser("net", help="frame throughput through the simvirt guest net driver")
    bn.add_argument("--direction", choices=["tx", "rx"], default="tx")
    bn.add_argument("--frame-size", type=int, default=1514,
                    help="Ethernet frame bytes (64..65549; above 1514 the device MTU grows to fit)")
    bn.add_argument("--runtime", type=float, default=5.0)
    bn.add_argument("--connect", metavar="SOCKET")
    bn.add_argument("--rx-buf", type=_size, default=0,
                    help="guest receive buffer bytes (default: one frame rounded up to 4 KiB; 4096 = Linux's "
                         "page-sized mergeable buffers)")
    bn.add_argument("--no-pin", action="store_true",
                    help="leave CPU placement to the scheduler (default: driver and device on different CPUs)")
    bn.add_argument("--json", action="store_true")

    bnd = bsub.add_parser("net-dpdk", help="dpdk-testpmd virtio_user into our net device vs into DPDK's vhost backend")
    bnd.add_argument("--runtime", type=float, default=5.0)
    bnd.add_argument("--json", action="store_true")

    bbal = bsub.add_parser("balloon", help="inflate/deflate timing and memory really returned to the host")
    bbal.add_argument("--ram", type=_size, default=2 << 30)
    bbal.add_argument("--inflate", type=_size, default=1 << 30)
    bbal.add_argument("--json", action="store_true")

    top = sub.add_parser("top", help="live terminal view of a running machine (reads its metrics)")
    where = top.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="metrics port on 127.0.0.1 (simvirt run --metrics-port)")
    where.add_argument("--url", help="full metrics URL")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--iterations", type=int, default=0, help="stop after N refreshes (0 = until Ctrl-C)")

    run = sub.add_parser("run", help="run a scenario (phases of load, impairments, faults) or a machine config")
    run.add_argument("config", nargs="?", metavar="SCENARIO",
                     help="a shipped scenario name (see --list), a scenario file, or a machine config "
                          "(a file without [[phase]]); default: the shipped 'default' scenario")
    run.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    run.add_argument("--out", metavar="DIR", help="scenario: write results.json and PNG plots here")
    run.add_argument("--duration-scale", type=float, default=1.0, metavar="F",
                     help="scenario: multiply every phase duration (and in-phase time) by F")
    run.add_argument("--duration", type=float, help="machine config: override the workload duration (seconds)")
    run.add_argument("--metrics-port", type=int, help="one scrape address for the whole machine")
    run.add_argument("--metrics-addr", default="127.0.0.1", help="address to bind the scrape port to")
    run.add_argument("--control", help="machine control socket (simvirt ctl PATH balloon SIZE | balloon-stats | info)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-restart", action="store_true",
                     help="let a device process that dies stay dead (default: restart it and reconnect its driver)")
    vm = sub.add_parser("vm", help="one VM of a scenario as its own driver process (started by simvirt run)")
    vm.add_argument("scenario", help="scenario name or file")
    vm.add_argument("--vm", required=True, help="which VM of the scenario")
    vm.add_argument("--control", required=True, help="control socket the runner drives this VM through")
    vm.add_argument("--scale", type=float, default=1.0, help="duration scale")
    vm.add_argument("--port", action="append", metavar="DEVICE=SOCKET",
                    help="net device served by a shared switch at SOCKET (no device process of our own)")
    vm.add_argument("--metrics-port", type=int)
    cmp = sub.add_parser("compare", help="compare two scenario results (results.json) job by job", add_help=False)
    cmp.add_argument("rest", nargs=argparse.REMAINDER)
    sk = sub.add_parser("soak", help="run a mixed machine for a long time; check RSS/fds stay flat and errors zero")
    sk.add_argument("--minutes", type=float, default=10.0)
    sk.add_argument("--config", help="machine TOML (default: the embedded demo machine)")
    sk.add_argument("--kill-every", type=float, default=0.0, metavar="SECONDS",
                    help="SIGKILL a random device process about this often (it is restarted); 0 = never")
    sk.add_argument("--rss-slack", type=float, default=0.10, help="allowed relative RSS growth after warm-up")
    sk.add_argument("--json", action="store_true")
    return ap


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")


def _soak_command(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from rich.console import Console

    from simvirt.devices.runner import install_uvloop
    from simvirt.soak import soak

    if args.minutes <= 0:
        raise ValueError("--minutes must be positive")
    install_uvloop()
    console = Console(stderr=True)
    r = asyncio.run(soak(args.minutes, config=args.config, kill_every=args.kill_every, rss_slack=args.rss_slack,
                         console=console))
    if args.json:
        print(json.dumps(r))
    else:
        for pr in r["processes"]:
            if pr.get("judged"):
                console.print(f"{pr['process']} (pid {pr['pid']}): RSS {pr['rss_start'] >> 20} -> {pr['rss_end'] >> 20} MiB "
                              f"(max {pr['rss_max'] >> 20}), fds {pr['fds_start']} -> {pr['fds_end']} "
                              f"{'ok' if pr['ok'] else 'GROWING'}")
        console.print(f"{len(r['kills'])} kills, {len(r['restarts'])} restarts, errors {r['errors']}, "
                      f"verified {r['verified']}: {'OK' if r['ok'] else 'FAILED'}")
    return 0 if r["ok"] else 1


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "device":
            from simvirt.devices.cli import run_device_command
            return run_device_command(args)
        if args.command == "bench":
            from simvirt.bench.cli import run_bench_command
            return run_bench_command(args)
        if args.command == "ctl":
            from simvirt.ctl import run_ctl_command
            return run_ctl_command(args)
        if args.command == "top":
            from simvirt.top import run_top
            return run_top(args)
        if args.command == "soak":
            return _soak_command(args)
        if args.command == "run":
            from simvirt.scenario.cli import run_command
            return run_command(args)
        if args.command == "vm":
            from simvirt.scenario.vm import vm_main
            return vm_main(args)
        if args.command == "compare":
            from simvirt.scenario.compare import compare_main
            return compare_main(args.rest)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"simvirt: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
