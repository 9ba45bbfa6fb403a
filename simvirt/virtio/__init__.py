"""Sans-IO virtio core: spec constants and split virtqueues over guest memory."""
