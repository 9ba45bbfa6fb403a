"""virtio-balloon device (vhost-user backend)."""
