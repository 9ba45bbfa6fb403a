"""Human sizes: ``512``, ``4K``, ``1M``, ``2G`` (binary units, as QEMU reads them)."""
from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r} (a boolean is not a size)")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"negative size {text}")
        return text
    m = _RE.match(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 4096, 4K, 1M, 2G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        v = _UNITS[unit]
        if n >= v and n % v == 0:
            return f"{n // v}{unit}"
    return str(n)
