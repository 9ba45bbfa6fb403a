"""What every simvirt device implements, independent of transport.

A device declares its feature bits, queue count and config space, and
processes chains when the framework tells it a queue was kicked. The
vhost-user session (``simvirt.vhost_user.backend``) owns ring state; the
device sees only ready :class:`~simvirt.virtio.queue.Queue` objects.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from simvirt import metrics
from simvirt.virtio.errors import VirtqueueError
from simvirt.virtio.queue import DescriptorChain, Queue
from simvirt.virtio.spec import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    bit,
)

log = logging.getLogger(__name__)

RING_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)


class VirtioDevice:
    """Base class: override ``process_chain`` or ``process_queue``."""

    device_id = 0
    name = "virtio"
    max_queue_size = 1024

    def __init__(self, num_queues: int, vm: str = "standalone", device_label: Optional[str] = None) -> None:
        self.num_queues = num_queues
        self.vm = vm
        self.label = device_label or self.name
        self.acked_features = 0
        # Set by the session: signal(queue_index) writes the call eventfd; config_changed
        # tells the frontend the config space changed.
        self.signal: Callable[[int], None] = lambda index: None
        self.config_changed: Callable[[], None] = lambda: None

    # -- negotiation ------------------------------------------------------
    def device_features(self) -> int:
        return RING_FEATURES | bit(VHOST_USER_F_PROTOCOL_FEATURES)

    def set_features(self, features: int) -> None:
        self.acked_features = features

    def has_feature(self, n: int) -> bool:
        return bool(self.acked_features & (1 << n))

    # -- config space -----------------------------------------------------
    def config(self) -> bytes:
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """Read config space; bytes past the fields we define read as zero.

        Frontends ask for the size of *their* header's struct, which may be
        newer (longer) than ours; zeros there mean "feature absent".
        """
        cfg = self.config()
        if offset < 0 or size < 0 or offset + size > 256:
            raise ValueError(f"config read [{offset}, +{size}) outside the 256-byte config window")
        return (cfg[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        raise ValueError(f"{self.name} config space is read-only")

    # -- queues -----------------------------------------------------------
    def queue_started(self, index: int, queue: Queue) -> None:
        """A ring became active (started and enabled)."""

    def queue_stopped(self, index: int) -> None:
        """A ring was stopped (GET_VRING_BASE) or the frontend went away."""

    def passive_ring(self, index: int) -> bool:
        """True for rings whose buffers the device consumes on its own schedule (net rx)."""
        return False

    def recover_inflight(self, index: int, queue: Queue, heads: list[int]) -> list[int]:
        """A restarted device found ``heads`` taken by its dead predecessor and not used.

        Returns the heads to serve again (the default: all of them, in order,
        which is right for storage: a write is idempotent and was never
        acknowledged).  Devices whose requests have effects that cannot be
        repeated complete them here instead.
        """
        return heads

    def passive_wants_kick(self, index: int) -> bool:
        """Should the driver kick a passive ring when it adds buffers?

        Only while the device has something waiting for buffers; otherwise a
        refill kick is a wasted eventfd write on the driver's hot path.
        """
        return True

    def reset(self) -> None:
        """The frontend disconnected or reset the device: drop guest state."""
        self.acked_features = 0

    def process_queue(self, index: int, queue: Queue, stats: metrics.QueueStats) -> None:
        """Serve every available chain; the caller handles notifications.

        The default pops chains and calls :meth:`process_chain`, returning a
        chain whose walk fails with length 0 so the driver gets it back.
        """
        chains = queue.pop_chains()
        stats.chains += len(chains)
        for chain in chains:
            try:
                written = self.process_chain(index, chain, stats)
            except VirtqueueError as e:
                self.bad_chain(chain, e)
                written = 0
            if written is not None:
                queue.add_used(chain.head, written)

    def process_chain(self, index: int, chain: DescriptorChain, stats: metrics.QueueStats) -> Optional[int]:
        """Handle one chain; return bytes written to it (None = the device keeps it)."""
        raise NotImplementedError

    def bad_chain(self, chain: DescriptorChain, error: VirtqueueError) -> None:
        log.warning("%s: dropping chain %d: %s", self.label, chain.head, error)
        metrics.count_error(self.vm, self.label, error.reason)
