"""Prometheus metrics shared by every simvirt process.

All names start with ``simvirt_``; labels are ``vm``, ``device`` and
``queue`` where they apply (docs/metrics.md lists them). Hot paths never
touch a prometheus object per descriptor: they count into plain ints on a
:class:`QueueStats` and :meth:`QueueStats.flush` moves the deltas into the
prometheus children once per wake-up.
"""
from __future__ import annotations

import bisect
import os
import time
import weakref
from typing import Optional, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    start_http_server,
)
from prometheus_client import ProcessCollector, PlatformCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from prometheus_client import disable_created_metrics

disable_created_metrics()  # no *_created series: they double every counter for nothing we use
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY, namespace="simvirt")
PlatformCollector(registry=REGISTRY)

_Q = ["vm", "device", "queue"]
_D = ["vm", "device"]

KICKS_SENT = Counter("simvirt_kicks_sent", "Kicks written by a driver", _Q, registry=REGISTRY)
KICKS_SUPPRESSED = Counter("simvirt_kicks_suppressed", "Driver publishes that needed no kick (EVENT_IDX/NO_NOTIFY)", _Q, registry=REGISTRY)
INTERRUPTS_RECEIVED = Counter("simvirt_interrupts_received", "Call eventfd wake-ups seen by a driver", _Q, registry=REGISTRY)
IN_FLIGHT = Gauge("simvirt_chains_in_flight", "Chains made available by the driver and not yet used", _Q, registry=REGISTRY)
RING_OCCUPANCY = Gauge("simvirt_ring_occupancy_ratio", "In-flight chains / queue size", _Q, registry=REGISTRY)
ERRORS = Counter("simvirt_errors", "Bad input and failed requests by reason", _D + ["reason"], registry=REGISTRY)
DRIVER_REQUESTS = Counter("simvirt_driver_requests", "Requests completed by a guest driver, by operation", _D + ["op"], registry=REGISTRY)
_LAT_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0)
VHOST_USER_MESSAGES = Counter("simvirt_vhost_user_messages", "vhost-user requests handled", _D + ["request"], registry=REGISTRY)
FRONTEND_CONNECTIONS = Counter("simvirt_frontend_connections", "vhost-user frontends that connected", _D, registry=REGISTRY)
PROCESS_INFO = Gauge("simvirt_process_info", "One per simvirt process", ["vm", "role", "pid"], registry=REGISTRY)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


