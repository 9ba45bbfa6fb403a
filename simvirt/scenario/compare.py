"""``simvirt compare A.json B.json``: which jobs got better or worse between two runs.

Jobs are matched strictly by (phase name, job name). Matching by position
instead would silently compare a ping with a disk job after someone inserts
a job in the scenario file; a renamed job shows up as one job only in A and
one only in B, which is the honest answer.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional

from rich.console import Console
from rich.table import Table

from simvirt.scenario.report import format_latency

DEFAULT_THRESHOLD = 5.0  # percent: run-to-run noise of a short scenario phase


class ResultsError(ValueError):
    """A file that cannot be read as simvirt results; the message names the file and what is wrong."""


# metric name -> (how to read it from a job summary, whether bigger is better)
_METRICS: dict[str, tuple[Callable[[dict[str, Any]], Optional[float]], bool]] = {
    "rate": (lambda s: s.get("rate"), True),
    "bw_bytes": (lambda s: s.get("bw_bytes"), True),
    "lat p50": (lambda s: (s.get("lat_us") or {}).get("p50"), False),
    "lat p99": (lambda s: (s.get("lat_us") or {}).get("p99"), False),
    "errors": (lambda s: s.get("errors"), False),
}

_FLOWS = frozenset({"rate", "bw_bytes"})
_VERDICT_STYLE = {"better": "green", "worse": "bold red", "same": "", "n/a": "dim",
                  "only in A": "yellow", "only in B": "yellow"}


def load_results(path: str) -> dict[str, Any]:
    """Read and check a results JSON just enough for ``compare``: phases with names, jobs with names and summaries."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: not JSON: {e}") from e
    where = f"{path}: not a simvirt results file"
    if not isinstance(data, dict):
        raise ResultsError(f"{where}: top level is {type(data).__name__}, not an object")
    if not isinstance(data.get("phases"), list):
        raise ResultsError(f"{where}: missing 'phases' list")
    for i, phase in enumerate(data["phases"]):
        if not isinstance(phase, dict) or not isinstance(phase.get("name"), str):
            raise ResultsError(f"{where}: phases[{i}] has no 'name'")
        if not isinstance(phase.get("jobs"), list):
            raise ResultsError(f"{where}: phase {phase['name']!r} has no 'jobs' list")
        for j, job in enumerate(phase["jobs"]):
            if not isinstance(job, dict) or not isinstance(job.get("name"), str):
                raise ResultsError(f"{where}: phase {phase['name']!r} jobs[{j}] has no 'name'")
            if not isinstance(job.get("summary"), dict):
                raise ResultsError(f"{where}: job {phase['name']}/{job['name']} has no 'summary'")
            for metric, (read, _) in _METRICS.items():
                v = read(job["summary"])
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ResultsError(f"{where}: job {phase['name']}/{job['name']} {metric} is {v!r}, not a number")
    return data


def _numbered(names: list[str]) -> list[str]:
    """Names made unique by occurrence: a timeline quiet, noisy, quiet gives "quiet", "noisy", "quiet#2",
    so the second quiet phase of A meets the second quiet phase of B instead of overwriting the first."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _jobs(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(phase name, job name) -> job, in timeline order (dicts keep insertion order)."""
    phases = results["phases"]
    return {(pname, jname): job
            for pname, phase in zip(_numbered([p["name"] for p in phases]), phases)
            for jname, job in zip(_numbered([j["name"] for j in phase["jobs"]]), phase["jobs"])}


def _row(phase: str, job: str, metric: Optional[str], a: Optional[float], b: Optional[float],
         delta_pct: Optional[float], verdict: str) -> dict[str, Any]:
    return {"phase": phase, "job": job, "metric": metric, "a": a, "b": b, "delta_pct": delta_pct, "verdict": verdict}


