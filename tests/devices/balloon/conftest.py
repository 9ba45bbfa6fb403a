"""Fixtures for the raw-frontend balloon device tests.

Most tests share one device process (a frontend disconnect resets the
device, and they compare counters as deltas); tests marked
``fresh_device`` get their own, because they assert absolute device state.
"""
from __future__ import annotations

import pytest

from balloon_testlib import BalloonProc, wait_for


def pytest_configure(config):
    config.addinivalue_line("markers", "fresh_device: run against a balloon device process of its own")


@pytest.fixture(scope="module")
def shared_balloon():
    dev = BalloonProc()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def balloon(request, shared_balloon):
    """A ``simvirt device balloon`` process (control socket + metrics port) with no frontend connected."""
    if request.node.get_closest_marker("fresh_device"):
        dev = BalloonProc()
        try:
            yield dev
        finally:
            dev.stop()
        return
    assert shared_balloon.alive, shared_balloon.log()
    wait_for(lambda: shared_balloon.info()["ram_bytes"] == 0, 5, "the previous frontend to be gone")
    yield shared_balloon
