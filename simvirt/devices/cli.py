"""``simvirt device ...``: build a device from CLI options and serve it."""
from __future__ import annotations

import argparse

from simvirt.devices.blk.device import BlkDevice
from simvirt.devices.blk.storage import FileStorage, MemoryStorage, NullStorage, Storage
from simvirt.devices.runner import run_device


def make_storage(image: str | None, null: int | None, memory: int | None, size: int | None, readonly: bool) -> Storage:
    if image is not None:
        return FileStorage(image, readonly=readonly, size=size)
    if null is not None:
        return NullStorage(null, readonly=readonly)
    if memory is not None:
        return MemoryStorage(memory, readonly=readonly)
    raise ValueError("one of --image, --null or --memory is required")


def run_device_command(args: argparse.Namespace) -> int:
    if args.device == "blk":
        storage = make_storage(args.image, args.null, args.memory, args.size, args.readonly)
        if storage.size < 512:
            raise ValueError(f"disk of {storage.size} bytes is smaller than one sector")
        dev = BlkDevice(storage, serial=args.serial, num_queues=args.num_queues, readonly=args.readonly,
                        seg_max=args.seg_max, size_max=args.size_max, vm=args.vm, label=args.name)
        dev.count_metrics = not args.no_metrics
        handler = None
        if args.control:
            from simvirt.devices.blk.control import blk_control_handler
            handler = blk_control_handler(dev)
        try:
            return run_device(dev, args.socket, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                              poll_us=args.poll_us, control_path=args.control, control_handler=handler)
        finally:
            storage.close()
    if args.device == "balloon":
        from simvirt.control import balloon_handler
        from simvirt.devices.balloon.device import BalloonDevice
        if args.stats_interval < 0:
            raise ValueError("--stats-interval must be >= 0")
        bdev = BalloonDevice(vm=args.vm, stats_interval=args.stats_interval, label=args.name)
        return run_device(bdev, args.socket, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                          poll_us=0.0, control_path=args.control, control_handler=balloon_handler(bdev))
    if args.device == "net":
        return _run_net(args)
    raise ValueError(f"unknown device {args.device}")


def _run_net(args: argparse.Namespace) -> int:
    import asyncio

    from simvirt.devices.net.device import NetDevice
    from simvirt.devices.net.peers import ResponderPeer
    from simvirt.net.pcap import PcapWriter
    from simvirt.devices.runner import install_uvloop, serve_device
    from simvirt.net.packets import parse_mac

    if args.backend.startswith("switch:"):
        from simvirt.devices.net.switch import run_switch
        if args.control:
            raise ValueError("--control is not available with the switch backend (one process serves every port)")
        name = args.backend[len("switch:"):]
        if not name or "/" in name:
            raise ValueError("switch:NAME needs a plain name")
        return run_switch(name, args.socket, mtu=args.mtu, pcap=args.pcap, metrics_port=args.metrics_port,
                          metrics_addr=args.metrics_addr, vm=args.vm)
    from simvirt.devices.net.peers import DgramPeer, StreamPeer, TapPeer, parse_backend
    kind, bargs = parse_backend(args.backend)
    if len(args.socket) != 1:
        raise ValueError("only the switch backend serves several --socket paths")
    if not 68 <= args.mtu <= 65535:
        raise ValueError("--mtu must be 68..65535")
    if args.rx_stream and kind != "responder":
        raise ValueError("--rx-stream needs the responder backend")
    dev = NetDevice(mac=parse_mac(args.mac), mtu=args.mtu, queue_pairs=args.queues, vm=args.vm, label=args.name)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "responder":
            peer = ResponderPeer(dev, loop)
            if args.rx_stream:
                peer.start_stream(args.rx_stream)
        elif kind == "tap":
            peer = TapPeer(dev, loop, bargs[0])
        elif kind == "stream":
            peer = StreamPeer(dev, loop, bargs[0], int(bargs[1]))
        else:
            peer = DgramPeer(dev, loop, (bargs[0], int(bargs[1])), (bargs[2], int(bargs[3])))
        dev.peer = peer
        if args.pcap:
            dev.capture = PcapWriter.open(args.pcap)
        handler = None
        if args.control:
            from simvirt.devices.net.control import net_control_handler
            handler = net_control_handler(dev, peer, args.backend)
        try:
            await serve_device(dev, args.socket[0], metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                               poll_us=args.poll_us, control_path=args.control, control_handler=handler)
        finally:
            if dev.capture is not None:
                dev.capture.close()
            close = getattr(peer, "close", None)
            if close is not None:
                close()

    install_uvloop()
    asyncio.run(main())
    return 0
