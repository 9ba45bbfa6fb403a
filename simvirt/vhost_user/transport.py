"""Socket edge of vhost-user: read/write whole messages with their fds.

A message is read as libvhost-user reads it: the 12-byte header with one
``recvmsg`` (which also collects SCM_RIGHTS fds), then exactly ``size``
payload bytes. Reading header-first keeps fds paired with the message
they came with.
"""
from __future__ import annotations

import array
import os
import socket

from simvirt.vhost_user.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    Message,
    ProtocolError,
)

_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class Disconnected(Exception):
    """The peer closed the socket."""


def _fds_from(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, typ, data in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
            fds.extend(a)
    return fds


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Disconnected("peer closed mid-message")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """Blocking read of one message. Raises Disconnected or ProtocolError."""
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(HEADER_SIZE, _ANC_SIZE)
    except ConnectionResetError:
        raise Disconnected("connection reset") from None
    fds = _fds_from(ancdata)
    try:
        if not data:
            raise Disconnected("peer closed")
        if len(data) < HEADER_SIZE:
            data += _recv_exact(sock, HEADER_SIZE - len(data))
        request, flags, size = HEADER.unpack(data)
        if (flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION:
            raise ProtocolError(f"bad version in flags {flags:#x} (request {request})")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"payload size {size} exceeds {MAX_PAYLOAD} (request {request})")
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)


def send_message(sock: socket.socket, msg: Message, fds: list[int] | None = None) -> None:
    data = msg.encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)
