"""``simvirt run``: a scenario, or (for a file without phases) a plain machine config."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tomllib

from rich.console import Console

from simvirt.devices.runner import install_uvloop


def _is_machine_config(arg: str) -> bool:
    """A file with [[workload]]/[run] and no [[phase]] is a machine config (run for [run].duration)."""
    if not os.path.isfile(arg):
        return False
    try:
        with open(arg, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False          # the scenario parser reports the error with its line
    return "phase" not in raw and "scenario" not in raw and "vm" not in raw


def run_command(args: argparse.Namespace) -> int:
    from simvirt.scenario.parse import load_scenario, shipped_scenarios

    if args.list:
        for name in shipped_scenarios():
            s = load_scenario(name)
            print(f"{name:18} {s.description.strip().splitlines()[0] if s.description.strip() else ''}")
        return 0
    if args.config and _is_machine_config(args.config):
        from simvirt.machine.run import run_machine_command
        return run_machine_command(args)
    if args.duration is not None:
        raise ValueError("--duration is for machine configs; scale a scenario with --duration-scale")
    if args.control is not None or args.no_restart:
        raise ValueError("--control and --no-restart are for machine configs")
    if not 0 < args.duration_scale <= 100:
        raise ValueError("--duration-scale must be in (0, 100]")
    scenario = load_scenario(args.config)
    arg = args.config or "default"
    if args.duration_scale != 1.0:
        scenario = scenario.scaled(args.duration_scale)
    install_uvloop()
    from simvirt.scenario.report import render_summary, write_results
    from simvirt.scenario.runner import run_scenario

    console = Console(stderr=args.json)
    results = asyncio.run(run_scenario(scenario, arg, scale=args.duration_scale, console=console,
                                       progress=not args.no_progress and console.is_terminal,
                                       metrics_port=args.metrics_port, metrics_addr=args.metrics_addr))
    if args.out:
        for path in write_results(results, args.out):
            console.log(f"wrote {path}")
    if args.json:
        print(json.dumps(results))
    else:
        render_summary(console, results)
    return 0 if results["ok"] else 1
