"""Helpers shared by the fuzz tests in ``tests/fuzz`` (imported as ``import fuzz_testlib``).

* :func:`fuzz_settings`: the bounded CI budget for every property, overridable
  with ``SIMVIRT_FUZZ_EXAMPLES=N`` (every property then runs N examples).
* :class:`GuardedRam`: guest RAM made of one or two regions cut out of a single
  ``bytearray`` with poisoned guard bytes around and between them, so a
  snapshot of the whole backing store shows any byte the device changed,
  inside or outside guest RAM.
* :func:`ref_walk` / :func:`reachable`: an independent model of split-ring
  chain walking (virtio 1.2, 2.7.5) used as the oracle for ``Queue.walk``
  and for "which bytes may the device write".
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional

from hypothesis import HealthCheck, settings

from simvirt.memory.guest import GuestMemory, MemoryRegion
from simvirt.virtio.queue import MAX_INDIRECT
from simvirt.virtio.spec import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
U64_MAX = (1 << 64) - 1


# ---------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------
def fuzz_examples(default: int) -> int:
    """``default`` examples in CI; ``SIMVIRT_FUZZ_EXAMPLES=N`` makes it N (e.g. 20000 for a long local run)."""
    env = os.environ.get("SIMVIRT_FUZZ_EXAMPLES", "").strip()
    if env:
        return max(1, int(env))
    return default


def fuzz_settings(default: int, **kw) -> settings:
    """Bounded, stateless (no example database), randomised, quiet on success."""
    return settings(
        max_examples=fuzz_examples(default),
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example, HealthCheck.filter_too_much],
        **kw,
    )


# ---------------------------------------------------------------------------
# guest RAM with guards
# ---------------------------------------------------------------------------
GUARD = 4096
POISON = 0xA5


@dataclass(frozen=True)
class RegionSpec:
    gpa: int
    size: int
    offset: int  # in the backing bytearray


class GuardedRam:
    """Guest RAM regions carved out of one bytearray, with poisoned guards in between.

    ``layout`` is a list of ``(gpa, size)``; region k lives at backing offset
    ``GUARD + sum(previous sizes + GUARD)``.
    """

    def __init__(self, layout: list[tuple[int, int]], fill: Optional[bytes] = None) -> None:
        specs = []
        off = GUARD
        for gpa, size in layout:
            specs.append(RegionSpec(gpa, size, off))
            off += size + GUARD
        self.specs = specs
        self.backing = bytearray([POISON]) * off
        if fill is not None:
            for s in specs:
                self.backing[s.offset:s.offset + s.size] = fill[:s.size].ljust(s.size, b"\0")
        whole = memoryview(self.backing)
        self.mem = GuestMemory([MemoryRegion(gpa=s.gpa, size=s.size, view=whole[s.offset:s.offset + s.size],
                                             user_addr=0x7F0000000000 + s.gpa) for s in specs])

    # Independent of GuestMemory.translate: the oracle must not share the code under test.
    def locate(self, gpa: int, length: int) -> Optional[int]:
        """Backing offset of guest range ``[gpa, gpa+length)`` if it lies inside one region."""
        if length < 0:
            return None
        for s in self.specs:
            if s.gpa <= gpa and gpa + length <= s.gpa + s.size:
                return s.offset + (gpa - s.gpa)
        return None

    def gpa_of(self, off: int) -> Optional[int]:
        for s in self.specs:
            if s.offset <= off < s.offset + s.size:
                return s.gpa + (off - s.offset)
        return None

    def write(self, gpa: int, data: bytes) -> None:
        off = self.locate(gpa, len(data))
        assert off is not None, f"test bug: {gpa:#x}+{len(data)} outside RAM"
        self.backing[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = self.locate(gpa, length)
        assert off is not None
        return bytes(self.backing[off:off + length])

    def snapshot(self) -> bytes:
        return bytes(self.backing)

    def changed(self, before: bytes, chunk: int = 1024) -> list[int]:
        """Backing offsets whose byte differs from ``before``."""
        after = self.backing
        out = []
        for start in range(0, len(after), chunk):
            if after[start:start + chunk] != before[start:start + chunk]:
                out.extend(i for i in range(start, min(start + chunk, len(after))) if after[i] != before[i])
        return out


class Intervals:
    """A small set of half-open guest-physical ranges."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def add(self, start: int, length: int) -> None:
        if length > 0:
            self.ranges.append((start, start + length))

    def __contains__(self, gpa: int) -> bool:
        return any(a <= gpa < b for a, b in self.ranges)


