"""Frame boundaries on QEMU's socket netdevs, sans-IO.

``-netdev stream`` (net/stream.c, QEMU 7.2+) and the older
``-netdev socket,listen=/connect=`` (net/socket.c) carry Ethernet frames over
a byte stream (TCP or a unix socket), each preceded by its length as a
4-byte big-endian integer: ``net_stream_data_receive`` / ``net_socket_receive``
send ``iov = { htonl(size), frame }``, and ``net_fill_rstate`` (net/net.c)
reassembles on the other side.  No virtio_net_hdr travels with the frame,
so frames on these links are plain, wire-ready Ethernet -- a device must
complete checksums and segment GSO frames (see :mod:`simvirt.net.offload`)
before writing them here.

``-netdev dgram`` (and ``-netdev socket,udp=/mcast=``) is simpler still:
one frame per UDP or unix datagram, no prefix at all, so it needs no code
here -- send the frame as the datagram, and each ``recv`` is one frame.

Differences from QEMU's reader, on purpose:

* QEMU's limit is its buffer, ``NET_BUFSIZE`` = 4096 + 65536 bytes, and it
  only notices an oversized frame once the payload bytes arrive.  We check
  the announced length as soon as the 4 prefix bytes are in, against
  ``max_frame`` (default 65535: a frame of 65536 bytes or more is an
  error; no frame on a link without GSO comes close).
* A zero length prefix makes QEMU deliver an empty packet; we skip it and
  count it in ``empty_frames``.
* After an error the deframer refuses further input, as QEMU drops the
  connection: once a length is wrong the stream has no trustworthy
  boundaries left.
"""
from __future__ import annotations

import struct
from typing import Union

Buffer = Union[bytes, bytearray, memoryview]

PREFIX = struct.Struct("!I")
PREFIX_LEN = PREFIX.size
DEFAULT_MAX_FRAME = 65535
QEMU_NET_BUFSIZE = 4096 + 65536  # include/net/net.h: the most QEMU itself accepts


class FramingError(ValueError):
    """The stream announced a frame longer than ``max_frame`` (or was already broken)."""


def frame_for_stream(frame: Buffer) -> bytes:
    """``frame`` with its 4-byte big-endian length prefix, ready to write to the socket."""
    return PREFIX.pack(len(frame)) + bytes(frame)


def frames_for_stream(frames: list[Buffer]) -> bytes:
    """Several frames in one buffer, for a single ``send``."""
    parts: list[Buffer] = []
    for f in frames:
        parts.append(PREFIX.pack(len(f)))
        parts.append(f)
    return b"".join(parts)


class StreamDeframer:
    """Feed it whatever ``recv`` returned; get back the complete frames.

    Partial prefixes and partial frames are kept between calls.  The common
    case -- a ``recv`` that ends on a frame boundary -- slices frames
    straight out of the new data without copying it into a buffer first.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self._buf = bytearray()
        self.frames = 0
        self.empty_frames = 0
        self.broken: str | None = None

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[bytes]:
        if self.broken is not None:
            raise FramingError(f"stream already broken: {self.broken}")
        if self._buf:
            self._buf += data
            src: Buffer = self._buf
        else:
            src = data
        mv = memoryview(src)
        n = len(mv)
        pos = 0
        out: list[bytes] = []
        unpack = PREFIX.unpack_from
        while n - pos >= PREFIX_LEN:
            (length,) = unpack(mv, pos)
            if length > self.max_frame:
                self.broken = f"frame length {length} exceeds max_frame {self.max_frame}"
                self._buf = bytearray()
                mv.release()
                raise FramingError(self.broken)
            end = pos + PREFIX_LEN + length
            if end > n:
                break
            if length:
                out.append(bytes(mv[pos + PREFIX_LEN : end]))
            else:
                self.empty_frames += 1
            pos = end
        if src is self._buf:
            mv.release()  # a bytearray with live exports cannot shrink
            del self._buf[:pos]
        else:
            if pos < n:
                self._buf = bytearray(mv[pos:])
            mv.release()
        self.frames += len(out)
        return out
