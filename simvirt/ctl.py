"""``simvirt ctl SOCKET COMMAND [ARG...]``: the host's management commands."""
from __future__ import annotations

import argparse
import json
import sys

from simvirt.control import request
from simvirt.sizes import format_size, parse_size


def build_request(command: str, args: list[str]) -> dict:
    if command == "balloon":
        if len(args) != 1:
            raise ValueError("usage: simvirt ctl SOCKET balloon SIZE   (target guest memory, e.g. 512M)")
        return {"cmd": "balloon", "size": parse_size(args[0])}
    if command in ("balloon-stats", "info"):
        if args:
            raise ValueError(f"{command} takes no arguments")
        return {"cmd": command}
    if command == "impair":
        # Which kind of device the socket serves is the device's business: send the keys
        # converted for whichever kind they belong to, and let it refuse the other kind's.
        from simvirt.scenario.parse import impairment_keys, impairment_values
        keys = {kind: impairment_keys(kind) for kind in ("net", "blk")}
        pairs = {}
        for word in args:
            key, eq, value = word.partition("=")
            if not eq or not key:
                raise ValueError(f"impair: {word!r} is not KEY=VALUE (e.g. delay=2ms loss=1% | iops=1000)")
            pairs[key] = value
        kinds = [k for k in ("net", "blk") if set(pairs) <= keys[k]]
        if pairs and not kinds:
            raise ValueError(f"impair: {', '.join(sorted(pairs))} mixes net and blk keys "
                             f"(net: {', '.join(sorted(keys['net']))}; blk: {', '.join(sorted(keys['blk']))})")
        return {"cmd": "impair", **(impairment_values(kinds[0], pairs) if pairs else {})}
    if command == "stream":
        if args == ["stop"]:
            return {"cmd": "stream", "stop": True}
        if len(args) not in (1, 2):
            raise ValueError("usage: simvirt ctl SOCKET stream FRAME_SIZE [RATE_PPS] | stream stop")
        return {"cmd": "stream", "frame_size": int(args[0]), "rate_pps": float(args[1]) if len(args) == 2 else None}
    raise ValueError(f"unknown command {command!r} (balloon SIZE, balloon-stats, info, impair KEY=VALUE..., "
                     "stream FRAME_SIZE [RATE_PPS] | stream stop)")



def run_ctl_command(args: argparse.Namespace) -> int:
    req = build_request(args.ctl_command, args.ctl_args)
    try:
        reply = request(args.control_socket, req)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise OSError(f"cannot reach control socket {args.control_socket}: {e}") from None
    if args.json:
        print(json.dumps(reply))
    elif not reply.get("ok"):
        print(f"simvirt ctl: {reply.get('error')}", file=sys.stderr)
    else:
        _pretty(reply)
    return 0 if reply.get("ok") else 1


def _pretty(r: dict) -> None:
    if "ram_bytes" in r:
        ram = r["ram_bytes"] or 0
        print(f"guest RAM {format_size(ram)}; balloon target {r['target_pages']} pages "
              f"({format_size(r['target_pages'] * 4096)}), actual {r['actual_pages']} pages; "
              f"host-resident {r['resident_bytes'] / 2**20:.1f} MiB")
        for k, v in sorted((r.get("stats") or {}).items()):
            print(f"  {k:20s} {v}")
        if r.get("stats_age_s") is not None:
            print(f"  (stats {r['stats_age_s']} s old)")
    else:
        for k, v in r.items():
            if k != "ok":
                print(f"{k}: {v}")