def assert_writes_confined(ram: GuardedRam, before: bytes, allowed: Intervals, what: str) -> None:
    """Every byte that changed is inside guest RAM and inside an allowed range."""
    for off in ram.changed(before):
        gpa = ram.gpa_of(off)
        assert gpa is not None, f"{what}: byte at backing offset {off:#x} OUTSIDE guest RAM was written"
        assert gpa in allowed, (f"{what}: guest byte {gpa:#x} changed ({before[off]:#04x} -> {ram.backing[off]:#04x}) "
                                f"outside every device-writable descriptor and the used ring")


# ---------------------------------------------------------------------------
# reference model of chain walking
# ---------------------------------------------------------------------------
class RefChainError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_table(ram: GuardedRam, gpa: int, count: int) -> Optional[list[tuple[int, int, int, int]]]:
    off = ram.locate(gpa, 16 * count)
    if off is None:
        return None
    return [DESC.unpack_from(ram.backing, off + 16 * k) for k in range(count)]


def ref_walk(ram: GuardedRam, desc_gpa: int, size: int, head: int, indirect_ok: bool) -> list[tuple[int, int, int]]:
    """The chain at ``head`` per virtio 1.2 2.7.5 plus simvirt's documented guards.

    Guards (docs/architecture.md): loops and runaway chains (at most queue-size
    descriptors), next out of range, INDIRECT without the feature, INDIRECT
    with NEXT, nested indirect, indirect tables of bad length or outside RAM.
    Raises :class:`RefChainError` with the metric reason simvirt documents.
    """
    table = read_table(ram, desc_gpa, size)
    assert table is not None
    out: list[tuple[int, int, int]] = []
    i = head
    direct = 0
    while True:
        if i >= size:
            raise RefChainError("bad_desc_index")
        addr, length, flags, nxt = table[i]
        if flags & INDIRECT:
            if not indirect_ok or flags & NEXT or length == 0 or length % 16:
                raise RefChainError("bad_indirect")
            count = length // 16
            if count > max(size - direct, MAX_INDIRECT):
                raise RefChainError("chain_too_long")
            entries = read_table(ram, addr, count)
            if entries is None:
                raise RefChainError("bad_address")
            j = 0
            for _ in range(count):
                a, n, f, nx = entries[j]
                if f & INDIRECT:
                    raise RefChainError("nested_indirect")
                out.append((a, n, f))
                if not f & NEXT:
                    return out
                j = nx
                if j >= count:
                    raise RefChainError("bad_desc_index")
            raise RefChainError("chain_too_long")
        out.append((addr, length, flags))
        direct += 1
        if not flags & NEXT:
            return out
        if direct == size:
            raise RefChainError("chain_too_long")
        i = nxt


def reachable(ram: GuardedRam, desc_gpa: int, size: int, head: int) -> list[tuple[int, int, int]]:
    """Every buffer descriptor a device could meet following ``head`` (generous for broken chains).

    Follows NEXT for at most ``size`` steps; an INDIRECT descriptor is entered
    (its table's chain followed for at most its entry count) and ends the
    direct walk. Descriptors that refer to tables (INDIRECT) are not buffers
    and are not returned.
    """
    table = read_table(ram, desc_gpa, size)
    assert table is not None
    out = []
    i = head
    for _ in range(size):
        if i >= size:
            break
        addr, length, flags, nxt = table[i]
        if flags & INDIRECT:
            count = length // 16
            if 0 < count <= max(size, MAX_INDIRECT):
                entries = read_table(ram, addr, count)
                if entries is not None:
                    j = 0
                    for _ in range(count):
                        a, n, f, nx = entries[j]
                        if f & INDIRECT:
                            break
                        out.append((a, n, f))
                        if not f & NEXT or nx >= count:
                            break
                        j = nx
            break
        out.append((addr, length, flags))
        if not flags & NEXT:
            break
        i = nxt
    return out


def writable_ranges(descs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(a, n) for a, n, f in descs if f & WRITE and n > 0]
