"""Sans-IO networking building blocks for virtio-net: spec constants, packet
headers, checksums and offload emulation, a slirp-like responder, pcap,
QEMU socket-netdev framing and an L2 learning switch.  Nothing here opens a
socket; device and driver processes move the bytes.
"""
