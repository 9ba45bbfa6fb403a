"""Typed errors for everything a misbehaving driver can put in a virtqueue.

Each carries a short ``reason`` used as a metric label, so bad input is
counted by kind rather than lumped together.
"""
from __future__ import annotations


class VirtqueueError(Exception):
    reason = "virtqueue_error"


class InvalidDescriptorIndex(VirtqueueError):
    reason = "bad_desc_index"


class DescriptorChainTooLong(VirtqueueError):
    """More descriptors than the queue (or indirect table) holds: a loop or a runaway chain."""

    reason = "chain_too_long"


class InvalidIndirectTable(VirtqueueError):
    reason = "bad_indirect"


class NestedIndirect(VirtqueueError):
    reason = "nested_indirect"


class AvailIndexError(VirtqueueError):
    """The driver moved avail->idx more than a queue's worth past what we consumed."""

    reason = "bad_avail_idx"


class ChainAddressError(VirtqueueError):
    """A descriptor points outside guest RAM."""

    reason = "bad_address"


class ChainLayoutError(VirtqueueError):
    """A chain whose shape does not fit the request (device-type specific)."""

    reason = "bad_layout"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
