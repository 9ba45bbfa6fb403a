"""Sans-IO networking building blocks for virtio-net.

Nothing here opens a socket; device and driver processes move the bytes.

* ``spec``      virtio-net constants and wire structs (virtio 1.2, spec names)
* ``checksum``  RFC 1071 Internet checksum via ``int.from_bytes``, pseudo headers
* ``packets``   Ethernet/802.1Q, ARP, IPv4, IPv6, ICMP echo, UDP, TCP parse/build
* ``offload``   device-side checksum completion and software GSO (TSO/USO/UFO)
* ``responder`` slirp-like gateway peer (ARP, ping, UDP echo/discard) + UdpStream
* ``pcap``      classic libpcap writer (batched) and reader
* ``framing``   QEMU ``-netdev stream``/``socket`` 4-byte length framing
* ``switch``    L2 learning-switch decision core
"""
