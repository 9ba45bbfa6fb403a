"""``simvirt top``: a live terminal view of a running machine, from its metrics.

It reads the same scrape address Prometheus does (``simvirt run
--metrics-port``, or a device's ``--metrics-port``) and shows, per device
and queue, what changed since the last look: request and byte rates,
kicks and interrupts (and how many EVENT_IDX saved), service-time
percentiles from the histogram buckets, errors, and the balloon's state.
"""
from __future__ import annotations

import argparse
import time
import urllib.request
from collections import defaultdict
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

Key = tuple


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _sum_by(samples: list[tuple[dict, float]], *keys: str) -> dict[Key, float]:
    acc: dict[Key, float] = defaultdict(float)
    for labels, value in samples:
        acc[tuple(labels.get(k, "") for k in keys)] += value
    return acc


def _quantile(buckets: list[tuple[float, float]], q: float) -> Optional[float]:
    """Prometheus-style histogram_quantile over (le, cumulative count) deltas."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0)
        prev_le, prev_c = le, c
    return None


def _fmt_rate(v: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def _fmt_us(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def render(prev: dict, cur: dict, dt: float, url: str) -> Group:
    def delta(name: str, *keys: str) -> dict[Key, float]:
        a = _sum_by(cur.get(name, []), *keys)
        b = _sum_by(prev.get(name, []), *keys)
        return {k: max(0.0, v - b.get(k, 0.0)) / dt for k, v in a.items()}

    ops = delta("simvirt_requests_total", "vm", "device", "op")
    byts = delta("simvirt_bytes_total", "vm", "device", "op")
    t = Table(title=f"simvirt top — {url}  (every {dt:.1f} s)", expand=True)
    for col in ("vm", "device", "op", "req/s", "MB/s", "svc p50 us", "svc p99 us"):
        t.add_column(col, justify="right" if col not in ("vm", "device", "op") else "left")
    hist_now: dict[Key, dict[float, float]] = defaultdict(dict)
    hist_prev: dict[Key, dict[float, float]] = defaultdict(dict)
    for src, dst in ((cur, hist_now), (prev, hist_prev)):
        for labels, value in src.get("simvirt_device_service_seconds_bucket", []):
            k = (labels.get("vm", ""), labels.get("device", ""), labels.get("op", ""))
            dst[k][float(labels["le"])] = value
    for k in sorted(ops):
        if ops[k] == 0 and byts.get(k, 0) == 0:
            continue
        b = [(le, c - hist_prev[k].get(le, 0.0)) for le, c in hist_now[k].items()]
        t.add_row(k[0], k[1], k[2], _fmt_rate(ops[k]), f"{byts.get(k, 0) / 1e6:.1f}",
                  _fmt_us(_quantile(b, 0.5)), _fmt_us(_quantile(b, 0.99)))
    q = Table(title="virtqueues", expand=True)
    for col in ("vm", "device", "queue", "kicks/s", "irqs/s", "irqs saved/s", "chains/s", "chains/wake-up"):
        q.add_column(col, justify="right" if col not in ("vm", "device") else "left")
    kicks = delta("simvirt_kicks_received_total", "vm", "device", "queue")
    irqs = delta("simvirt_interrupts_sent_total", "vm", "device", "queue")
    saved = delta("simvirt_interrupts_suppressed_total", "vm", "device", "queue")
    chains = delta("simvirt_chains_processed_total", "vm", "device", "queue")
    wakes = delta("simvirt_chains_per_wakeup_count", "vm", "device", "queue")
    for k in sorted(chains):
        if chains[k] == 0 and kicks.get(k, 0) == 0:
            continue
        per = chains[k] / wakes[k] if wakes.get(k) else 0.0
        q.add_row(*k, _fmt_rate(kicks.get(k, 0)), _fmt_rate(irqs.get(k, 0)), _fmt_rate(saved.get(k, 0)),
                  _fmt_rate(chains[k]), f"{per:.1f}")
    parts: list = [t, q]
    pages = _sum_by(cur.get("simvirt_balloon_pages", []), "device", "kind")
    resident = _sum_by(cur.get("simvirt_guest_ram_resident_bytes", []), "device")
    for (dev, kind) in sorted({(d, k) for d, k in pages if k == "target"}):
        parts.append(Text(f"balloon {dev}: target {pages[(dev, 'target')]:.0f} pages, actual "
                          f"{pages.get((dev, 'actual'), 0):.0f} pages; guest RAM resident on the host "
                          f"{resident.get((dev,), 0) / 2**20:.1f} MiB"))
    errors = delta("simvirt_errors_total", "device", "reason")
    bad = {k: v for k, v in errors.items() if v}
    parts.append(Text("errors/s: " + (", ".join(f"{d}:{r}={v:.1f}" for (d, r), v in sorted(bad.items())) or "none")))
    return Group(*parts)


def run_top(args: argparse.Namespace) -> int:
    url = args.url or f"http://127.0.0.1:{args.port}/metrics"
    console = Console()
    prev = scrape(url)
    t_prev = time.monotonic()
    n = 0
    with Live(Text(f"simvirt top: waiting for {url} ..."), console=console, refresh_per_second=4,
              screen=False, transient=False) as live:
        while args.iterations == 0 or n < args.iterations:
            time.sleep(args.interval)
            try:
                cur = scrape(url)
            except OSError as e:
                live.update(Text(f"simvirt top: {url}: {e}"))
                continue
            now = time.monotonic()
            live.update(render(prev, cur, now - t_prev, url))
            prev, t_prev = cur, now
            n += 1
    return 0
