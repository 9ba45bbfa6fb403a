"""Shared pytest fixtures.

A missing external tool is a skip on a developer box but a *failure* when
``CI=true``: CI must prove interop, not silently step around it.
"""
from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Return the path of ``name`` or skip (fail under CI=true) if absent."""
    path = shutil.which(name)
    if path is None:
        msg = f"required tool {name!r} not found on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def tool():
    return require_tool