class _Hist:
    """Histogram buckets as plain ints; ``observe(v, n)`` records n observations of v."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def family_buckets(self) -> list[tuple[str, float]]:
        out = []
        acc = 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class QueueStats:
    """Device-side per-queue counters: plain ints, read by the collector at scrape time.

    The data path adds to attributes; nothing on it calls into
    prometheus_client, so metrics cost a few integer additions per batch.
    """

    __slots__ = ("labels", "kicks", "interrupts", "suppressed", "chains", "descriptors", "batches", "__weakref__")

    def __init__(self, vm: str, device: str, queue: str) -> None:
        self.labels = [vm, device, queue]
        self.kicks = self.interrupts = self.suppressed = self.chains = self.descriptors = 0
        self.batches = _Hist(_BATCH_BUCKETS)
        _LIVE_QUEUES.add(self)

    def flush(self, batch: int) -> None:
        """Record one wake-up that handled ``batch`` chains."""
        if batch:
            self.batches.observe(batch)


class OpStats:
    """Device-side per-operation counters and service-time histogram, as plain ints."""

    __slots__ = ("labels", "requests", "bytes", "service", "__weakref__")

    def __init__(self, vm: str, device: str, op: str) -> None:
        self.labels = [vm, device, op]
        self.requests = 0
        self.bytes = 0
        self.service = _Hist(_LAT_BUCKETS)
        _LIVE_OPS.add(self)


class LatencyStats:
    """Driver-side add-to-used latency per operation, as a plain-int histogram."""

    __slots__ = ("labels", "hist", "__weakref__")

    def __init__(self, vm: str, device: str, op: str) -> None:
        self.labels = [vm, device, op]
        self.hist = _Hist(_LAT_BUCKETS)
        _LIVE_LAT.add(self)

    def observe(self, seconds: float) -> None:
        self.hist.observe(seconds)


class Holder(Protocol):
    """What an impairment holds right now (a device's impairer)."""

    def held(self) -> int: ...


class ImpairStats:
    """What a device's impairment did, as plain ints (read at scrape time, like :class:`OpStats`).

    ``delayed``: requests/frames held for added latency or delay; ``throttled``:
    requests that waited for rate-limiter tokens; ``dropped``: frames lost
    (netem loss or queue limit); ``failed``: requests failed by error
    injection. ``held`` (waiting right now) is not a counter but read from
    ``holder``, the device's current impairer (set by ``set_impairment``), so
    the gauge and the control socket's ``info`` always agree with what is held.
    """

    __slots__ = ("labels", "delayed", "throttled", "dropped", "failed", "holder", "__weakref__")
    WHAT = ("delayed", "throttled", "dropped", "failed")

    def __init__(self, vm: str, device: str) -> None:
        self.labels = [vm, device]
        self.delayed = self.throttled = self.dropped = self.failed = 0
        self.holder: Optional[Holder] = None
        _LIVE_IMPAIR.add(self)

    @property
    def held(self) -> int:
        h = self.holder
        return h.held() if h is not None else 0


_LIVE_LAT: "weakref.WeakSet[LatencyStats]" = weakref.WeakSet()
_LIVE_QUEUES: "weakref.WeakSet[QueueStats]" = weakref.WeakSet()
_LIVE_OPS: "weakref.WeakSet[OpStats]" = weakref.WeakSet()
_LIVE_IMPAIR: "weakref.WeakSet[ImpairStats]" = weakref.WeakSet()


class _HotPathCollector(Collector):
    """Every plain-int stats object above, turned into metric families at scrape time."""

    def collect(self):
        qs = list(_LIVE_QUEUES)
        fams = [
            ("simvirt_kicks_received", "Kick eventfd wake-ups seen by a device", "kicks"),
            ("simvirt_interrupts_sent", "Call eventfd writes by a device", "interrupts"),
            ("simvirt_interrupts_suppressed", "Used-ring updates that needed no interrupt (EVENT_IDX/NO_INTERRUPT)", "suppressed"),
            ("simvirt_chains_processed", "Descriptor chains consumed by a device", "chains"),
            ("simvirt_descriptors_processed", "Descriptors walked by a device", "descriptors"),
        ]
        for name, doc, attr in fams:
            f = CounterMetricFamily(name, doc, labels=_Q)
            for q in qs:
                f.add_metric(q.labels, getattr(q, attr))
            yield f
        h = HistogramMetricFamily("simvirt_chains_per_wakeup", "Chains handled per device wake-up", labels=_Q)
        for q in qs:
            h.add_metric(q.labels, q.batches.family_buckets(), q.batches.sum)
        yield h
        ops = list(_LIVE_OPS)
        r = CounterMetricFamily("simvirt_requests", "Requests served by a device, by operation", labels=_D + ["op"])
        b = CounterMetricFamily("simvirt_bytes", "Payload bytes served by a device, by operation", labels=_D + ["op"])
        sv = HistogramMetricFamily("simvirt_device_service_seconds",
                                   "Device-side service time per request (batch time shared by its requests)", labels=_D + ["op"])
        for o in ops:
            r.add_metric(o.labels, o.requests)
            b.add_metric(o.labels, o.bytes)
            sv.add_metric(o.labels, o.service.family_buckets(), o.service.sum)
        yield r
        yield b
        yield sv
        lat = HistogramMetricFamily("simvirt_request_latency_seconds", "Driver-side latency from add to used",
                                    labels=_D + ["op"])
        for st in list(_LIVE_LAT):
            lat.add_metric(st.labels, st.hist.family_buckets(), st.hist.sum)
        yield lat
        imp = list(_LIVE_IMPAIR)
        c = CounterMetricFamily("simvirt_impaired", "Requests or frames affected by an impairment, by effect",
                                labels=_D + ["what"])
        g = GaugeMetricFamily("simvirt_impaired_held", "Requests or frames held by an impairment right now", labels=_D)
        for st in imp:
            for what in ImpairStats.WHAT:
                c.add_metric(st.labels + [what], getattr(st, what))
            g.add_metric(st.labels, st.held)
        yield c
        yield g


REGISTRY.register(_HotPathCollector())


def declare_errors(vm: str, device: str, reasons: list[str]) -> None:
    """Create the error series at 0, so dashboards and alerts see them before the first error."""
    for reason in reasons:
        ERRORS.labels(vm, device, reason)


def count_error(vm: str, device: str, reason: str, n: int = 1) -> None:
    ERRORS.labels(vm, device, reason).inc(n)


def serve(port: Optional[int], addr: str = "127.0.0.1", registry: Optional[CollectorRegistry] = None) -> Optional[int]:
    """Expose REGISTRY (or ``registry``) over HTTP; port 0 picks a free one. Returns the port."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=registry or REGISTRY)
    return server.server_address[1]


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``, in exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
               if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()))


def scrape(port: int, name: str, addr: str = "127.0.0.1", **labels: str) -> float:
    """:func:`sample_sum` over what a /metrics endpoint serves right now."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=5).read().decode()
    return sample_sum(text, name, **labels)


def mark_process(vm: str, role: str) -> None:
    PROCESS_INFO.labels(vm, role, str(os.getpid())).set(time.time())
