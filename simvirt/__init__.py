"""simvirt: a virtio lab with real guest/host process separation.

The driver side ("guest") owns guest RAM in a named shared-memory segment;
device processes map the same RAM and serve virtqueues over vhost-user.
"""
__version__ = "0.1.0"
