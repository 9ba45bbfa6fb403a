"""Device side of a split virtqueue, sans-IO.

Modelled on rust-vmm's virtio-queue: a :class:`Queue` holds the ring state,
:meth:`Queue.pop_chains` hands out :class:`DescriptorChain` objects whose
walk is guarded against loops, runaway lengths, nested or malformed indirect
tables and addresses outside guest RAM, :meth:`Queue.add_used` returns
buffers and :meth:`Queue.needs_notification` applies EVENT_IDX / NO_INTERRUPT
suppression. No file descriptors or sockets here: the caller owns the kick
and call eventfds.

Ring areas are memoryviews cast to native integers (``Q``/``H``/``I``). That
is only correct on a little-endian host, which virtio 1.x rings assume of
every x86/arm64 machine we target; the module refuses to import elsewhere.
"""
from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional

from simvirt.memory.guest import GuestAddressError, GuestMemory
from simvirt.virtio.errors import (
    AvailIndexError,
    ChainAddressError,
    DescriptorChainTooLong,
    InvalidDescriptorIndex,
    InvalidIndirectTable,
    NestedIndirect,
    VirtqueueError,
)
from simvirt.virtio.spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

if TYPE_CHECKING:
    from simvirt.vhost_user.inflight import InflightQueue

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("simvirt's ring code assumes a little-endian host")

_fence_lock = threading.Lock()

# Indirect tables may be longer than the ring: Linux's virtio-blk sends up to
# seg_max + 2 entries through a 128-entry queue. QEMU and libvhost-user cap
# them at VIRTQUEUE_MAX_SIZE (1024); so do we.
MAX_INDIRECT = 1024


def memory_fence() -> None:
    """A full barrier (locked instruction) between a ring store and a ring load.

    Needed where a store must be visible before a load of the other side's
    index (EVENT_IDX re-checks); acquiring a lock is the cheapest way to make
    CPython execute one.
    """
    _fence_lock.acquire()
    _fence_lock.release()


class Descriptor(NamedTuple):
    addr: int
    len: int
    write: bool


class DescriptorChain:
    """A chain starting at ``head``; walking it is guarded, and lazy."""

    __slots__ = ("queue", "head")

    def __init__(self, queue: "Queue", head: int) -> None:
        self.queue = queue
        self.head = head

    def descriptors(self) -> list[Descriptor]:
        """All descriptors in order, following NEXT and one level of INDIRECT.

        Raises a :class:`VirtqueueError` subclass on any malformed chain.
        """
        return [Descriptor(a, n, bool(f & VIRTQ_DESC_F_WRITE)) for a, n, f in self.queue.walk(self.head)]

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors())

    def memory(self, desc: Descriptor) -> memoryview:
        """Translate one descriptor's buffer; an out-of-RAM address is a ChainAddressError."""
        try:
            return self.queue.mem.translate(desc.addr, desc.len)
        except GuestAddressError as e:
            raise ChainAddressError(str(e)) from None


