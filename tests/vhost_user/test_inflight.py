"""Inflight I/O tracking (INFLIGHT_SHMFD): a backend that dies mid-batch is replaced
by one that resubmits exactly what was taken and not completed, oldest first."""
from __future__ import annotations

import mmap
import os

import pytest

from simvirt.devices.blk import spec as blk
from simvirt.vhost_user import inflight as inf
from simvirt.vhost_user import protocol as p
from simvirt.vhost_user.protocol import Request
from simvirt.virtio.spec import VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, bit

from test_backend import Env, FEATURES  # noqa: F401 - shared session rig


def _get_inflight(env: Env, nq: int, qs: int) -> tuple[int, int]:
    (r,) = env.handle(Request.GET_INFLIGHT_FD, inf.encode_payload(0, 0, nq, qs))
    size, offset, rnq, rqs = inf.decode_payload(r.payload)
    assert (rnq, rqs, offset) == (nq, qs) + (0,) and size == inf.area_size(nq, qs) and len(r.fds) == 1
    return r.fds[0], size


def _start(env: Env, qs: int, fd: int, size: int):
    env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES))
    env.set_mem_table()
    env.ok(Request.SET_INFLIGHT_FD, inf.encode_payload(size, 0, 1, qs), [os.dup(fd)])
    return env


def test_layout_matches_qemus_split_ring_structs():
    assert inf.REGION_HDR.size == 16 and inf.DESC_STATE.size == 16
    assert inf.queue_region_size(128) == 2112                  # QEMU: ALIGN_UP(16 * 128 + 2, 64)
    assert inf.queue_region_size(2) == 64 and inf.area_size(3, 2) == 192


def test_backend_hands_out_a_zeroed_area_with_its_header():
    env = Env(num_queues=2)
    try:
        fd, size = _get_inflight(env, 2, 8)
        area = mmap.mmap(fd, size)
        whole = memoryview(area)
        for i in range(2):
            q = inf.InflightQueue(inf.queue_view(whole, i, 8), 8)
            assert q.header() == (0, inf.INFLIGHT_VERSION, 8, 0, 0) and q.recover(0) == []
            q.release()
        whole.release()
        area.close()
        os.close(fd)
    finally:
        env.close()


@pytest.mark.parametrize("bad", [(0, 8), (3, 8), (1, 0), (1, 6)])
def test_get_inflight_fd_refuses_nonsense_and_sends_no_fd(bad):
    env = Env(num_queues=2)
    try:
        with pytest.raises(p.ProtocolError):
            env.handle(Request.GET_INFLIGHT_FD, inf.encode_payload(0, 0, *bad))
    finally:
        env.close()


def _post_get_ids(env: Env, dq, n: int, first: int = 0):
    bufs = []
    for i in range(n):
        buf = env.alloc.alloc(4096)
        env.mem.write(buf, blk.OUTHDR.pack(blk.VIRTIO_BLK_T_GET_ID, 0, 0))
        dq.add([(buf, 16)], [(buf + 64, 20), (buf + 128, 1)], token=first + i)
        bufs.append(buf)
    dq.publish()
    return bufs


def _crash_and_replace(env: Env) -> None:
    """The backend process dies: no GET_VRING_BASE, no cleanup. A new one takes the socket."""
    from simvirt.devices.blk.device import BlkDevice
    from simvirt.devices.blk.storage import MemoryStorage
    from simvirt.vhost_user.backend import BackendSession
    from test_backend import RAM, Hooks
    env.s = BackendSession(BlkDevice(MemoryStorage(RAM), num_queues=1, label=env.label + "-2"), Hooks())
    env.dev = env.s.device
    env.ok(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(p.ProtocolFeature.REPLY_ACK) | bit(p.ProtocolFeature.MQ)
                                                       | bit(p.ProtocolFeature.INFLIGHT_SHMFD)))


