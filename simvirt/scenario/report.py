"""The console summary of a scenario run, and the files ``--out DIR`` leaves behind.

Everything here reads the results dict the runner returns (the schema is the
contract between them), so a saved ``results.json`` renders the same as a
live run. Latency formatting lives here because ``compare`` shows the same
numbers and must show them the same way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console, JustifyMethod
from rich.table import Table

# Impairment fields in seconds (shown in ms) and fractions (shown in %), from spec.NetImpairment/BlkImpairment.
_SECONDS_FIELDS = frozenset({"delay", "jitter", "latency"})
_FRACTION_FIELDS = frozenset({"loss", "error_rate"})
_IDENTITY_FIELDS = frozenset({"vm", "device", "kind"})
_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("phase", "left"), ("job", "left"), ("vm/device", "left"), ("kind", "left"), ("rate", "right"),
    ("MB/s", "right"), ("p50", "right"), ("p99", "right"), ("errors", "right"), ("check", "left"))


def format_latency(us: Optional[float]) -> str:
    """Microseconds below 10 ms, milliseconds from there: a stall reads as "310.0 ms", not "310000 µs"."""
    if us is None:
        return "-"
    if us >= 10_000:
        return f"{us / 1000:,.1f} ms"
    return f"{us:,.0f} µs"


def format_rate(summary: dict[str, Any], job: dict[str, Any]) -> str:
    """The rate with its unit; balloon/pressure jobs have no rate, so their own result is shown instead."""
    unit = summary.get("rate_unit") or ""
    if unit:
        return f"{summary.get('rate', 0.0):,.1f} {unit}"
    b, p = job.get("balloon"), job.get("pressure")
    if isinstance(b, dict):
        took = b.get("took_s")
        return f"→ {_mib(b.get('target'))} " + (f"in {took:.2f} s" if took is not None else "[red]not reached[/]")
    if isinstance(p, dict):
        if p.get("error"):
            return f"[red]{_mib(p.get('allocated'))} of {_mib(p.get('size'))}[/]"
        return f"{_mib(p.get('allocated'))} in {p.get('took_s', 0) or 0:g} s"
    return "-"


def _mib(n: Any) -> str:
    return f"{n / 2**20:,.0f} MiB" if isinstance(n, (int, float)) else "?"


def _check(job: dict[str, Any]) -> str:
    """The correctness column: data verification for blk, losses for ping, drops for streams."""
    verified = job.get("verified")
    if verified is True:
        return "verified"
    if verified is False:
        return "[bold red]NOT verified[/]"
    ping = job.get("ping")
    if ping:
        lost = ping.get("lost", 0)
        text = f"{lost}/{ping.get('sent', 0)} lost"
        return f"[red]{text}[/]" if lost else text
    stream = job.get("stream")
    if stream:
        drops = stream.get("drops", 0)
        return f"[red]{drops} drops[/]" if drops else "0 drops"
    return ""


def fault_time(phase: dict[str, Any], fault: dict[str, Any]) -> float:
    """Seconds since the scenario start: a fault's ``at_s`` counts from its phase start, as ``at`` does in the spec."""
    return float(phase.get("start_s", 0.0)) + float(fault.get("at_s", 0.0))


def describe_fault(phase: dict[str, Any], fault: dict[str, Any]) -> str:
    """One line: what was done to which device, and what the guest saw of it."""
    pids = ""
    if fault.get("new_pid") is not None:
        pids = f" (pid {fault.get('old_pid')} -> {fault['new_pid']})"
    head = (f"fault {phase['name']} +{fault.get('at_s', 0.0):.1f} s: {fault.get('action', '?')} "
            f"{fault.get('vm', '?')}/{fault.get('device', '?')}{pids}")
    recovered = fault.get("recovered_s")
    outcome = ("[bold red]guest I/O never recovered[/]" if recovered is None
               else f"guest I/O back after {format_latency(recovered * 1e6)}")
    saw = fault.get("guest_saw") or {}
    errors = saw.get("errors", 0)
    seen = [f"[red]{errors} errors[/]" if errors else "0 errors"]
    if saw.get("max_lat_us") is not None:
        seen.append(f"max latency {format_latency(saw['max_lat_us'])}")
    if saw.get("stall_s") is not None:
        seen.append(f"stalled {saw['stall_s']:.2f} s")
    return f"{head}: {outcome}; guest saw {', '.join(seen)}"


def summary_table(results: dict[str, Any]) -> Table:
    """One row per job, in timeline order; the fault lines go in the caption, under the rows they explain."""
    table = Table(title=f"scenario '{results.get('scenario', '?')}' ({results.get('source', '?')}), "
                        f"seed {results.get('seed', '?')}, {results.get('elapsed_s', 0.0):.1f} s",
                  caption_justify="left")
    for col, justify in _COLUMNS:
        table.add_column(col, justify=justify)
    for phase in results.get("phases") or []:
        for job in phase.get("jobs") or []:
            s = job.get("summary") or {}
            lat = s.get("lat_us") or {}
            errors = s.get("errors", 0)
            table.add_row(
                phase.get("name", "?"), job.get("name", "?"), f"{job.get('vm', '?')}/{job.get('device') or '-'}",
                job.get("kind", "?"), format_rate(s, job),
                f"{s.get('bw_bytes', 0.0) / 1e6:,.1f}" if s.get("rate_unit") else "-",
                *((format_latency(lat.get("p50")), format_latency(lat.get("p99"))) if s.get("rate_unit")
                  else ("-", "-")),
                f"[bold red]{errors}[/]" if errors else "0", _check(job))
    return table


def describe_impairment(imp: dict[str, Any]) -> str:
    """``a/net0 net: delay=2.0ms loss=1.0% direction=tx``; unset (None or zero) conditions are left out."""
    parts = []
    for key, value in imp.items():
        if key in _IDENTITY_FIELDS or value is None or value == 0 or value is False:
            continue
        if key in _SECONDS_FIELDS:
            parts.append(f"{key}={value * 1000:g}ms")
        elif key in _FRACTION_FIELDS:
            parts.append(f"{key}={value * 100:g}%")
        else:
            parts.append(f"{key}={value}")
    return f"{imp.get('vm', '?')}/{imp.get('device', '?')} {imp.get('kind', '?')}: {' '.join(parts) or 'none'}"


def render_summary(console: Console, results: dict[str, Any]) -> None:
    """The table, then each phase's conditions (the numbers make no sense without them), then the verdict."""
    console.print(summary_table(results))
    for phase in results.get("phases") or []:
        for imp in phase.get("impairments") or []:
            console.print(f"impairment {phase.get('name', '?')}: {describe_impairment(imp)}", highlight=False)
        for fault in phase.get("faults") or []:
            console.print(describe_fault(phase, fault), highlight=False)
    for err in results.get("errors") or []:
        console.print(f"[red]error:[/] {err}", highlight=False)
    if results.get("stopped_early"):
        ran = results.get("phases") or []
        cut = [p.get("name", "?") for p in ran if p.get("stopped_early")]
        console.print(f"[yellow]stopped early by signal:[/] {len(ran)} of the scenario's phases ran"
                      + (f", '{cut[0]}' cut short" if cut else ""), highlight=False)
    console.print("[bold green]OK[/]" if results.get("ok") else "[bold red]FAILED[/]")


def write_results(results: dict[str, Any], out_dir: str | Path) -> list[str]:
    """``results.json`` (what ``simvirt compare`` reads) and the plots; returns the paths written.

    The plotter is imported here so that a run without ``--out`` never pays for importing matplotlib.
    """
    from simvirt.scenario.plot import plot_results

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return [str(path), *plot_results(results, out)]
