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
                        seg_max=args.seg_max, size_max=args.size_max, vm=args.vm)
        try:
            return run_device(dev, args.socket, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                              poll_us=args.poll_us)
        finally:
            storage.close()
    if args.device == "balloon":
        from simvirt.control import balloon_handler
        from simvirt.devices.balloon.device import BalloonDevice
        if args.stats_interval < 0:
            raise ValueError("--stats-interval must be >= 0")
        bdev = BalloonDevice(vm=args.vm, stats_interval=args.stats_interval)
        return run_device(bdev, args.socket, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                          poll_us=0.0, control_path=args.control, control_handler=balloon_handler(bdev))
    raise ValueError(f"unknown device {args.device}")
