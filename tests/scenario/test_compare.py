"""``compare``: strict matching by names, deltas and verdicts, bad files, and the CLI."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from simvirt.scenario.compare import ResultsError, compare, compare_main, load_results, render_compare

from .test_report import make_job, make_phase, make_results


def by_metric(rows: list[dict[str, Any]], phase: str, job: str) -> dict[str, dict[str, Any]]:
    return {r["metric"]: r for r in rows if r["phase"] == phase and r["job"] == job}


def one_job(**kw: Any) -> dict[str, Any]:
    return make_results([make_phase("p", [make_job("disk", **kw)])])


def test_rate_up_is_better_latency_up_is_worse() -> None:
    a = one_job(rate=100.0, bw_bytes=1e6, p50=50.0, p99=100.0, errors=0)
    b = one_job(rate=150.0, bw_bytes=0.5e6, p50=50.0, p99=200.0, errors=0)
    rows = by_metric(compare(a, b), "p", "disk")
    assert list(rows) == ["rate", "bw_bytes", "lat p50", "lat p99", "errors"]
    assert rows["rate"] == {"phase": "p", "job": "disk", "metric": "rate", "a": 100.0, "b": 150.0,
                            "delta_pct": 50.0, "verdict": "better"}
    assert rows["bw_bytes"]["delta_pct"] == -50.0 and rows["bw_bytes"]["verdict"] == "worse"
    assert rows["lat p50"]["delta_pct"] == 0.0 and rows["lat p50"]["verdict"] == "same"
    assert rows["lat p99"]["delta_pct"] == 100.0 and rows["lat p99"]["verdict"] == "worse"
    assert rows["errors"]["verdict"] == "same"


def test_latency_down_is_better() -> None:
    rows = by_metric(compare(one_job(p99=200.0), one_job(p99=100.0)), "p", "disk")
    assert rows["lat p99"]["delta_pct"] == -50.0 and rows["lat p99"]["verdict"] == "better"


@pytest.mark.parametrize("rate_b,threshold,verdict", [
    (104.0, 5.0, "same"), (105.0, 5.0, "same"), (106.0, 5.0, "better"), (96.0, 5.0, "same"),
    (94.0, 5.0, "worse"), (106.0, 10.0, "same"), (101.0, 0.0, "better"),
])
def test_threshold_is_noise(rate_b: float, threshold: float, verdict: str) -> None:
    rows = by_metric(compare(one_job(rate=100.0), one_job(rate=rate_b), threshold=threshold), "p", "disk")
    assert rows["rate"]["verdict"] == verdict


def test_changes_from_zero_have_no_percentage_but_a_verdict() -> None:
    rows = by_metric(compare(one_job(errors=0), one_job(errors=3)), "p", "disk")
    assert rows["errors"]["delta_pct"] is None and rows["errors"]["verdict"] == "worse"


def test_value_on_one_side_only_is_na_and_absent_or_idle_metrics_have_no_row() -> None:
    rows = by_metric(compare(one_job(p50=None, p99=80.0), one_job(p50=40.0, p99=None)), "p", "disk")
    assert rows["lat p50"]["verdict"] == "n/a" and rows["lat p50"]["delta_pct"] is None
    assert rows["lat p99"]["verdict"] == "n/a"
    balloon = make_results([make_phase("p", [make_job("shrink", "balloon", p50=None, p99=None)])])
    assert list(by_metric(compare(balloon, balloon), "p", "shrink")) == ["errors"]
    ping = make_results([make_phase("p", [make_job("ping", "ping", bw_bytes=0.0)])])
    assert list(by_metric(compare(ping, ping), "p", "ping")) == ["rate", "lat p50", "lat p99", "errors"]


def test_matching_is_by_names_not_positions() -> None:
    a = make_results([make_phase("quiet", [make_job("disk", rate=100.0), make_job("ping", "ping")]),
                      make_phase("noisy", [make_job("disk", rate=100.0)], index=1)])
    b = make_results([make_phase("quiet", [make_job("pong", "ping"), make_job("disk", rate=200.0)]),
                      make_phase("storm", [make_job("disk")], index=1)])
    rows = compare(a, b)
    assert by_metric(rows, "quiet", "disk")["rate"]["verdict"] == "better"
    unmatched = [(r["phase"], r["job"], r["verdict"]) for r in rows if r["metric"] is None]
    assert unmatched == [("quiet", "ping", "only in A"), ("noisy", "disk", "only in A"),
                         ("quiet", "pong", "only in B"), ("storm", "disk", "only in B")]
    only = next(r for r in rows if r["job"] == "ping")
    assert only["a"] is None and only["b"] is None and only["delta_pct"] is None


def test_repeated_phase_names_match_in_order() -> None:
    def run(r1: float, r2: float) -> dict[str, Any]:
        return make_results([make_phase("quiet", [make_job("disk", rate=r1)]), make_phase("noisy", []),
                             make_phase("quiet", [make_job("disk", rate=r2)])])
    rows = compare(run(100.0, 100.0), run(100.0, 50.0))
    assert by_metric(rows, "quiet", "disk")["rate"]["verdict"] == "same"
    assert by_metric(rows, "quiet#2", "disk")["rate"]["verdict"] == "worse"


def test_render_compare_table_and_setup_warning() -> None:
    a = one_job(rate=100.0)
    b = one_job(rate=200.0)
    b["seed"] = 8
    rows = compare(a, b)
    console = Console(record=True, width=160, force_terminal=False)
    render_compare(console, rows, a, b)
    text = console.export_text()
    assert "+100.0%" in text and "better" in text
    assert "0.4 MB/s" in text and "80 µs" in text
    assert "runs differ in seed: A 7, B 8" in text
    assert "1 better, 4 same" in text


def write(tmp_path: Path, name: str, data: Any) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_cli_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a.json", one_job(rate=100.0))
    b = write(tmp_path, "b.json", one_job(rate=90.0))
    assert compare_main([a, b, "--json", "--threshold", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["a"] == a and out["b"] == b and out["threshold"] == 20.0
    assert by_metric(out["rows"], "p", "disk")["rate"] == {
        "phase": "p", "job": "disk", "metric": "rate", "a": 100.0, "b": 90.0, "delta_pct": -10.0, "verdict": "same"}


def test_cli_table_exits_zero_even_when_worse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a.json", one_job(rate=100.0))
    b = write(tmp_path, "b.json", one_job(rate=10.0))
    assert compare_main([a, b]) == 0
    assert "worse" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (None, "cannot read"),
    ("{not json", "not JSON"),
    ([1, 2], "top level is list, not an object"),
    ({"scenario": "x"}, "missing 'phases' list"),
    ({"phases": [{"jobs": []}]}, "phases[0] has no 'name'"),
    ({"phases": [{"name": "p"}]}, "phase 'p' has no 'jobs' list"),
    ({"phases": [{"name": "p", "jobs": [{"summary": {}}]}]}, "phase 'p' jobs[0] has no 'name'"),
    ({"phases": [{"name": "p", "jobs": [{"name": "j"}]}]}, "job p/j has no 'summary'"),
    ({"phases": [{"name": "p", "jobs": [{"name": "j", "summary": {"rate": "fast"}}]}]},
     "job p/j rate is 'fast', not a number"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 content: Any, message: str) -> None:
    bad = str(tmp_path / "missing.json") if content is None else write(tmp_path, "bad.json", content)
    good = write(tmp_path, "good.json", one_job())
    with pytest.raises(ResultsError) as exc:
        load_results(bad)
    assert str(exc.value).startswith(bad + ": ") and message in str(exc.value)
    assert compare_main([good, bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"simvirt compare: error: {bad}: ") and message in err


def test_cli_rejects_negative_threshold(tmp_path: Path) -> None:
    a = write(tmp_path, "a.json", one_job())
    with pytest.raises(SystemExit) as exc:
        compare_main([a, a, "--threshold", "-1"])
    assert exc.value.code == 2
