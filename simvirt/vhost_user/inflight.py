"""Inflight I/O tracking for split rings (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), sans-IO.

Why: a backend that dies takes with it the knowledge of which requests it
had popped from the avail ring but not yet completed.  With this feature
the backend keeps that knowledge in a shared-memory area that the
*frontend* holds on to (GET_INFLIGHT_FD hands it over, SET_INFLIGHT_FD
gives it back to the next backend), so a restarted backend can resubmit
exactly those requests, in the order it first took them, and nothing is
lost or done twice.

Layout (QEMU's libvhost-user ``VuVirtqInflight`` / ``VuDescStateSplit``,
DPDK's ``rte_vhost_inflight_info_split``), little-endian, one region per
queue, each rounded up to 64 bytes::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];

Protocol per request (libvhost-user's order): when a head is popped, its
entry gets ``inflight = 1`` and a fresh ``counter``; before the used ring
is written, ``last_batch_head`` names the last head of the batch; after the
used index is published, the entries are cleared and ``used_idx`` follows.
If a crash falls between publishing the used index and clearing, the
region's ``used_idx`` lags the ring's, and recovery knows the batch ending
at ``last_batch_head`` did complete.
"""
from __future__ import annotations

import struct
from typing import Optional, Sequence

INFLIGHT_VERSION = 1
INFLIGHT_ALIGNMENT = 64
REGION_HDR = struct.Struct("<QHHHH")       # 16 bytes
DESC_STATE = struct.Struct("<B5xHQ")       # 16 bytes
_INFLIGHT_OFF = 0
_COUNTER_OFF = 8
# GET/SET_INFLIGHT_FD payload: u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size, 4 bytes padding
PAYLOAD = struct.Struct("<QQHH4x")  # 24 bytes: the C struct with its tail padding, as QEMU checks


class InflightError(ValueError):
    pass


def queue_region_size(queue_size: int) -> int:
    raw = REGION_HDR.size + DESC_STATE.size * queue_size
    return -(-raw // INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT


def area_size(num_queues: int, queue_size: int) -> int:
    return num_queues * queue_region_size(queue_size)


def encode_payload(mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> bytes:
    return PAYLOAD.pack(mmap_size, mmap_offset, num_queues, queue_size)


def decode_payload(data: bytes) -> tuple[int, int, int, int]:
    if len(data) < PAYLOAD.size:
        raise InflightError(f"inflight payload of {len(data)} bytes, need {PAYLOAD.size}")
    return PAYLOAD.unpack_from(data)


class InflightQueue:
    """One queue's region: mark heads taken, clear them when used, list them after a crash."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        need = queue_region_size(queue_size)
        if len(view) < need:
            raise InflightError(f"inflight region of {len(view)} bytes for a {queue_size}-entry queue (need {need})")
        self.view = view
        self.size = queue_size
        self._desc = view[REGION_HDR.size:REGION_HDR.size + DESC_STATE.size * queue_size]
        # Word views for the hot path: byte 0 of each entry is `inflight`, the u64 at +8 its counter.
        self._counters = self._desc.cast("Q")
        self.counter = max((self._counters[2 * i + 1] for i in range(queue_size)), default=0)

    # -- header -------------------------------------------------------------
    def header(self) -> tuple[int, int, int, int, int]:
        return REGION_HDR.unpack_from(self.view)

    @property
    def used_idx(self) -> int:
        return self.header()[4]

    def reset(self, features: int = 0) -> None:
        """A fresh region (first start of the device): nothing inflight."""
        self.view[:queue_region_size(self.size)] = bytes(queue_region_size(self.size))
        REGION_HDR.pack_into(self.view, 0, features, INFLIGHT_VERSION, self.size, 0, 0)
        self.counter = 0

    def initialised(self) -> bool:
        _, version, desc_num, _, _ = self.header()
        return version == INFLIGHT_VERSION and desc_num == self.size

    # -- the request life cycle ---------------------------------------------
    def get(self, head: int) -> None:
        """``head`` was popped from the avail ring (a bogus head >= size has no entry)."""
        if not 0 <= head < self.size:
            return
        self.counter += 1
        DESC_STATE.pack_into(self._desc, DESC_STATE.size * head, 1, 0, self.counter)

    def get_many(self, heads: list[int]) -> None:
        desc = self._desc
        counters = self._counters
        c = self.counter
        size = self.size
        for h in heads:
            if h >= size:
                continue  # the guest's nonsense: walk() refuses it, nothing to track
            c += 1
            desc[16 * h] = 1
            counters[2 * h + 1] = c
        self.counter = c

    def pre_put(self, last_head: int) -> None:
        """About to publish used entries ending with ``last_head``."""
        struct.pack_into("<H", self.view, 12, last_head & 0xFFFF)

    def post_put(self, heads: "Sequence[int]", used_idx: int) -> None:
        """Used entries for ``heads`` are published; the used index is now ``used_idx``."""
        desc = self._desc
        size = self.size
        for h in heads:
            if h < size:
                desc[16 * h] = 0
        struct.pack_into("<H", self.view, 14, used_idx & 0xFFFF)

    # -- recovery -------------------------------------------------------------
    def recover(self, ring_used_idx: int) -> list[int]:
        """Heads a dead backend took and never completed, oldest first.

        ``ring_used_idx`` is the used index in the ring itself.  If it is
        ahead of the region's, the crash came after the used ring was
        written for the batch ending at ``last_batch_head``: that one is done.
        """
        if not self.initialised():
            return []
        _, _, _, last_batch_head, used_idx = self.header()
        if used_idx != ring_used_idx & 0xFFFF:
            if last_batch_head < self.size:
                self._desc[16 * last_batch_head] = 0
            struct.pack_into("<H", self.view, 14, ring_used_idx & 0xFFFF)
        pending = []
        for h in range(self.size):
            inflight, _next, counter = DESC_STATE.unpack_from(self._desc, 16 * h)
            if inflight == 1:
                pending.append((counter, h))
            elif inflight:
                raise InflightError(f"inflight entry {h} holds {inflight}, not 0 or 1")
        pending.sort()
        return [h for _, h in pending]

    def release(self) -> None:
        self._counters.release()
        self._desc.release()
        self.view.release()


def queue_view(area: memoryview, index: int, queue_size: int) -> Optional[memoryview]:
    """Queue ``index``'s region inside the whole mapped area (None if outside)."""
    size = queue_region_size(queue_size)
    start = index * size
    if start + size > len(area):
        return None
    return area[start:start + size]
