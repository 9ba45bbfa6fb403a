"""Independent reference implementations for the net tests.

Deliberately the slow, obvious algorithms (word loop with end-around
carry), sharing no code with simvirt.net, so a bug in the fast path cannot
hide behind the same bug in the check.
"""
from __future__ import annotations

import struct


def ref_sum(data: bytes) -> int:
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    s = 0
    for (w,) in struct.iter_unpack("!H", data):
        s += w
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def ref_pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def ref_l4_ok(src: bytes, dst: bytes, proto: int, segment: bytes) -> bool:
    """A TCP/UDP segment verifies when header+payload+pseudo header sum to 0xFFFF."""
    return ref_sum(ref_pseudo(src, dst, proto, len(segment)) + bytes(segment)) == 0xFFFF


def ref_ipv4_ok(header: bytes) -> bool:
    return ref_sum(header) == 0xFFFF
