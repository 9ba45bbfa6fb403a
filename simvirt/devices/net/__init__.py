"""virtio-net device (vhost-user-net backend) and its peers."""