class Queue:
    """Device-side split virtqueue state and operations."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        next_used: int = 0,
    ) -> None:
        if size <= 0 or size > 32768 or size & (size - 1):
            raise ValueError(f"invalid queue size {size}")
        if len(desc) < 16 * size or len(avail) < 6 + 2 * size or len(used) < 6 + 8 * size:
            raise ValueError("ring area too small for queue size")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc = desc[:16 * size].cast("Q")
        self._avail = avail[:6 + 2 * size].cast("H")  # flags, idx, ring[size], used_event
        self._used_hdr = used[:4].cast("H")  # flags, idx
        self._used_ring = used[4:4 + 8 * size].cast("I")  # (id, len) pairs
        self._avail_event = used[4 + 8 * size:6 + 8 * size].cast("H")
        self.next_avail = next_avail & 0xFFFF
        self.next_used = next_used & 0xFFFF
        self._signalled_used = self.next_used
        self._signalled_valid = False
        # Inflight I/O tracking (vhost-user INFLIGHT_SHMFD), when the transport set it up:
        # heads taken are recorded until used, so a restarted backend can resubmit them.
        self.inflight: Optional[InflightQueue] = None
        self.resubmit: list[int] = []  # heads a dead backend left inflight, served first

    # -- avail side -------------------------------------------------------
    def avail_idx(self) -> int:
        return self._avail[1]

    def pending(self) -> int:
        """Chains the driver made available that we have not popped yet."""
        n = (self._avail[1] - self.next_avail) & 0xFFFF
        if n > self.size:
            raise AvailIndexError(f"avail idx {self._avail[1]} is {n} ahead of {self.next_avail} (queue size {self.size})")
        return n

    def pop_chains(self, limit: int | None = None) -> list[DescriptorChain]:
        """Take every available chain (up to ``limit``) in one go: one kick, one batch."""
        if self.resubmit or self.inflight is not None:
            return [DescriptorChain(self, h) for h in self.pop_heads(limit or 0)]
        n = self.pending()
        if limit is not None and n > limit:
            n = limit
        ring = self._avail
        size = self.size
        start = self.next_avail
        chains = [DescriptorChain(self, ring[2 + ((start + k) & (size - 1))]) for k in range(n)]
        self.next_avail = (start + n) & 0xFFFF
        return chains

    def pop_heads(self, limit: int = 0) -> list[int]:
        """Like :meth:`pop_chains` but returns bare head indices (the hot path)."""
        if self.resubmit:
            return self._take_resubmit(limit)
        if self.inflight is not None:
            heads = self._pop_heads(limit)
            self.inflight.get_many(heads)
            return heads
        return self._pop_heads(limit)

    def _take_resubmit(self, limit: int) -> list[int]:
        n = len(self.resubmit) if not limit else min(limit, len(self.resubmit))
        heads, self.resubmit = self.resubmit[:n], self.resubmit[n:]
        return heads

    def _pop_heads(self, limit: int) -> list[int]:
        n = self.pending()
        if limit and n > limit:
            n = limit
        ring = self._avail
        mask = self.size - 1
        start = self.next_avail
        self.next_avail = (start + n) & 0xFFFF
        return [ring[2 + ((start + k) & mask)] for k in range(n)]

    def walk(self, head: int) -> list[tuple[int, int, int]]:
        """The chain at ``head`` as raw ``(addr, len, flags)`` tuples, fully guarded.

        Follows NEXT and one level of INDIRECT; a chain may hold at most
        ``size`` descriptors in all, which is what catches loops.
        """
        table = self._desc
        size = self.size
        out: list[tuple[int, int, int]] = []
        i = head
        budget = size
        while True:
            if i >= size:
                raise InvalidDescriptorIndex(f"descriptor index {i} >= queue size {size}")
            w = table[2 * i + 1]
            flags = (w >> 32) & 0xFFFF
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise InvalidIndirectTable("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise InvalidIndirectTable("descriptor has both INDIRECT and NEXT")
                self._walk_indirect(table[2 * i], w & 0xFFFFFFFF, out, budget)
                return out
            out.append((table[2 * i], w & 0xFFFFFFFF, flags))
            if not flags & VIRTQ_DESC_F_NEXT:
                return out
            budget -= 1
            if budget == 0:
                raise DescriptorChainTooLong(f"chain from head {head} exceeds queue size {size} (loop?)")
            i = w >> 48

    def _walk_indirect(self, addr: int, length: int, out: list[tuple[int, int, int]], budget: int) -> None:
        if length == 0 or length % 16:
            raise InvalidIndirectTable(f"indirect table length {length} is not a positive multiple of 16")
        count = length // 16
        if count > max(budget, MAX_INDIRECT):
            raise DescriptorChainTooLong(f"indirect table of {count} descriptors exceeds {max(budget, MAX_INDIRECT)}")
        try:
            table = self.mem.translate(addr, length).cast("Q")
        except GuestAddressError as e:
            raise ChainAddressError(f"indirect table: {e}") from None
        i = 0
        for _ in range(count):
            a = table[2 * i]
            w = table[2 * i + 1]
            flags = (w >> 32) & 0xFFFF
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise NestedIndirect("INDIRECT descriptor inside an indirect table")
            out.append((a, w & 0xFFFFFFFF, flags))
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            i = w >> 48
            if i >= count:
                raise InvalidDescriptorIndex(f"indirect next {i} >= table size {count}")
        raise DescriptorChainTooLong(f"indirect chain longer than its table ({count}): loop")

    def last_descriptor(self, head: int) -> tuple[int, int, int] | None:
        """Best-effort: the final descriptor of a chain that failed :meth:`walk`.

        Used only to put an error status where the driver will look for it;
        bounded like :meth:`walk`, and it never raises.
        """
        try:
            table = self._desc
            i = head
            last = None
            for _ in range(self.size):
                if i >= self.size:
                    return last
                w = table[2 * i + 1]
                flags = (w >> 32) & 0xFFFF
                last = (table[2 * i], w & 0xFFFFFFFF, flags)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    n = (w & 0xFFFFFFFF) // 16
                    if not 0 < n <= MAX_INDIRECT:
                        return None
                    ind = self.mem.translate(table[2 * i], 16 * n).cast("Q")
                    j = 0
                    for _ in range(n):
                        wj = ind[2 * j + 1]
                        fj = (wj >> 32) & 0xFFFF
                        if fj & VIRTQ_DESC_F_INDIRECT:
                            # A nested table (illegal): it describes no buffer, and WRITE on it
                            # means nothing (virtio 1.2 2.7.5.3.2), so there is no status byte to find.
                            return None
                        last = (ind[2 * j], wj & 0xFFFFFFFF, fj)
                        if not fj & VIRTQ_DESC_F_NEXT:
                            return last
                        j = wj >> 48
                        if j >= n:
                            return last
                    return last
                if not flags & VIRTQ_DESC_F_NEXT:
                    return last
                i = w >> 48
            return last
        except (GuestAddressError, ValueError, TypeError):
            return None

    # -- used side --------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Return a chain to the driver; the used idx store publishes it."""
        inflight = self.inflight
        if inflight is not None:
            inflight.pre_put(head)
        slot = (self.next_used & (self.size - 1)) * 2
        self._used_ring[slot] = head
        self._used_ring[slot + 1] = length
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._used_hdr[1] = self.next_used
        if inflight is not None:
            inflight.post_put((head,), self.next_used)

    def add_used_many(self, entries: list[tuple[int, int]]) -> None:
        """Return several chains with a single used idx store.

        With inflight tracking each entry is published on its own (libvhost-user's
        order: name it, write it, publish, clear), so a crash anywhere leaves a
        state recovery can read without doubt.
        """
        if self.inflight is not None:
            for head, length in entries:
                self.add_used(head, length)
            return
        ring = self._used_ring
        mask = self.size - 1
        idx = self.next_used
        for head, length in entries:
            slot = (idx & mask) * 2
            ring[slot] = head
            ring[slot + 1] = length
            idx += 1
        self.next_used = idx & 0xFFFF
        self._used_hdr[1] = self.next_used

    def needs_notification(self) -> bool:
        """Should the device interrupt the driver for the used entries added since the last one?"""
        new = self.next_used
        if self.event_idx:
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            if not valid:
                return True
            memory_fence()
            return vring_need_event(self._avail[2 + self.size], new, old)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def used_event(self) -> int:
        return self._avail[2 + self.size]

    def enable_notification(self) -> bool:
        """Ask for kicks again; returns True if chains arrived meanwhile (process them)."""
        if self.event_idx:
            self._avail_event[0] = self.next_avail
        else:
            self._used_hdr[0] = 0
        memory_fence()
        return self._avail[1] != self.next_avail

    def disable_notification(self) -> None:
        """Tell the driver not to kick while we are busy draining (no-op with EVENT_IDX)."""
        if not self.event_idx:
            self._used_hdr[0] = VIRTQ_USED_F_NO_NOTIFY

    def release(self) -> None:
        for v in (self._desc, self._avail, self._used_hdr, self._used_ring, self._avail_event):
            v.release()


__all__ = ["Descriptor", "DescriptorChain", "Queue", "VirtqueueError", "memory_fence"]
