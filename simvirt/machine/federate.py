"""One scrape address for a whole machine.

The driver process serves its own registry plus every device process's
metrics, fetched from their private ports at scrape time and re-exposed
unchanged (their samples already carry ``vm``/``device`` labels). Process
metrics of the children are renamed per role so they don't collide.
"""
from __future__ import annotations

import urllib.request
from typing import Iterable

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class FederatingCollector(Collector):
    def __init__(self, targets: dict[str, str], timeout: float = 2.0) -> None:
        self.targets = targets  # role -> http://127.0.0.1:PORT/metrics
        self.timeout = timeout

    def collect(self) -> Iterable[Metric]:
        for role, url in self.targets.items():
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for fam in text_string_to_metric_families(text):
                if not fam.name.startswith("simvirt_"):
                    continue  # python_gc_* etc. of children would collide with ours
                if fam.name.startswith("simvirt_process_"):
                    for smp in fam.samples:
                        smp.labels["role"] = role
                yield fam
