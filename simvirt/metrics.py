"""Prometheus metrics shared by every simvirt process.

All names start with ``simvirt_``; labels are ``vm``, ``device`` and
``queue`` where they apply (docs/metrics.md lists them). Hot paths never
touch a prometheus object per descriptor: they count into plain ints on a
:class:`QueueStats` and :meth:`QueueStats.flush` moves the deltas into the
prometheus children once per wake-up.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client import ProcessCollector, PlatformCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY, namespace="simvirt")
PlatformCollector(registry=REGISTRY)

_Q = ["vm", "device", "queue"]
_D = ["vm", "device"]

KICKS_RECEIVED = Counter("simvirt_kicks_received", "Kick eventfd wake-ups seen by a device", _Q, registry=REGISTRY)
KICKS_SENT = Counter("simvirt_kicks_sent", "Kicks written by a driver", _Q, registry=REGISTRY)
KICKS_SUPPRESSED = Counter("simvirt_kicks_suppressed", "Driver publishes that needed no kick (EVENT_IDX/NO_NOTIFY)", _Q, registry=REGISTRY)
INTERRUPTS_SENT = Counter("simvirt_interrupts_sent", "Call eventfd writes by a device", _Q, registry=REGISTRY)
INTERRUPTS_RECEIVED = Counter("simvirt_interrupts_received", "Call eventfd wake-ups seen by a driver", _Q, registry=REGISTRY)
INTERRUPTS_SUPPRESSED = Counter("simvirt_interrupts_suppressed", "Used-ring updates that needed no interrupt (EVENT_IDX/NO_INTERRUPT)", _Q, registry=REGISTRY)
CHAINS = Counter("simvirt_chains_processed", "Descriptor chains consumed by a device", _Q, registry=REGISTRY)
DESCRIPTORS = Counter("simvirt_descriptors_processed", "Descriptors walked by a device", _Q, registry=REGISTRY)
BATCH = Histogram("simvirt_chains_per_wakeup", "Chains handled per device wake-up", _Q,
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024), registry=REGISTRY)
IN_FLIGHT = Gauge("simvirt_chains_in_flight", "Chains made available by the driver and not yet used", _Q, registry=REGISTRY)
RING_OCCUPANCY = Gauge("simvirt_ring_occupancy_ratio", "In-flight chains / queue size", _Q, registry=REGISTRY)
ERRORS = Counter("simvirt_errors", "Bad input and failed requests by reason", _D + ["reason"], registry=REGISTRY)
REQUESTS = Counter("simvirt_requests", "Requests by operation", _D + ["op"], registry=REGISTRY)
BYTES = Counter("simvirt_bytes", "Payload bytes by operation", _D + ["op"], registry=REGISTRY)
_LAT_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0)
SERVICE_TIME = Histogram("simvirt_device_service_seconds", "Device-side time per wake-up batch divided by its chains", _D + ["op"],
                         buckets=_LAT_BUCKETS, registry=REGISTRY)
REQUEST_LATENCY = Histogram("simvirt_request_latency_seconds", "Driver-side latency from add to used", _D + ["op"],
                            buckets=_LAT_BUCKETS, registry=REGISTRY)
VHOST_USER_MESSAGES = Counter("simvirt_vhost_user_messages", "vhost-user requests handled", _D + ["request"], registry=REGISTRY)
FRONTEND_CONNECTIONS = Counter("simvirt_frontend_connections", "vhost-user frontends that connected", _D, registry=REGISTRY)
PROCESS_INFO = Gauge("simvirt_process_info", "One per simvirt process", ["vm", "role", "pid"], registry=REGISTRY)


class QueueStats:
    """Plain-int counters for one queue, flushed to prometheus per wake-up."""

    __slots__ = ("labels", "kicks", "interrupts", "suppressed", "chains", "descriptors", "_children")

    def __init__(self, vm: str, device: str, queue: str) -> None:
        self.labels = (vm, device, queue)
        self.kicks = self.interrupts = self.suppressed = self.chains = self.descriptors = 0
        self._children = (
            KICKS_RECEIVED.labels(*self.labels),
            INTERRUPTS_SENT.labels(*self.labels),
            INTERRUPTS_SUPPRESSED.labels(*self.labels),
            CHAINS.labels(*self.labels),
            DESCRIPTORS.labels(*self.labels),
            BATCH.labels(*self.labels),
        )

    def flush(self, batch: int) -> None:
        k, i, s, c, d, b = self._children
        if self.kicks:
            k.inc(self.kicks)
        if self.interrupts:
            i.inc(self.interrupts)
        if self.suppressed:
            s.inc(self.suppressed)
        if self.chains:
            c.inc(self.chains)
        if self.descriptors:
            d.inc(self.descriptors)
        if batch:
            b.observe(batch)
        self.kicks = self.interrupts = self.suppressed = self.chains = self.descriptors = 0


def count_error(vm: str, device: str, reason: str, n: int = 1) -> None:
    ERRORS.labels(vm, device, reason).inc(n)


def serve(port: Optional[int], addr: str = "127.0.0.1") -> Optional[int]:
    """Expose REGISTRY over HTTP; port 0 picks a free one. Returns the port."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server.server_address[1]


def mark_process(vm: str, role: str) -> None:
    PROCESS_INFO.labels(vm, role, str(os.getpid())).set(time.time())
