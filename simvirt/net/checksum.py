"""The Internet checksum (RFC 1071) without a per-byte or per-word Python loop.

The trick: the 16-bit ones'-complement sum of big-endian words is the byte
string read as one big integer, reduced modulo 0xFFFF, because
2**16 == 1 (mod 0xFFFF).  ``int.from_bytes`` and one small-divisor ``%``
run in C, so a 64 KiB buffer costs roughly 100 microseconds instead of the
~4 ms a word loop takes.  Long buffers are cut into 2 KiB (even-sized, hence
word-aligned) chunks whose values are summed first: the running sum stays
small, so the final modulo is cheap, and that beats one huge integer.

The only wrinkle is ones'-complement zero: the modulo yields 0 both for
all-zero data (true sum 0x0000) and for data whose end-around-carry sum is
0xFFFF.  End-around-carry addition never produces 0x0000 from anything but
zeros, so a zero remainder of a non-zero value is reported as 0xFFFF --
bit-for-bit what the classic fold-with-carry loop returns.

Every sum here is "unfolded-compatible": any non-negative integer
congruent to the sum modulo 0xFFFF can be passed as ``initial``, which is
how pseudo-header sums are chained into payload sums.
"""
from __future__ import annotations

from typing import Union

Buffer = Union[bytes, bytearray, memoryview]

_CHUNK = 2048  # even, so every chunk starts on a 16-bit word boundary
_from_bytes = int.from_bytes


def fold(value: int) -> int:
    """Reduce any non-negative integer to its 16-bit ones'-complement sum."""
    r = value % 0xFFFF
    if r == 0 and value:
        return 0xFFFF
    return r


def ones_sum(data: Buffer, initial: int = 0) -> int:
    """16-bit ones'-complement sum of ``data`` as big-endian words (odd tail padded with 0).

    The result is folded (0..0xFFFF) but not inverted.
    """
    n = len(data)
    if n <= _CHUNK:
        value = _from_bytes(data, "big")
        if n & 1:
            value <<= 8
        return fold(value + initial)
    mv = memoryview(data)
    total = initial
    if n & 1:
        total += mv[n - 1] << 8
        mv = mv[: n - 1]
    for i in range(0, n - 1, _CHUNK):
        total += _from_bytes(mv[i : i + _CHUNK], "big")
    return fold(total)


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """The value to store in a checksum field: ``~ones_sum(data, initial)``.

    Verifying a received header or segment: ``ones_sum(...) == 0xFFFF``
    (equivalently ``internet_checksum(...) == 0``).
    """
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Ones'-complement sum of the TCP/UDP pseudo header, IPv4 or IPv6 alike.

    IPv4 (RFC 793/768): src, dst, zero, protocol, 16-bit length.  IPv6
    (RFC 8200 8.1): src, dst, 32-bit upper-layer length, three zero bytes,
    next header.  Both reduce to "the addresses as integers plus protocol
    plus length" modulo 0xFFFF, since the position of a word does not matter
    in a ones'-complement sum.
    """
    return fold(_from_bytes(src, "big") + _from_bytes(dst, "big") + proto + length)


def finish(sum_: int, *, zero_as_ffff: bool = True) -> int:
    """Turn a ones'-complement sum into the stored checksum.

    ``zero_as_ffff`` writes 0xFFFF instead of a computed 0x0000, as Linux's
    ``skb_checksum_help`` (CSUM_MANGLED_0) and QEMU's
    ``net_checksum_finish_nozero`` do: for UDP a zero field means "no
    checksum", and for TCP both encodings verify the same.
    """
    c = ~fold(sum_) & 0xFFFF
    if c == 0 and zero_as_ffff:
        return 0xFFFF
    return c


def update16(checksum: int, old: int, new: int) -> int:
    """RFC 1624 incremental update of a stored checksum when one 16-bit word changes.

    ``HC' = ~(~HC + ~m + m')``, used to patch templates (IP id, ports)
    without re-summing the whole packet.
    """
    return ~fold((~checksum & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF
