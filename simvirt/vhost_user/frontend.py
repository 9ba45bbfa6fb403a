"""vhost-user frontend client: what QEMU is to a backend, for our guest driver.

Blocking request/response over a unix socket; used for the control plane
only (set-up and tear-down), so simplicity beats asynchrony here. With
REPLY_ACK negotiated every request without a natural reply asks for an ack,
so a backend's refusal surfaces as :class:`BackendError` at the call that
caused it instead of as a hang later.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

from simvirt.memory.guest import GuestMemory
from simvirt.vhost_user import inflight
from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.protocol import Message, ProtocolFeature, Request
from simvirt.vhost_user.transport import recv_message, send_message


class BackendError(Exception):
    """The backend refused a request or answered nonsense."""


class VhostUserFrontend:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self.protocol_features = 0
        self.last_reply_fds: list[int] = []

    def connect(self, retry_for: float = 0.0) -> None:
        deadline = time.monotonic() + retry_for
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        s.settimeout(self.timeout)
        self.sock = s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- plumbing ---------------------------------------------------------
    def _ack(self) -> bool:
        return bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    def request(self, req: Request, payload: bytes = b"", fds: Optional[list[int]] = None,
                want_reply: bool = False, keep_fds: bool = False) -> Optional[bytes]:
        if self.sock is None:
            raise BackendError("not connected")
        flags = p.VHOST_USER_VERSION
        ack = not want_reply and self._ack()
        if ack:
            flags |= p.VHOST_USER_NEED_REPLY_MASK
        send_message(self.sock, Message(req, flags, payload), fds)
        if not (want_reply or ack):
            return None
        reply = recv_message(self.sock)
        self.last_reply_fds = reply.fds
        if not keep_fds:
            for fd in reply.fds:
                os.close(fd)
            self.last_reply_fds = []
        if reply.request != req or not reply.is_reply:
            raise BackendError(f"expected reply to {req.name}, got {reply.name} flags={reply.flags:#x}")
        if ack:
            status = p.decode_u64(reply.payload, "ack")
            if status != 0:
                raise BackendError(f"backend refused {req.name} (ack {status})")
            return None
        return reply.payload

    def _get_u64(self, req: Request) -> int:
        payload = self.request(req, want_reply=True)
        assert payload is not None
        return p.decode_u64(payload, req.name)

    # -- requests ---------------------------------------------------------
    def get_features(self) -> int:
        return self._get_u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(Request.SET_FEATURES, p.encode_u64(features))

    def get_protocol_features(self) -> int:
        return self._get_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(Request.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._get_u64(Request.GET_QUEUE_NUM)

    def set_mem_table(self, mem: GuestMemory) -> None:
        regions = [p.MemRegion(r.gpa, r.size, r.user_addr, r.mmap_offset) for r in mem.regions]
        self.request(Request.SET_MEM_TABLE, p.encode_mem_table(regions), [r.fd for r in mem.regions])

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(Request.SET_VRING_NUM, p.encode_vring_state(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(Request.SET_VRING_BASE, p.encode_vring_state(index, base))

    def get_vring_base(self, index: int) -> int:
        payload = self.request(Request.GET_VRING_BASE, p.encode_vring_state(index, 0), want_reply=True)
        assert payload is not None
        return p.decode_vring_state(payload).num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0) -> None:
        self.request(Request.SET_VRING_ADDR, p.encode_vring_addr(p.VringAddr(index, flags, desc, used, avail, 0)))

    def _vring_fd(self, req: Request, index: int, fd: Optional[int]) -> None:
        if fd is None:
            self.request(req, p.encode_u64(index | p.VHOST_USER_VRING_NOFD_MASK))
        else:
            self.request(req, p.encode_u64(index), [fd])

    def set_vring_kick(self, index: int, fd: Optional[int]) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: Optional[int]) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: Optional[int]) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, p.encode_vring_state(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        payload = self.request(Request.GET_CONFIG, p.encode_config(offset, bytes(size)), want_reply=True)
        assert payload is not None
        if len(payload) < p.CONFIG_HDR.size:
            raise BackendError(f"backend refused GET_CONFIG of {size} bytes at offset {offset}")
        off, sz, _flags, data = p.decode_config(payload)
        if sz != size:
            raise BackendError(f"GET_CONFIG returned {sz} bytes, asked {size}")
        return data

    def set_config(self, offset: int, data: bytes) -> None:
        self.request(Request.SET_CONFIG, p.encode_config(offset, data))

    def set_backend_req_fd(self, fd: int) -> None:
        self.request(Request.SET_BACKEND_REQ_FD, b"", [fd])

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int, int]:
        """Ask the backend for its inflight area: (fd, mmap_size, mmap_offset); the fd is ours."""
        payload = self.request(Request.GET_INFLIGHT_FD, inflight.encode_payload(0, 0, num_queues, queue_size),
                               want_reply=True, keep_fds=True)
        fds, self.last_reply_fds = self.last_reply_fds, []
        assert payload is not None
        size, offset, _, _ = inflight.decode_payload(payload)
        if len(fds) != 1 or size == 0:
            for fd in fds:
                os.close(fd)
            raise BackendError(f"GET_INFLIGHT_FD answered {len(fds)} fd(s) for an area of {size} bytes")
        return fds[0], size, offset

    def set_inflight_fd(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> None:
        self.request(Request.SET_INFLIGHT_FD, inflight.encode_payload(mmap_size, mmap_offset, num_queues, queue_size),
                     [fd])

    def reset_device(self) -> None:
        self.request(Request.RESET_DEVICE)