def _restart_ring(env: Env, dq, index: int = 0, *, call: int = -1, enable: bool = True) -> None:
    """What the frontend sends a restarted backend: same ring, base = used idx in guest RAM."""
    u = env.mem.gpa_to_user
    env.ok(Request.SET_VRING_NUM, p.encode_vring_state(index, dq.size))
    env.ok(Request.SET_VRING_BASE, p.encode_vring_state(index, dq.device_used_idx()))
    env.ok(Request.SET_VRING_ADDR, p.encode_vring_addr(p.VringAddr(index, 0, u(dq.desc_gpa), u(dq.used_gpa),
                                                                   u(dq.avail_gpa), 0)))
    env.ok(Request.SET_VRING_CALL, p.encode_u64(index), [os.dup(call) if call >= 0 else os.eventfd(0, os.EFD_NONBLOCK)])
    env.ok(Request.SET_VRING_KICK, p.encode_u64(index), [os.eventfd(0, os.EFD_NONBLOCK)])
    if enable:
        env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(index, 1))


def _serve(env: Env) -> None:
    vr = env.s.vrings[0]
    env.dev.process_queue(0, vr.queue, vr.stats)


@pytest.fixture
def started():
    qs = 16
    env = Env(num_queues=1)
    fd, size = _get_inflight(env, 1, qs)
    _start(env, qs, fd, size)
    dq, _, _ = env.setup_ring(0, size=qs)
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 1))
    yield env, dq, fd, size
    os.close(fd)
    env.close()


def test_requests_taken_but_not_completed_are_resubmitted_oldest_first_after_a_crash(started):
    env, dq, fd, size = started
    _post_get_ids(env, dq, 5)
    q = env.s.vrings[0].queue
    heads = q.pop_heads()
    assert len(heads) == 5
    q.add_used(heads[3], 21)          # completed out of order...
    q.add_used(heads[1], 21)
    assert sorted(t for t, _ in dq.pop_used()) == [1, 3]
    _crash_and_replace(env)           # ...then the backend dies with 0, 2, 4 taken
    _start(env, dq.size, fd, size)
    _restart_ring(env, dq)
    q2 = env.s.vrings[0].queue
    assert q2.resubmit == [heads[0], heads[2], heads[4]] and q2.next_avail == 5
    _serve(env)
    assert sorted(t for t, _ in dq.pop_used()) == [0, 2, 4]   # each once: pop_used refuses a head not in flight
    _post_get_ids(env, dq, 2, first=5)  # and the ring goes on
    _serve(env)
    assert sorted(t for t, _ in dq.pop_used()) == [5, 6] and dq.in_flight == 0


def test_crash_between_publishing_used_and_clearing_inflight_is_not_a_duplicate(started):
    env, dq, fd, size = started
    _post_get_ids(env, dq, 3)
    q = env.s.vrings[0].queue
    heads = q.pop_heads()
    q.add_used(heads[0], 21)
    q.inflight.post_put = lambda *a: None   # die right after the used idx store for the next one
    q.add_used(heads[1], 21)
    assert sorted(t for t, _ in dq.pop_used()) == [0, 1]
    _crash_and_replace(env)
    _start(env, dq.size, fd, size)
    _restart_ring(env, dq)
    q2 = env.s.vrings[0].queue
    assert q2.resubmit == [heads[2]] and q2.next_avail == 3
    _serve(env)
    assert [t for t, _ in dq.pop_used()] == [2] and dq.in_flight == 0


