"""virtio-blk device (vhost-user-blk backend)."""
