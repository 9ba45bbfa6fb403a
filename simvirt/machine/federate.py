"""One scrape address for a whole machine.

The driver process serves a registry that merges its own metrics with every
device process's, fetched from their private ports at scrape time. Families
with the same name are merged into one (the text format allows a name only
once), and process-level families (``simvirt_process_*``) get a ``role``
label so the driver's and each device's CPU/RSS stay distinct series.
"""
from __future__ import annotations

import urllib.request
from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class MachineCollector(Collector):
    def __init__(self, own: CollectorRegistry, targets: dict[str, str], timeout: float = 2.0) -> None:
        self.own = own
        self.targets = targets  # role -> http://127.0.0.1:PORT/metrics
        self.timeout = timeout

    def describe(self) -> list[Metric]:
        return []  # names are only known at scrape time; skip the registry's collision check

    def _sources(self) -> Iterable[tuple[str, Iterable[Metric]]]:
        yield "driver", self.own.collect()
        for role, url in self.targets.items():
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as r:
                    text = r.read().decode()
            except OSError:
                continue
            yield role, text_string_to_metric_families(text)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for role, families in self._sources():
            for fam in families:
                if role != "driver" and not fam.name.startswith("simvirt_"):
                    continue  # the children's python_gc_* etc. would collide with ours
                if fam.name.startswith("simvirt_process_") and fam.name != "simvirt_process_info":
                    for smp in fam.samples:
                        smp.labels["role"] = role
                have = merged.get(fam.name)
                if have is None:
                    merged[fam.name] = fam
                else:
                    have.samples.extend(fam.samples)
        return list(merged.values())


def machine_registry(own: CollectorRegistry, targets: dict[str, str]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MachineCollector(own, targets))
    return reg