def test_a_resumed_ring_interrupts_once_for_completions_the_dead_backend_never_signalled(started):
    """The dead backend published a used entry and died before writing the call eventfd: the
    driver (at queue depth 1) would wait for ever. The new backend interrupts once at start."""
    env, dq, fd, size = started
    _post_get_ids(env, dq, 1)
    q = env.s.vrings[0].queue
    (head,) = q.pop_heads()
    q.add_used(head, 21)              # ...and no signal: killed here
    _crash_and_replace(env)
    _start(env, dq.size, fd, size)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    _restart_ring(env, dq, call=call, enable=False)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(call)         # not before the ring is live
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 1))
    assert os.eventfd_read(call) == 1
    assert [t for t, _ in dq.pop_used()] == [0]
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 0))
    env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 1))
    with pytest.raises(BlockingIOError):
        os.eventfd_read(call)         # once, not at every enable
    os.close(call)


def test_without_inflight_area_a_restart_resumes_at_the_base_it_is_given():
    env = Env(num_queues=1)
    try:
        env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES))
        env.set_mem_table()
        dq, _, call = env.setup_ring(0, size=8)
        env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(0, 1))
        assert env.s.vrings[0].queue.inflight is None
        with pytest.raises(BlockingIOError):
            os.eventfd_read(call)     # a fresh ring (used idx 0) does not interrupt at start
    finally:
        env.close()


class _Capture:
    accepts_offload = False

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frames) -> None:
        self.frames.extend(bytes(f) for f in frames)


def _net_session(env: Env) -> _Capture:
    from simvirt.devices.net.device import NetDevice
    from simvirt.vhost_user.backend import BackendSession
    from test_backend import Hooks
    env.dev = NetDevice(mac=bytes.fromhex("525400aabbcc"), label=env.label + "-net")
    env.s = BackendSession(env.dev, Hooks())
    env.ok(Request.SET_PROTOCOL_FEATURES, p.encode_u64(bit(p.ProtocolFeature.REPLY_ACK) | bit(p.ProtocolFeature.MQ)
                                                       | bit(p.ProtocolFeature.INFLIGHT_SHMFD)))
    peer = _Capture()
    env.dev.peer = peer
    return peer


def test_net_restart_is_at_most_once_frames_taken_by_the_dead_device_are_dropped_not_resent():
    from simvirt.net import packets as pk
    from simvirt.net import spec as ns
    env = Env(num_queues=1)
    _net_session(env)
    try:
        fd, size = _get_inflight(env, 2, 16)
        env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES))
        env.set_mem_table()
        env.ok(Request.SET_INFLIGHT_FD, inf.encode_payload(size, 0, 2, 16), [os.dup(fd)])
        dq, _, _ = env.setup_ring(1, size=16)        # transmitq 0
        env.ok(Request.SET_VRING_ENABLE, p.encode_vring_state(1, 1))
        frames = [pk.udp_frame(bytes(6), b"\xff" * 6, bytes(4), bytes(4), 1, 9, bytes([i]) * 50) for i in range(5)]
        for i, f in enumerate(frames):
            buf = env.alloc.alloc(4096)
            env.mem.write(buf, ns.VirtioNetHdr().pack() + f)
            dq.add([(buf, 12 + len(f))], [], token=i)
        dq.publish()
        q = env.s.vrings[1].queue
        taken = q.pop_heads(3)          # the device took three (it may have sent them) and died
        assert len(taken) == 3
        peer = _net_session(env)        # a new process
        env.ok(Request.SET_FEATURES, p.encode_u64(FEATURES))
        env.set_mem_table()
        env.ok(Request.SET_INFLIGHT_FD, inf.encode_payload(size, 0, 2, 16), [os.dup(fd)])
        _restart_ring(env, dq, index=1)
        vr = env.s.vrings[1]
        assert vr.queue.resubmit == [] and vr.queue.next_avail == 3
        assert sorted(t for t, n in dq.pop_used()) == [0, 1, 2]           # returned, empty
        assert env.dev.stats.drops["tx_lost_in_restart"] == 3
        env.dev.process_queue(1, vr.queue, vr.stats)
        assert peer.frames == frames[3:]                                   # the rest, once
        assert sorted(t for t, _ in dq.pop_used()) == [3, 4]
        os.close(fd)
    finally:
        env.close()
