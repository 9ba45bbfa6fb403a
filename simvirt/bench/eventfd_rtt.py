"""The notification floor: a plain eventfd round trip between two Python processes.

Every kick/interrupt round trip pays at least this (two blocking reads, two
wake-ups). Measured in the same run as the thing compared against it.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

from simvirt.bench.stats import percentiles_us


def eventfd_rtt(count: int = 2000, cpus: Optional[Sequence[int]] = None) -> dict[str, float]:
    """Round-trip percentiles; ``cpus=(a, b)`` puts this process on CPU a and the echoing
    one on CPU b, the placement of the thing being compared (e.g. a pinned ping)."""
    ping = os.eventfd(0, os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the echoing process: blocking reads, like a sleeping device
        try:
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            for _ in range(count + 10):
                os.eventfd_read(ping)
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)
    saved = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    samples = []
    now = time.perf_counter_ns
    try:
        for i in range(count + 10):
            t0 = now()
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            if i >= 10:
                samples.append(now() - t0)
    finally:
        os.sched_setaffinity(0, saved)
        os.waitpid(pid, 0)
        os.close(ping)
        os.close(pong)
    return percentiles_us(samples)
