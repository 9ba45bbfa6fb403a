"""Constants from the virtio 1.x specification, named as the spec names them."""
from __future__ import annotations

import enum


class DeviceStatus(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


# Reserved (transport-independent) feature bits.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29  # VIRTIO_RING_F_EVENT_IDX
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_NOTIFICATION_DATA = 38

# vhost-user borrows bit 30 for its own protocol-feature negotiation.
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Split virtqueue descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768

# Device ids.
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_BALLOON = 5


def bit(n: int) -> int:
    return 1 << n


def feature_names(features: int, table: dict[int, str]) -> list[str]:
    """Render a feature mask with spec names (unknown bits as ``bit<N>``)."""
    names = []
    for n in range(64):
        if features & (1 << n):
            names.append(table.get(n, COMMON_FEATURE_NAMES.get(n, f"bit{n}")))
    return names


COMMON_FEATURE_NAMES = {
    VIRTIO_F_INDIRECT_DESC: "VIRTIO_F_INDIRECT_DESC",
    VIRTIO_F_EVENT_IDX: "VIRTIO_F_EVENT_IDX",
    VHOST_USER_F_PROTOCOL_FEATURES: "VHOST_USER_F_PROTOCOL_FEATURES",
    VIRTIO_F_VERSION_1: "VIRTIO_F_VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "VIRTIO_F_ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "VIRTIO_F_RING_PACKED",
    VIRTIO_F_IN_ORDER: "VIRTIO_F_IN_ORDER",
    VIRTIO_F_NOTIFICATION_DATA: "VIRTIO_F_NOTIFICATION_DATA",
}


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's vring_need_event(): did ``[old_idx, new_idx)`` cross ``event_idx``?

    All arithmetic is modulo 2**16, exactly as the 16-bit ring indices wrap.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def split_ring_sizes(num: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, avail ring, used ring) for queue size ``num``.

    Sizes include the event-idx trailer words, which are always laid out.
    """
    return 16 * num, 6 + 2 * num, 6 + 8 * num
