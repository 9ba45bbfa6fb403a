#!/usr/bin/env python3
"""Generate dashboards/*.json (Grafana) from one table of panels.

Every expression uses only metrics simvirt exports (docs/metrics.md); the
test suite evaluates each one against a real Prometheus scraping a running
machine, so a dashboard can't silently point at nothing.
"""
from __future__ import annotations

import json
import pathlib

DS = {"type": "prometheus", "uid": "simvirt-prometheus"}

DASHBOARDS = {
    "overview": ("simvirt overview", [
        ("Block IOPS by device", "sum by (vm, device) (rate(simvirt_requests_total{op=~\"read|write\"}[1m]))", "ops"),
        ("Block throughput by device", "sum by (vm, device) (rate(simvirt_bytes_total{op=~\"read|write\"}[1m]))", "Bps"),
        ("Net frames by direction", "sum by (vm, device, op) (rate(simvirt_requests_total{op=~\"tx|rx\"}[1m]))", "pps"),
        ("Kicks received vs interrupts sent", "sum by (vm) (rate(simvirt_kicks_received_total[1m]))", "ops"),
        ("Errors and drops by reason", "sum by (vm, device, reason) (increase(simvirt_errors_total[5m]))", "short"),
        ("Process CPU by role", "rate(simvirt_process_cpu_seconds_total[1m])", "percentunit"),
        ("Process RSS by role", "simvirt_process_resident_memory_bytes", "bytes"),
    ]),
    "blk": ("simvirt virtio-blk", [
        ("IOPS by op", "sum by (device, op) (rate(simvirt_requests_total{op=~\"read|write|flush|discard|write_zeroes|get_id\"}[1m]))", "ops"),
        ("Bytes by op", "sum by (device, op) (rate(simvirt_bytes_total{op=~\"read|write\"}[1m]))", "Bps"),
        ("Device service time p99", "histogram_quantile(0.99, sum by (le, device, op) (rate(simvirt_device_service_seconds_bucket{op=~\"read|write\"}[1m])))", "s"),
        ("Device service time p50", "histogram_quantile(0.5, sum by (le, device, op) (rate(simvirt_device_service_seconds_bucket{op=~\"read|write\"}[1m])))", "s"),
        ("Driver latency add→used p99", "histogram_quantile(0.99, sum by (le, device, op) (rate(simvirt_request_latency_seconds_bucket{op=~\"read|write\"}[1m])))", "s"),
        ("Driver latency add→used p50", "histogram_quantile(0.5, sum by (le, device, op) (rate(simvirt_request_latency_seconds_bucket{op=~\"read|write\"}[1m])))", "s"),
        ("Requests completed through the driver API", "sum by (device, op) (rate(simvirt_driver_requests_total[1m]))", "ops"),
        ("Bad requests by reason", "sum by (device, reason) (increase(simvirt_errors_total[5m]))", "short"),
    ]),
    "net": ("simvirt virtio-net", [
        ("Frames per second", "sum by (device, op) (rate(simvirt_requests_total{op=~\"tx|rx\"}[1m]))", "pps"),
        ("Bits per second", "8 * sum by (device, op) (rate(simvirt_bytes_total{op=~\"tx|rx\"}[1m]))", "bps"),
        ("Per-frame device time p99", "histogram_quantile(0.99, sum by (le, device, op) (rate(simvirt_device_service_seconds_bucket{op=~\"tx|rx\"}[1m])))", "s"),
        ("Drops by reason", "sum by (device, reason) (increase(simvirt_errors_total[5m]))", "short"),
    ]),
    "balloon": ("simvirt virtio-balloon", [
        ("Balloon target vs actual (pages)", "simvirt_balloon_pages", "short"),
        ("Guest RAM resident on the host", "simvirt_guest_ram_resident_bytes", "bytes"),
        ("Guest statistics", "simvirt_balloon_guest_stat{stat=~\"free_memory|total_memory|available_memory\"}", "bytes"),
        ("Pages moved", "simvirt_balloon_moved_pages", "short"),
    ]),
    "virtqueues": ("simvirt virtqueues", [
        ("Kicks received per queue", "rate(simvirt_kicks_received_total[1m])", "ops"),
        ("Interrupts sent per queue", "rate(simvirt_interrupts_sent_total[1m])", "ops"),
        ("Interrupts suppressed (EVENT_IDX)", "rate(simvirt_interrupts_suppressed_total[1m])", "ops"),
        ("Kicks sent and suppressed by drivers", "rate(simvirt_kicks_sent_total[1m]) + rate(simvirt_kicks_suppressed_total[1m])", "ops"),
        ("Chains per wake-up (mean)", "rate(simvirt_chains_per_wakeup_sum[1m]) / rate(simvirt_chains_per_wakeup_count[1m])", "short"),
        ("Chains processed per queue", "rate(simvirt_chains_processed_total[1m])", "ops"),
        ("Descriptors per chain", "rate(simvirt_descriptors_processed_total[1m]) / rate(simvirt_chains_processed_total[1m])", "short"),
        ("Chains in flight (driver)", "simvirt_chains_in_flight", "short"),
        ("Ring occupancy (driver)", "simvirt_ring_occupancy_ratio", "percentunit"),
        ("vhost-user requests", "sum by (device, request) (increase(simvirt_vhost_user_messages_total[5m]))", "short"),
    ]),
}


def dashboard(uid: str, title: str, panels: list[tuple[str, str, str]]) -> dict:
    out = []
    for i, (ptitle, expr, unit) in enumerate(panels):
        out.append({
            "id": i + 1, "type": "timeseries", "title": ptitle, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": "A", "datasource": DS, "expr": expr, "legendFormat": "__auto"}],
        })
    return {
        "uid": f"simvirt-{uid}", "title": title, "tags": ["simvirt"], "timezone": "browser",
        "schemaVersion": 38, "version": 1, "refresh": "5s", "time": {"from": "now-15m", "to": "now"},
        "templating": {"list": []}, "annotations": {"list": [PHASES]}, "panels": out,
    }


# Scenario phases as annotation regions on every dashboard: Grafana turns each
# series' consecutive non-zero samples into one region titled with its phase.
PHASES = {
    "name": "scenario phases", "datasource": DS, "enable": True, "iconColor": "rgba(255, 152, 48, 0.6)",
    "expr": "simvirt_scenario_phase > 0", "step": "1s", "titleFormat": "{{phase}}",
    "textFormat": "scenario {{scenario}}, phase {{index}}", "useValueForTime": False,
}


def main() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent / "dashboards"
    root.mkdir(exist_ok=True)
    for uid, (title, panels) in DASHBOARDS.items():
        (root / f"{uid}.json").write_text(json.dumps(dashboard(uid, title, panels), indent=2) + "\n")


if __name__ == "__main__":
    main()
