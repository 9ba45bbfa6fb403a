"""virtio-balloon constants and layouts (virtio 1.2, section 5.5)."""
from __future__ import annotations

import struct

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

# Page frame numbers are always in 4 KiB units, whatever the guest page size.
VIRTIO_BALLOON_PFN_SHIFT = 12
PAGE = 1 << VIRTIO_BALLOON_PFN_SHIFT
# Linux sends at most this many PFNs per inflate/deflate buffer.
VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256

VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9

STAT_NAMES = {
    VIRTIO_BALLOON_S_SWAP_IN: "swap_in",
    VIRTIO_BALLOON_S_SWAP_OUT: "swap_out",
    VIRTIO_BALLOON_S_MAJFLT: "major_faults",
    VIRTIO_BALLOON_S_MINFLT: "minor_faults",
    VIRTIO_BALLOON_S_MEMFREE: "free_memory",
    VIRTIO_BALLOON_S_MEMTOT: "total_memory",
    VIRTIO_BALLOON_S_AVAIL: "available_memory",
    VIRTIO_BALLOON_S_CACHES: "disk_caches",
    VIRTIO_BALLOON_S_HTLB_PGALLOC: "hugetlb_allocations",
    VIRTIO_BALLOON_S_HTLB_PGFAIL: "hugetlb_failures",
}

STAT = struct.Struct("<HQ")  # packed: 10 bytes (the spec's "multiple of 6" text predates the 64-bit value)
CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
CONFIG_ACTUAL_OFFSET = 4

# Reporting needs room for this many blocks per request (Linux refuses smaller queues).
PAGE_REPORTING_CAPACITY = 32

QUEUE_NAMES = ("inflateq", "deflateq", "statsq", "free_page_vq", "reporting_vq")


def queue_roles(features: int) -> list[str]:
    """Ring index -> role, numbered the way Linux numbers them: absent optional queues are skipped."""
    roles = ["inflateq", "deflateq"]
    if features & (1 << VIRTIO_BALLOON_F_STATS_VQ):
        roles.append("statsq")
    if features & (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT):
        roles.append("free_page_vq")
    if features & (1 << VIRTIO_BALLOON_F_PAGE_REPORTING):
        roles.append("reporting_vq")
    return roles