def _judge(a: Optional[float], b: Optional[float], higher_is_better: bool,
           threshold: float) -> tuple[Optional[float], str]:
    """Delta in percent of A and the verdict.

    From zero the change has no percentage (None), but it is still a change:
    0 -> 3 errors is worse, whatever the threshold. A value on one side only
    (no latency because nothing completed) cannot be judged: "n/a".
    """
    if a is None or b is None:
        return None, "n/a"
    if a == b:
        return 0.0, "same"
    delta = (b - a) / abs(a) * 100.0 if a != 0 else None
    if delta is not None and abs(delta) <= threshold:
        return delta, "same"
    return delta, "better" if (b > a) == higher_is_better else "worse"


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> list[dict[str, Any]]:
    """One row per (matched job, metric), in A's order, then a row per job found in only one run.

    Each row: ``phase, job, metric, a, b, delta_pct, verdict``; the verdict is
    "better", "worse", "same" (within ±``threshold`` %), "n/a" (value on one
    side only), or "only in A"/"only in B" (metric, values and delta None).
    Metrics absent from both runs (a balloon job has no latency) get no row, nor do rate and bandwidth
    when zero in both (a balloon job has no rate, a ping no bandwidth): rows of 0 vs 0 only hide the real ones.
    """
    jobs_a, jobs_b = _jobs(a), _jobs(b)
    rows: list[dict[str, Any]] = []
    for key, job_a in jobs_a.items():
        job_b = jobs_b.get(key)
        if job_b is None:
            rows.append(_row(*key, None, None, None, None, "only in A"))
            continue
        for metric, (read, higher_is_better) in _METRICS.items():
            va, vb = read(job_a["summary"]), read(job_b["summary"])
            if (va is None and vb is None) or (metric in _FLOWS and not va and not vb):
                continue
            rows.append(_row(*key, metric, va, vb, *_judge(va, vb, higher_is_better, threshold)))
    rows.extend(_row(*key, None, None, None, None, "only in B") for key in jobs_b if key not in jobs_a)
    return rows


def _fmt_value(metric: Optional[str], v: Optional[float]) -> str:
    if v is None:
        return "-"
    if metric and metric.startswith("lat"):
        return format_latency(v)
    if metric == "bw_bytes":
        return f"{v / 1e6:,.1f} MB/s"
    if metric == "errors":
        return f"{v:,.0f}"
    return f"{v:,.1f}"


def _fmt_delta(row: dict[str, Any]) -> str:
    if row["delta_pct"] is not None:
        return f"{row['delta_pct']:+.1f}%"
    if row["a"] == 0 and row["b"] not in (None, 0):
        return "from 0"
    return "-"


def _label(results: dict[str, Any]) -> str:
    return f"{results.get('scenario', '?')} (seed {results.get('seed', '?')}, {results.get('started', '?')})"


def render_compare(console: Console, rows: list[dict[str, Any]], a: dict[str, Any], b: dict[str, Any]) -> None:
    """The comparison table, a warning when the two runs were not the same setup, and the tally."""
    table = Table(title=f"A: {_label(a)}\nB: {_label(b)}")
    for col in ("phase", "job", "metric", "A", "B", "delta", "verdict"):
        table.add_column(col, justify="right" if col in ("A", "B", "delta") else "left")
    for r in rows:
        style = _VERDICT_STYLE.get(r["verdict"], "")
        verdict = f"[{style}]{r['verdict']}[/]" if style else r["verdict"]
        table.add_row(r["phase"], r["job"], r["metric"] or "-", _fmt_value(r["metric"], r["a"]),
                      _fmt_value(r["metric"], r["b"]), _fmt_delta(r), verdict)
    console.print(table)
    for key in ("scenario", "seed", "duration_scale"):
        if a.get(key) != b.get(key):
            console.print(f"[yellow]warning:[/] runs differ in {key}: A {a.get(key)!r}, B {b.get(key)!r}",
                          highlight=False)
    tally = {v: sum(r["verdict"] == v for r in rows) for v in ("better", "worse", "same", "n/a")}
    only = sum(r["verdict"].startswith("only") for r in rows)
    counts = [f"{n} {v}" for v, n in tally.items() if n] + ([f"{only} only in one run"] if only else [])
    console.print(", ".join(counts) or "no jobs in either run")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simvirt compare", description="Compare two simvirt run results (results.json).")
    ap.add_argument("a", metavar="A.json", help="baseline results")
    ap.add_argument("b", metavar="B.json", help="results to judge against the baseline")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="PCT",
                    help=f"changes within +-PCT percent are 'same' (default {DEFAULT_THRESHOLD:g})")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return ap


def compare_main(argv: list[str]) -> int:
    """Exit 0 whatever the verdicts (judging is the reader's job), 2 when a file cannot be used."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threshold < 0:
        ap.error("--threshold must not be negative")
    try:
        a, b = load_results(args.a), load_results(args.b)
    except ResultsError as e:
        print(f"simvirt compare: error: {e}", file=sys.stderr)
        return 2
    rows = compare(a, b, args.threshold)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "threshold": args.threshold, "rows": rows}, indent=2))
    else:
        render_compare(Console(), rows, a, b)
    return 0
