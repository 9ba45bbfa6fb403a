"""Human sizes: parse_size / format_size."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from simvirt.sizes import format_size, parse_size


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("4K", 4096), ("4k", 4096), ("1M", 1 << 20), ("2G", 2 << 30), ("1T", 1 << 40),
    ("4KiB", 4096), ("4KB", 4096), ("16MiB", 16 << 20), (" 8M ", 8 << 20), ("8 M", 8 << 20), ("100B", 100),
    (4096, 4096), (0, 0),
])
def test_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "-1", "1.5M", "4X", "4KK", "0x10", "M4", "4 K B B", "1e3", "4Kib bytes"])
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_rejects_negative_int():
    with pytest.raises(ValueError):
        parse_size(-1)


@pytest.mark.parametrize("n,text", [(0, "0"), (512, "512"), (1536, "1536"), (4096, "4K"), (1 << 20, "1M"),
                                    (3 << 30, "3G"), (5 << 40, "5T"), ((1 << 20) + 1024, "1025K")])
def test_format(n, text):
    assert format_size(n) == text


@given(st.integers(0, 1 << 50))
def test_round_trip(n):
    assert parse_size(format_size(n)) == n
