"""Control-socket commands of a net device process (``simvirt device net --control PATH``).

``{"cmd": "impair", delay, jitter, loss, rate, direction, seed}`` sets the
netem-like impairment (missing fields are their defaults, so ``{"cmd":
"impair"}`` clears it) and answers ``{"impair": {current settings}}``;
``{"cmd": "info"}`` answers the impairment, frames delayed/dropped/held per
direction, and the responder's stream;
``{"cmd": "stream", "frame_size": N, "port": P, "rate_pps": R}`` starts
the responder's UDP stream into the guest (``rate_pps`` None or absent: as
fast as the guest posts buffers) and ``{"cmd": "stream", "stop": true}``
stops it.
"""
from __future__ import annotations

from typing import Any, Optional

from simvirt.control import ControlError, Handler, impair_command
from simvirt.devices.net.device import NetDevice
from simvirt.devices.net.peers import ResponderPeer
from simvirt.impair.settings import NetSettings

_STREAM_KEYS = {"cmd", "frame_size", "port", "rate_pps", "stop"}


def _int(req: dict, key: str, default: Optional[int] = None) -> int:
    v = req.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ControlError(f"stream: {key} must be an integer, not {v!r}")
    return v


def net_control_handler(device: NetDevice, peer: Any, backend: str = "responder") -> Handler:
    def stream(req: dict) -> dict:
        if not isinstance(peer, ResponderPeer):
            raise ControlError(f"stream needs the responder backend (this device's backend is {backend})")
        unknown = set(req) - _STREAM_KEYS
        if unknown:
            raise ControlError(f"stream: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        if req.get("stop"):
            was = peer.stream_info()
            peer.stop_stream()
            return {"stream": {"running": False, "frames": was.get("frames", 0)}}
        if "frame_size" not in req:
            raise ControlError("stream needs 'frame_size' (or 'stop': true)")
        rate = req.get("rate_pps")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))):
            raise ControlError(f"stream: rate_pps must be a number or null, not {rate!r}")
        try:
            peer.start_stream(_int(req, "frame_size"), _int(req, "port", 5001), rate)
        except ValueError as e:
            raise ControlError(f"stream: {e}") from None
        return {"stream": peer.stream_info()}

    def handle(req: dict) -> dict:
        cmd = req["cmd"]
        if cmd == "impair":
            return impair_command(device, NetSettings, req)
        if cmd == "info":
            out = device.impair_info()
            if isinstance(peer, ResponderPeer):
                out["stream"] = peer.stream_info()
            return out
        if cmd == "stream":
            return stream(req)
        raise ControlError(f"unknown command {cmd!r} (impair, info, stream)")

    return handle
