"""The summary table, the printed summary and ``write_results``, on results dicts built by hand.

``make_job``/``make_results`` are the factory the plot and compare tests import too: they follow the
results schema the runner writes, with every field a test does not care about filled in.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from rich.console import Console

from simvirt.scenario.report import (describe_fault, describe_impairment, format_latency, render_summary,
                                     summary_table, write_results)

_RATE_UNITS = {"blk": "IOPS", "ping": "pings/s", "tx": "pps", "rx": "pps", "udp-rr": "tps",
               "balloon": "", "pressure": ""}


def lat(p50: Optional[float] = 50.0, p99: Optional[float] = 80.0) -> dict[str, Optional[float]]:
    return {"mean": p50, "p50": p50, "p90": p99, "p99": p99, "p999": p99, "max": p99}


def make_job(name: str, kind: str = "blk", *, phase: str = "p0", vm: str = "a", device: str = "vda",
             rate: float = 100.0, bw_bytes: float = 409600.0, p50: Optional[float] = 50.0,
             p99: Optional[float] = 80.0, errors: int = 0, start_s: float = 0.0, seconds: int = 0,
             **detail: Any) -> dict[str, Any]:
    """A job of ``kind`` with a flat timeline of ``seconds`` samples from ``start_s``; ``detail`` adds
    kind-specific keys (``verified``, ``ping``, ``stream``, ``balloon``...)."""
    unit = _RATE_UNITS[kind]
    job: dict[str, Any] = {
        "name": name, "phase": phase, "vm": vm, "device": device, "kind": kind, "runtime_s": float(seconds),
        "summary": {"rate": rate if unit else 0.0, "rate_unit": unit, "bw_bytes": bw_bytes if unit else 0.0,
                    "lat_us": lat(p50, p99), "errors": errors},
        "timeline": [{"t": start_s + i + 1.0, "rate": rate, "bw_bytes": bw_bytes, "lat_p50_us": p50,
                      "lat_p99_us": p99} for i in range(seconds)],
    }
    job.update(detail)
    return job


def make_phase(name: str, jobs: list[dict[str, Any]], *, index: int = 0, start_s: float = 0.0,
               duration_s: float = 5.0, impairments: Optional[list[dict[str, Any]]] = None,
               faults: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    return {"name": name, "index": index, "start_s": start_s, "duration_s": duration_s,
            "impairments": impairments or [], "faults": faults or [], "jobs": jobs}


def make_results(phases: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    results: dict[str, Any] = {
        "scenario": "test", "source": "configs/scenarios/test.toml", "seed": 7, "duration_scale": 1.0,
        "started": "2026-11-25T18:30:00Z", "elapsed_s": 10.0,
        "vms": [{"name": "a", "devices": [{"name": "vda", "type": "blk", "backend": "mem", "pid": 1}]}],
        "phases": phases, "ok": True, "errors": []}
    results.update(top)
    return results


def kill_fault(at_s: float = 1.0, recovered_s: Optional[float] = 0.31, errors: int = 0) -> dict[str, Any]:
    return {"vm": "a", "device": "vda", "action": "kill", "at_s": at_s, "old_pid": 11, "new_pid": 12,
            "recovered_s": recovered_s, "guest_saw": {"errors": errors, "max_lat_us": 310000.0, "stall_s": 0.3}}


def mixed_results() -> dict[str, Any]:
    """Two phases with one job of every kind between them, an impairment and a fault."""
    quiet = make_phase("quiet", [
        make_job("disk", "blk", phase="quiet", seconds=5, verified=True,
                 read={"ios": 500, "io_bytes": 2048000, "iops": 100.0, "bw_bytes": 409600.0, "lat_us": lat()}),
        make_job("ping", "ping", device="net0", phase="quiet", rate=99.8, bw_bytes=0.0, seconds=5,
                 ping={"sent": 500, "lost": 0}),
    ])
    noisy = make_phase("noisy", [
        make_job("disk", "blk", phase="noisy", p50=12000.0, p99=310000.0, errors=3, start_s=5.0, seconds=5,
                 verified=False),
        make_job("flood", "tx", device="net0", phase="noisy", rate=50000.0, bw_bytes=75e6, p50=None, p99=None,
                 start_s=5.0, seconds=5, stream={"frames": 250000, "pps": 50000.0, "gbps": 0.6, "drops": 4}),
        make_job("shrink", "balloon", device="balloon0", phase="noisy", p50=None, p99=None,
                 balloon={"target": 134217728, "actual": 134217728, "took_s": 0.2}),
    ], index=1, start_s=5.0, impairments=[
        {"vm": "a", "device": "net0", "kind": "net", "delay": 0.002, "jitter": 0.0, "loss": 0.01, "rate": None,
         "direction": "tx"}], faults=[kill_fault()])
    return make_results([quiet, noisy])


def render(results: dict[str, Any]) -> str:
    console = Console(record=True, width=200, force_terminal=False)
    render_summary(console, results)
    return console.export_text()


def test_latency_switches_to_ms_at_10ms() -> None:
    assert format_latency(None) == "-"
    assert format_latency(55.0) == "55 µs"
    assert format_latency(9999.0) == "9,999 µs"
    assert format_latency(10_000.0) == "10.0 ms"
    assert format_latency(310_000.0) == "310.0 ms"


def test_table_has_one_row_per_job() -> None:
    table = summary_table(mixed_results())
    assert table.row_count == 5
    assert [c.header for c in table.columns][:4] == ["phase", "job", "vm/device", "kind"]


def test_summary_text_shows_rates_latencies_and_checks() -> None:
    text = render(mixed_results())
    assert "100.0 IOPS" in text
    assert "99.8 pings/s" in text
    assert "50,000.0 pps" in text
    assert "75.0" in text                  # MB/s of the flood
    assert "12.0 ms" in text and "310.0 ms" in text
    assert "verified" in text and "NOT verified" in text
    assert "0/500 lost" in text
    assert "4 drops" in text
    assert "→ 128 MiB in 0.20 s" in text


def test_fault_line_says_what_the_guest_saw() -> None:
    text = render(mixed_results())
    assert "fault noisy +1.0 s: kill a/vda (pid 11 -> 12): guest I/O back after 310.0 ms" in text
    assert "0 errors, max latency 310.0 ms, stalled 0.30 s" in text


def test_fault_never_recovered_and_stop_without_pids() -> None:
    phase = make_phase("p", [])
    line = describe_fault(phase, kill_fault(recovered_s=None, errors=2))
    assert "never recovered" in line and "2 errors" in line
    stop = {"vm": "a", "device": "vda", "action": "stop", "at_s": 0.5, "recovered_s": 1.0, "guest_saw": {}}
    line = describe_fault(phase, stop)
    assert line.startswith("fault p +0.5 s: stop a/vda: guest I/O back after 1,000.0 ms")
    assert "pid" not in line


def test_impairments_per_phase_leave_out_unset_fields() -> None:
    text = render(mixed_results())
    assert "impairment noisy: a/net0 net: delay=2ms loss=1% direction=tx" in text
    assert describe_impairment({"vm": "a", "device": "vda", "kind": "blk", "latency": 0.0}) == "a/vda blk: none"


def test_ok_and_failed_with_errors() -> None:
    assert render(mixed_results()).rstrip().endswith("OK")
    text = render(make_results([], ok=False, errors=["vm a: driver exited 1"]))
    assert "error: vm a: driver exited 1" in text
    assert text.rstrip().endswith("FAILED")


def test_empty_results_render() -> None:
    assert summary_table(make_results([])).row_count == 0
    assert "OK" in render(make_results([make_phase("idle", [])]))


def test_write_results_writes_json_and_plots(tmp_path) -> None:
    results = mixed_results()
    paths = write_results(results, tmp_path / "out")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["results.json", "throughput.png", "latency.png"]
    text = (tmp_path / "out" / "results.json").read_text()
    assert json.loads(text) == results
    assert text.startswith('{\n  "scenario"')   # indent 2
