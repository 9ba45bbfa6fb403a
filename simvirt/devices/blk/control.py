"""Control-socket commands of a blk device process (``simvirt device blk --control PATH``).

``{"cmd": "impair", latency, iops, iops_burst, bandwidth, bandwidth_burst, error_rate, seed}``
sets the impairment (any subset; missing fields are their defaults, so
``{"cmd": "impair"}`` clears it) and answers ``{"impair": {current settings}}``;
``{"cmd": "info"}`` answers the impairment and what it did so far.
"""
from __future__ import annotations

from simvirt.control import ControlError, Handler, impair_command
from simvirt.devices.blk.device import BlkDevice
from simvirt.impair.settings import BlkSettings


def blk_control_handler(device: BlkDevice) -> Handler:
    def handle(req: dict) -> dict:
        cmd = req["cmd"]
        if cmd == "impair":
            return impair_command(device, BlkSettings, req)
        if cmd == "info":
            return device.impair_info()
        raise ControlError(f"unknown command {cmd!r} (impair, info)")

    return handle
