"""Plots: the figures have a line per job, and the PNGs are real, for full, empty and ragged results."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from simvirt.scenario.plot import latency_figure, plot_results, throughput_figure

from .test_report import make_job, make_phase, make_results, mixed_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def job_lines(fig: Figure) -> list[Line2D]:
    """Lines with a label: jobs. Phase boundaries and fault markers are drawn unlabelled ("_..." labels)."""
    return [ln for ax in fig.axes for ln in ax.lines if not ln.get_label().startswith("_")]


def assert_pngs(paths: list[str]) -> None:
    for p in paths:
        data = Path(p).read_bytes()
        assert data.startswith(PNG_MAGIC), p
        assert len(data) > 5000, p


def test_throughput_one_subplot_per_unit_and_a_line_per_job() -> None:
    fig = throughput_figure(mixed_results())
    # blk x2 (IOPS), ping (pings/s), tx (pps); the balloon job has no timeline and no rate
    assert sorted(ax.get_ylabel() for ax in fig.axes) == ["IOPS", "pings/s", "pps"]
    assert sorted(ln.get_label() for ln in job_lines(fig)) == ["noisy/disk", "noisy/flood", "quiet/disk",
                                                              "quiet/ping"]
    assert fig.axes[-1].get_xlabel() == "seconds since start"


def test_latency_p50_solid_p99_dashed_log_scale() -> None:
    fig = latency_figure(mixed_results())
    lines = {ln.get_label(): ln for ln in job_lines(fig)}
    # the flood's latencies are all None: no lines for it
    assert sorted(lines) == ["noisy/disk p50", "noisy/disk p99", "quiet/disk p50", "quiet/disk p99",
                             "quiet/ping p50", "quiet/ping p99"]
    assert lines["quiet/disk p50"].get_linestyle() == "-"
    assert lines["quiet/disk p99"].get_linestyle() == "--"
    assert lines["quiet/disk p50"].get_color() == lines["quiet/disk p99"].get_color()
    assert fig.axes[0].get_yscale() == "log"


def test_phases_are_labelled_and_faults_marked() -> None:
    results = mixed_results()
    fig = latency_figure(results)
    ax = fig.axes[0]
    texts = [t.get_text().strip() for t in ax.texts]
    assert "quiet" in texts and "noisy" in texts
    assert "kill a/vda" in texts
    fault_marks = [ln for ln in ax.lines if ln.get_label() == "_fault"]
    assert len(fault_marks) == 1
    assert list(fault_marks[0].get_xdata()) == [6.0]   # noisy starts at 5 s, fault 1 s into it
    assert fault_marks[0].get_color() == "red"
    assert ax.get_xlim() == (0.0, 10.0)


@pytest.mark.parametrize("results", [
    pytest.param(make_results([]), id="no-phases"),
    pytest.param(make_results([make_phase("idle", [])]), id="no-jobs"),
    pytest.param(make_results([make_phase("p", [make_job("one", seconds=1)])]), id="one-sample"),
    pytest.param(make_results([make_phase("p", [make_job("quiet", p50=None, p99=None, seconds=3)])]),
                 id="no-latencies"),
    pytest.param(make_results([make_phase("p", [make_job("zero", rate=0.0, p50=0.0, p99=0.0, seconds=2)])]),
                 id="zero-latencies"),
])
def test_degenerate_results_still_plot(tmp_path: Path, results: dict[str, Any]) -> None:
    paths = plot_results(results, tmp_path)
    assert [Path(p).name for p in paths] == ["throughput.png", "latency.png"]
    assert_pngs(paths)


def test_partly_missing_latencies_leave_gaps() -> None:
    job = make_job("gappy", seconds=3)
    job["timeline"][1].update(lat_p50_us=None, lat_p99_us=None)
    fig = latency_figure(make_results([make_phase("p", [job])]))
    assert len(job_lines(fig)) == 2
    ys = job_lines(fig)[0].get_ydata()
    assert ys[0] == 50.0 and ys[1] != ys[1]    # NaN: a gap, not a drop to zero


def test_lone_sample_gets_a_marker() -> None:
    fig = throughput_figure(make_results([make_phase("p", [make_job("one", seconds=1)])]))
    (line,) = job_lines(fig)
    assert line.get_marker() == "o"


def test_plot_results_writes_real_pngs(tmp_path: Path) -> None:
    paths = plot_results(mixed_results(), tmp_path / "new")
    assert [Path(p).name for p in paths] == ["throughput.png", "latency.png"]
    assert_pngs(paths)


def test_a_job_keeps_its_colour_across_figures() -> None:
    results = mixed_results()
    rates = {ln.get_label(): ln.get_color() for ln in job_lines(throughput_figure(results))}
    lats = {ln.get_label(): ln.get_color() for ln in job_lines(latency_figure(results))}
    assert len(set(rates.values())) == len(rates)
    for job in ("quiet/disk", "quiet/ping", "noisy/disk"):
        assert lats[f"{job} p50"] == lats[f"{job} p99"] == rates[job]


def test_plotting_leaves_pyplot_alone(tmp_path: Path) -> None:
    """The runner's process (or a notebook) keeps its backend: plotting never goes through pyplot, which is
    what picks a process-wide backend (even reading ``rcParams['backend']`` imports it, so this test does not)."""
    code = ("import sys; from simvirt.scenario.plot import plot_results;"
            f"plot_results({{'phases': []}}, {str(tmp_path)!r});"
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
