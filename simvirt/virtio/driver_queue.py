"""Driver side of a split virtqueue, sans-IO.

What Linux's ``virtio_ring.c`` does for a guest: allocate the three ring
areas in guest RAM, keep a free list of descriptors, expose chains with one
avail-idx store per batch, decide whether a kick is needed (EVENT_IDX or
NO_NOTIFY) and reclaim used entries. Tokens (any Python object) identify
requests; the caller owns the eventfds.
"""
from __future__ import annotations

from typing import Any, Sequence

from simvirt.memory.alloc import PageAllocator
from simvirt.memory.guest import GuestMemory
from simvirt.virtio.queue import memory_fence
from simvirt.virtio.spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

Buffer = tuple[int, int]  # (gpa, length)


class QueueFull(Exception):
    """Not enough free descriptors for the chain."""


class DriverQueue:
    def __init__(
        self,
        mem: GuestMemory,
        alloc: PageAllocator,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_max: int = 0,
    ) -> None:
        if size <= 0 or size > 32768 or size & (size - 1):
            raise ValueError(f"invalid queue size {size}")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect and indirect_max > 1
        self.indirect_max = indirect_max if self.indirect else 0
        self.desc_gpa = alloc.alloc(16 * size)
        self.avail_gpa = alloc.alloc(6 + 2 * size)
        self.used_gpa = alloc.alloc(6 + 8 * size)
        desc = mem.translate(self.desc_gpa, 16 * size)
        avail = mem.translate(self.avail_gpa, 6 + 2 * size)
        used = mem.translate(self.used_gpa, 6 + 8 * size)
        desc[:] = bytes(len(desc))
        avail[:] = bytes(len(avail))
        used[:] = bytes(len(used))
        self._desc = desc.cast("Q")
        self._avail = avail.cast("H")
        self._used_hdr = used[:4].cast("H")
        self._used_ring = used[4:4 + 8 * size].cast("I")
        self._avail_event = used[4 + 8 * size:6 + 8 * size].cast("H")
        # Per-head indirect tables, carved once so add() never allocates.
        self._ind_gpa = alloc.alloc(16 * self.indirect_max * size) if self.indirect else 0
        self._ind = mem.translate(self._ind_gpa, 16 * self.indirect_max * size).cast("Q") if self.indirect else None
        # Free list threaded through the descriptors' next fields, as Linux does.
        for i in range(size):
            self._desc[2 * i + 1] = ((i + 1) % size) << 48
        self._free_head = 0
        self.num_free = size
        self._tokens: list[Any] = [None] * size
        self._chain_len: list[int] = [0] * size
        self._persistent: list[bool] = [False] * size
        self.avail_idx = 0  # shadow of avail->idx
        self._kicked_idx = 0  # avail idx at the last kick decision
        self.last_used = 0
        self.in_flight = 0

    # -- submission -------------------------------------------------------
    def add(self, out_bufs: Sequence[Buffer], in_bufs: Sequence[Buffer], token: Any) -> int:
        """Put a chain (device-readable then device-writable buffers) in the avail ring.

        The avail idx is not published until :meth:`publish`, so a batch costs
        one index store and at most one kick.
        """
        if token is None:
            raise ValueError("token must not be None")
        head = self._build(out_bufs, in_bufs)
        self.post(head, token)
        return head

    def add_persistent(self, out_bufs: Sequence[Buffer], in_bufs: Sequence[Buffer]) -> int:
        """Build a chain that stays allocated across uses; :meth:`post` it each time.

        For fixed-buffer I/O (registered buffers, DPDK-style fixed rings): the
        descriptors are written once and every submission is a single avail
        ring store. The device still walks and validates the chain each time.
        """
        head = self._build(out_bufs, in_bufs)
        self._persistent[head] = True
        return head

    def release_persistent(self, head: int) -> None:
        if not self._persistent[head] or self._tokens[head] is not None:
            raise ValueError(f"descriptor {head} is not an idle persistent chain")
        self._persistent[head] = False
        self._free_chain(head)

    def post(self, head: int, token: Any) -> None:
        """Make the chain at ``head`` available (published by :meth:`publish`)."""
        self._tokens[head] = token
        self._avail[2 + (self.avail_idx & (self.size - 1))] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.in_flight += 1

    def _build(self, out_bufs: Sequence[Buffer], in_bufs: Sequence[Buffer]) -> int:
        total = len(out_bufs) + len(in_bufs)
        if total == 0:
            raise ValueError("empty chain")
        desc = self._desc
        # Short chains go direct while the ring has room (cheaper to walk for
        # both sides); long chains, or a crowded ring, use an indirect table.
        if self.indirect and 1 < total <= self.indirect_max and (total > 4 or total > self.num_free) and self.num_free:
            head = self._free_head
            base = head * self.indirect_max
            ind = self._ind
            assert ind is not None
            j = 0
            for addr, length in out_bufs:
                ind[2 * (base + j)] = addr
                ind[2 * (base + j) + 1] = length | (VIRTQ_DESC_F_NEXT << 32) | ((j + 1) << 48)
                j += 1
            for addr, length in in_bufs:
                ind[2 * (base + j)] = addr
                ind[2 * (base + j) + 1] = length | ((VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) << 32) | ((j + 1) << 48)
                j += 1
            ind[2 * (base + j - 1) + 1] &= ~(VIRTQ_DESC_F_NEXT << 32) & ((1 << 48) - 1)
            self._free_head = desc[2 * head + 1] >> 48
            desc[2 * head] = self._ind_gpa + 16 * base
            desc[2 * head + 1] = (16 * total) | (VIRTQ_DESC_F_INDIRECT << 32)
            self.num_free -= 1
            self._chain_len[head] = 1
            return head
        if total > self.num_free:
            raise QueueFull(f"chain of {total} descriptors, {self.num_free} free")
        head = i = self._free_head
        last = i
        for addr, length in out_bufs:
            nxt = desc[2 * i + 1] >> 48
            desc[2 * i] = addr
            desc[2 * i + 1] = length | (VIRTQ_DESC_F_NEXT << 32) | (nxt << 48)
            last, i = i, nxt
        for addr, length in in_bufs:
            nxt = desc[2 * i + 1] >> 48
            desc[2 * i] = addr
            desc[2 * i + 1] = length | ((VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) << 32) | (nxt << 48)
            last, i = i, nxt
        # Terminate the chain but keep the free-list link in 'next'.
        desc[2 * last + 1] &= ~(VIRTQ_DESC_F_NEXT << 32) & ((1 << 64) - 1)
        self._free_head = i
        self.num_free -= total
        self._chain_len[head] = total
        return head

    def _free_chain(self, head: int) -> None:
        """Splice a chain onto the free list (walking to its tail)."""
        desc = self._desc
        count = self._chain_len[head]
        tail = head
        for _ in range(count - 1):
            tail = desc[2 * tail + 1] >> 48
        w = desc[2 * tail + 1]
        desc[2 * tail + 1] = (w & ((1 << 48) - 1)) | (self._free_head << 48)
        self._free_head = head
        self.num_free += count

    def publish(self) -> bool:
        """Expose added chains (one avail idx store); return True if the device wants a kick."""
        new = self.avail_idx
        self._avail[1] = new
        old = self._kicked_idx
        self._kicked_idx = new
        if new == old:
            return False
        memory_fence()
        if self.event_idx:
            return vring_need_event(self._avail_event[0], new, old)
        return not self._used_hdr[0] & VIRTQ_USED_F_NO_NOTIFY

    # -- completion -------------------------------------------------------
    def device_used_idx(self) -> int:
        """The used index the device last published (where a restarted device resumes)."""
        return self._used_hdr[1]

    def has_used(self) -> bool:
        return self._used_hdr[1] != self.last_used

    def pop_used(self) -> list[tuple[Any, int]]:
        """Reclaim every used chain: ``(token, written_len)`` in used-ring order."""
        used_idx = self._used_hdr[1]
        last = self.last_used
        if used_idx == last:
            return []
        n = (used_idx - last) & 0xFFFF
        if n > self.in_flight:
            raise RuntimeError(f"device reported {n} used entries with {self.in_flight} in flight")
        ring = self._used_ring
        mask = self.size - 1
        tokens = self._tokens
        persistent = self._persistent
        out = []
        for k in range(n):
            slot = ((last + k) & mask) * 2
            head = ring[slot]
            token = tokens[head] if head < self.size else None
            if token is None:
                raise RuntimeError(f"device returned descriptor {head} that is not in flight")
            out.append((token, ring[slot + 1]))
            tokens[head] = None
            if not persistent[head]:
                self._free_chain(head)
        self.last_used = used_idx
        self.in_flight -= n
        return out

    def enable_interrupts(self, delayed: bool = False) -> bool:
        """Ask for an interrupt on the next used entry (or after ~3/4 of those in flight).

        Returns True if used entries are already waiting, in which case the
        caller should poll instead of sleeping.
        """
        if self.event_idx:
            ahead = (self.in_flight * 3 // 4) if delayed else 0
            self._avail[2 + self.size] = (self.last_used + ahead) & 0xFFFF
        else:
            self._avail[0] = 0
        memory_fence()
        return self._used_hdr[1] != self.last_used

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (a hint: it may still, once).

        With EVENT_IDX, used_event goes one behind what we have reclaimed: the
        device's next used entries move away from it and only a wrap of the
        16-bit index (65535 entries on) would cross it again.  Linux writes 0
        for the same effect.
        """
        if self.event_idx:
            self._avail[2 + self.size] = (self.last_used - 1) & 0xFFFF
        else:
            self._avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT
