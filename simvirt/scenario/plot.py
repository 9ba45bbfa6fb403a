"""PNG plots of a scenario run: per-second throughput and latency against the phase timeline.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg
canvas directly, never through pyplot: pyplot keeps global figure state and
picks a backend for the whole process, which a library called from the
runner (or from tests, or a notebook) has no business doing.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from simvirt.scenario.report import fault_time

_NAN = float("nan")


def _timed_jobs(results: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(line label, colour, job) for each job with samples; jobs without a timeline have nothing to draw.

    The colour follows the job's place in the results, so a job has the same colour in both PNGs.
    """
    timed = ((phase.get("name", "?"), job) for phase in results.get("phases") or []
             for job in phase.get("jobs") or [] if job.get("timeline"))
    for i, (phase_name, job) in enumerate(timed):
        yield f"{phase_name}/{job.get('name', '?')}", f"C{i}", job


def _series(job: dict[str, Any], key: str, positive: bool = False) -> tuple[list[float], list[float]]:
    """Sample times and values; a missing value (nothing completed that second) becomes NaN, a gap in the line.

    ``positive`` also drops values a log axis cannot show, instead of letting matplotlib clip them to a tiny
    number that would stretch the axis down by decades.
    """
    ts, ys = [], []
    for sample in job["timeline"]:
        v = sample.get(key)
        ok = v is not None and not (positive and v <= 0)
        ts.append(float(sample["t"]))
        ys.append(float(v) if ok else _NAN)
    return ts, ys


def _end_s(results: dict[str, Any]) -> float:
    """The right edge of the x axis: the last phase end, sample or fault, whichever is latest."""
    end = 0.0
    for phase in results.get("phases") or []:
        end = max(end, float(phase.get("start_s", 0.0)) + float(phase.get("duration_s", 0.0)))
        end = max([end, *(fault_time(phase, f) for f in phase.get("faults") or [])])
        for job in phase.get("jobs") or []:
            end = max([end, *(float(s["t"]) for s in job.get("timeline") or [])])
    return end


def _draw_timeline(ax: Axes, results: dict[str, Any], label_phases: bool) -> None:
    """Phase boundaries (grey, named) and faults (red markers at the bottom edge, named by action and device)."""
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for phase in results.get("phases") or []:
        start = float(phase.get("start_s", 0.0))
        ax.axvline(start, color="grey", linewidth=0.8, linestyle=":")
        if label_phases:
            ax.text(start, 1.01, f" {phase.get('name', '?')}", transform=top, fontsize="small",
                    ha="left", va="bottom", color="dimgrey")
        for fault in phase.get("faults") or []:
            t = fault_time(phase, fault)
            ax.plot([t], [0.0], marker="v", color="red", markersize=8, transform=top, clip_on=False,
                    scalex=False, scaley=False, label="_fault")
            ax.text(t, 0.04, f" {fault.get('action', '?')} {fault.get('vm', '?')}/{fault.get('device', '?')}",
                    transform=top, fontsize="x-small", color="red", ha="left", va="bottom")
    end = _end_s(results)
    if end > 0:
        ax.set_xlim(0.0, end)


def _plot(ax: Axes, ts: list[float], ys: list[float], label: str, **style: Any) -> None:
    """One job's line; a lone sample gets a marker, since a one-point line draws nothing."""
    ax.plot(ts, ys, label=label, marker="o" if len(ts) == 1 else None, **style)


def _finish(fig: Figure, axes: list[Axes], results: dict[str, Any], title: str, drew: bool) -> None:
    """Shared furniture: timeline marks, legends, x label, and a note instead of a blank plot when nothing was drawn."""
    for i, ax in enumerate(axes):
        _draw_timeline(ax, results, label_phases=i == 0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(True, alpha=0.3)
    if not drew:
        axes[0].text(0.5, 0.5, "no job samples", transform=axes[0].transAxes, ha="center", va="center",
                     color="grey")
    axes[-1].set_xlabel("seconds since start")
    fig.suptitle(f"{results.get('scenario', '?')}: {title}")


def throughput_figure(results: dict[str, Any]) -> Figure:
    """Rate per second per job, one subplot per rate unit: IOPS and pps on one axis would hide the smaller."""
    by_unit: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for label, color, job in _timed_jobs(results):
        unit = (job.get("summary") or {}).get("rate_unit") or ""
        if unit:  # balloon/pressure: no rate to draw
            by_unit.setdefault(unit, []).append((label, color, job))
    fig = Figure(figsize=(11, 1.5 + 3 * max(1, len(by_unit))), layout="constrained")
    axes = list(fig.subplots(max(1, len(by_unit)), 1, sharex=True, squeeze=False)[:, 0])
    for ax, (unit, jobs) in zip(axes, by_unit.items()):
        for label, color, job in jobs:
            _plot(ax, *_series(job, "rate"), label, color=color)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
    _finish(fig, axes, results, "throughput", bool(by_unit))
    return fig


def latency_figure(results: dict[str, Any]) -> Figure:
    """p50 solid and p99 dashed in the job's colour, log y: a fault's stall and a quiet phase differ by decades."""
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax = fig.subplots()
    drew = False
    for label, color, job in _timed_jobs(results):
        p50, p99 = _series(job, "lat_p50_us", positive=True), _series(job, "lat_p99_us", positive=True)
        if all(math.isnan(v) for v in p50[1] + p99[1]):
            continue
        _plot(ax, *p50, f"{label} p50", color=color)
        _plot(ax, *p99, f"{label} p99", color=color, linestyle="--")
        drew = True
    if drew:
        ax.set_yscale("log")
    ax.set_ylabel("latency (µs)")
    _finish(fig, [ax], results, "latency", drew)
    return fig


def _save(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig).print_png(str(path))
    return str(path)


def plot_results(results: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Write ``throughput.png`` and ``latency.png`` into ``out_dir``; returns the paths.

    Both are written even with nothing to draw, so a run's output directory always has the same files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_save(throughput_figure(results), out / "throughput.png"),
            _save(latency_figure(results), out / "latency.png")]
