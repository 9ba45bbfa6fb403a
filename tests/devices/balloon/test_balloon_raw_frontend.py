"""virtio-balloon spec conformance through a raw vhost-user frontend.

No simvirt driver here: the test negotiates exactly the bits it wants,
lays out the rings itself (DriverQueue in its own shared guest RAM), and
talks to a real ``simvirt device balloon`` process. Every claim is checked
against what the guest's mapping, the shared segment's allocated blocks,
the device's control socket or its Prometheus metrics show.
"""
from __future__ import annotations

import struct
import threading
import time

import pytest

from balloon_testlib import (
    CONFIG_CHANGE,
    FEATURE_BITS,
    MiB,
    PAGE,
    RawBalloon,
    pattern,
    wait_for,
)
from simvirt.devices.balloon import spec as s
from simvirt.vhost_user.frontend import BackendError
from simvirt.virtio.spec import bit

ZERO = bytes(PAGE)
MTH = bit(s.VIRTIO_BALLOON_F_MUST_TELL_HOST)
STATS = bit(s.VIRTIO_BALLOON_F_STATS_VQ)
REPORTING = bit(s.VIRTIO_BALLOON_F_PAGE_REPORTING)
POISON = bit(s.VIRTIO_BALLOON_F_PAGE_POISON)


@pytest.fixture
def raw(balloon):
    rigs = []

    def make(**kw) -> RawBalloon:
        r = RawBalloon(balloon.socket_path, **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


# ---------------------------------------------------------------------------
# feature bits and config space
# ---------------------------------------------------------------------------
def test_offered_feature_bits(raw):
    r = raw()
    f = r.device_features
    # Bit numbers straight from virtio 1.2 section 5.5.3 (not from simvirt's own constants).
    for n, name in ((0, "MUST_TELL_HOST"), (1, "STATS_VQ"), (2, "DEFLATE_ON_OOM"), (4, "PAGE_POISON"),
                    (5, "PAGE_REPORTING"), (32, "VERSION_1")):
        assert f & (1 << n), f"device does not offer {name} (bit {n}) in {f:#x}"
        if n < 32:
            assert FEATURE_BITS.get(name, n) == n
    # No free page hinting: offering FREE_PAGE_HINT (bit 3) would make a Linux
    # guest expect a free_page_vq and the cmd_id protocol.
    assert not f & (1 << 3)
    assert not f & (1 << s.VIRTIO_BALLOON_F_FREE_PAGE_HINT)


@pytest.mark.fresh_device
def test_config_layout_num_pages_and_actual(balloon, raw):
    r = raw(ram=32 * MiB)
    assert r.config() == (0, 0, 0, 0)
    # QEMU's `balloon SIZE` semantics: leave the guest SIZE bytes -> num_pages = (ram - SIZE) / 4K.
    reply = balloon.ctl({"cmd": "balloon", "size": 32 * MiB - 3 * MiB})
    assert reply["ok"], reply
    assert reply["target_pages"] == 768
    raw_cfg = r.fe.get_config(0, 8)
    assert raw_cfg[0:4] == (768).to_bytes(4, "little"), raw_cfg.hex()  # num_pages @0, le32
    assert raw_cfg[4:8] == bytes(4)  # actual @4
    # A field read on its own, at its offset.
    assert r.fe.get_config(0, 4) == (768).to_bytes(4, "little")
    # Reads past the defined fields return zeros (frontends ask for their struct's size).
    assert r.fe.get_config(0, 24)[16:] == bytes(8)
    reply = balloon.ctl({"cmd": "balloon-target-pages", "pages": 0x1234})
    assert reply["ok"] and r.fe.get_config(0, 4) == struct.pack("<I", 0x1234)


def test_target_change_raises_config_interrupt(balloon, raw):
    """A new num_pages is announced with BACKEND_CONFIG_CHANGE_MSG (the config-change interrupt)."""
    from simvirt.vhost_user.protocol import ProtocolFeature

    r = raw(backend_req=True, protocol=bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
            | bit(ProtocolFeature.BACKEND_REQ))
    assert balloon.ctl({"cmd": "balloon", "size": 16 * MiB})["ok"]
    req, _flags, _payload = r.read_backend_req()
    assert req == CONFIG_CHANGE
    assert r.config()[0] == (32 * MiB - 16 * MiB) // PAGE


def test_write_actual_is_reflected_in_info(balloon, raw):
    r = raw()
    r.fe.set_config(s.CONFIG_ACTUAL_OFFSET, struct.pack("<I", 1234))
    assert balloon.info()["actual_pages"] == 1234
    assert r.config()[1] == 1234
    info = balloon.info()
    assert info["guest_memory_bytes"] == r.ram - 1234 * PAGE


@pytest.mark.parametrize("offset,data", [(0, struct.pack("<I", 99)), (8, struct.pack("<I", 1)),
                                          (12, struct.pack("<I", 0xAA)), (4, b"\x01\x02"), (5, struct.pack("<I", 7))])
def test_config_write_elsewhere_is_refused_and_device_survives(balloon, raw, offset, data):
    r = raw()
    assert balloon.ctl({"cmd": "balloon-target-pages", "pages": 10})["ok"]
    with pytest.raises(BackendError):
        r.fe.set_config(offset, data)  # REPLY_ACK negotiated: the refusal comes back as a failed ack
    assert balloon.alive
    # Same connection still works, and nothing changed.
    assert r.config() == (10, 0, 0, 0)
    assert balloon.info()["target_pages"] == 10
    assert balloon.info()["actual_pages"] == 0
    # ...and the rings still work.
    first = r.grab(2)
    r.inflate([first, first + 1])
    assert r.page(first) == ZERO


def test_config_write_refused_without_reply_ack(balloon, raw):
    """Without REPLY_ACK there is no ack to fail: the device logs, counts, and keeps the connection."""
    r = raw(protocol=bit(9))  # CONFIG only
    assert balloon.ctl({"cmd": "balloon-target-pages", "pages": 0})["ok"]
    before = balloon.errors("vhost_user_set_config")
    internal = balloon.errors("internal")
    r.fe.set_config(0, struct.pack("<I", 5))
    wait_for(lambda: balloon.errors("vhost_user_set_config") == before + 1, 5, "the refused SET_CONFIG to be counted")
    assert balloon.alive
    assert balloon.errors("internal") == internal, "a refused config write was handled as an internal error"
    assert balloon.info()["ram_bytes"] == r.ram, "the device dropped the frontend over a refused config write"
    assert r.config()[0] == 0  # still connected, num_pages untouched
    r.fe.set_config(s.CONFIG_ACTUAL_OFFSET, struct.pack("<I", 3))
    assert r.config()[1] == 3


def test_poison_val_writable_only_with_page_poison(balloon, raw):
    r = raw(features=POISON)
    r.fe.set_config(12, struct.pack("<I", 0xDEADBEEF))
    assert r.config()[3] == 0xDEADBEEF


# ---------------------------------------------------------------------------
# queue numbering
# ---------------------------------------------------------------------------
def test_reporting_vq_is_ring_2_without_stats(balloon, raw):
    """Linux numbering: absent optional queues are skipped, so reporting_vq is ring 2 without STATS_VQ."""
    r = raw(features=REPORTING)
    assert r.roles == ["inflateq", "deflateq", "reporting_vq"]
    reported0 = balloon.info()["moved_pages"]["reported"]
    first = r.grab(8)
    before = r.resident()
    r.post(2, [], [(first * PAGE, 8 * PAGE)], "report")
    assert r.wait_used(2) == [("report", 0)]
    assert before - r.resident() == 8 * PAGE  # measured before reading: a read faults a zero page in
    assert all(r.page(first + k) == ZERO for k in range(8))
    assert balloon.info()["moved_pages"]["reported"] - reported0 == 8
    assert balloon.info()["features"] == ["PAGE_REPORTING"]


def test_reporting_vq_is_ring_3_with_stats(balloon, raw):
    r = raw(features=STATS | REPORTING)
    assert r.roles == ["inflateq", "deflateq", "statsq", "reporting_vq"]
    first = r.grab(4)
    # Ring 2 is the stats queue: a buffer there is held, and its pages are not reported.
    gpa, n = r.stats_buffer([(s.VIRTIO_BALLOON_S_MEMFREE, 77)])
    r.post(2, [(gpa, n)], [], "stats")
    r.assert_no_used(2)
    assert balloon.info()["stats"]["free_memory"] == 77
    before = r.resident()
    r.post(3, [], [(first * PAGE, 4 * PAGE)], "report")
    assert r.wait_used(3) == [("report", 0)]
    assert before - r.resident() == 4 * PAGE
    assert r.page(first) == ZERO and r.page(first + 3) == ZERO


def test_chain_on_ring_without_role_is_returned_and_counted(balloon, raw):
    """No optional queue negotiated: ring 2 has no role; its chains are returned untouched."""
    r = raw(features=0, rings=3)
    moved0 = balloon.info()["moved_pages"]
    first = r.grab(2)
    before_err = balloon.errors("unexpected_queue")
    r.post(2, [], [(first * PAGE, 2 * PAGE)], "stray")
    assert r.wait_used(2) == [("stray", 0)]
    assert r.page(first) == pattern(first)  # nothing discarded
    assert balloon.errors("unexpected_queue") == before_err + 1
    assert balloon.info()["moved_pages"] == moved0


# ---------------------------------------------------------------------------
# inflate / deflate
# ---------------------------------------------------------------------------
@pytest.mark.fresh_device
def test_inflate_discards_exactly_the_listed_pages(balloon, raw):
    r = raw(ram=64 * MiB, features=MTH)
    first = r.grab(64)
    # Scattered, unsorted, with holes: only these pages may go.
    chosen = [first + k for k in (5, 1, 2, 3, 40, 41, 63, 0, 20)]
    before = r.resident()
    assert r.inflate(chosen) == 0
    assert before - r.resident() == len(chosen) * PAGE
    info = balloon.info()
    assert info["resident_bytes"] == r.resident()  # the device sees the same segment
    for k in range(64):
        got = r.page(first + k)
        if first + k in chosen:
            assert got == ZERO, f"inflated page {k} still holds data"
        else:
            assert got == pattern(first + k), f"page {k} was not in the inflate buffer but changed"
    assert info["inflated_pages"] == len(chosen)
    assert info["moved_pages"]["inflated"] == len(chosen)


@pytest.mark.fresh_device
def test_inflate_256_pfns_per_buffer_and_several_buffers_in_flight(balloon, raw):
    r = raw(ram=64 * MiB)
    first = r.grab(1024)
    before = r.resident()
    index = r.ring("inflateq")
    for b in range(4):
        r.post(index, [r.pfn_buffer(list(range(first + 256 * b, first + 256 * (b + 1))))], [], b)
    assert sorted(t for t, _ in r.wait_used(index, 4)) == [0, 1, 2, 3]
    assert before - r.resident() == 1024 * PAGE
    assert all(r.page(first + k) == ZERO for k in range(0, 1024, 37))
    assert balloon.info()["inflated_pages"] == 1024


@pytest.mark.fresh_device
def test_deflate_then_pages_come_back_zeroed_and_usable(balloon, raw):
    r = raw(ram=32 * MiB, features=MTH)
    first = r.grab(16)
    pfns = list(range(first, first + 16))
    r.inflate(pfns)
    assert balloon.info()["inflated_pages"] == 16
    assert r.deflate(pfns[:10]) == 0
    info = balloon.info()
    assert info["inflated_pages"] == 6
    assert info["moved_pages"]["deflated"] == 10
    # Deflated pages are not resident until touched; they read as zeros, and
    # writing them makes them resident again.
    before = r.resident()
    assert r.page(first) == ZERO
    for k in range(10):
        r.mem.write((first + k) * PAGE, pattern(first + k))
    assert r.resident() - before == 10 * PAGE
    assert r.page(first + 9) == pattern(first + 9)
    # Deflating a page that was never inflated does not make the count negative.
    r.deflate([first + 12, first + 12, first + 200])
    assert balloon.info()["inflated_pages"] == 5


@pytest.mark.fresh_device
def test_inflating_the_same_page_twice_counts_it_once(balloon, raw):
    r = raw()
    first = r.grab(3)
    r.inflate([first, first, first + 1])
    r.inflate([first + 1, first + 2])
    assert balloon.info()["inflated_pages"] == 3


@pytest.mark.fresh_device
def test_bad_pfns_are_rejected_counted_and_good_ones_still_apply(balloon, raw):
    r = raw(ram=32 * MiB)
    ram_pages = r.ram // PAGE
    first = r.grab(4)
    # The last guest page is good; the first page past RAM and far-away PFNs are not.
    r.mem.write((ram_pages - 1) * PAGE, pattern(ram_pages - 1))
    before_bad = balloon.errors("bad_pfn")
    before_res = r.resident()
    assert balloon.alive
    r.inflate([first, ram_pages, first + 2, 0xFFFFFFFF, ram_pages + 12345, ram_pages - 1])
    assert before_res - r.resident() == 3 * PAGE
    assert balloon.errors("bad_pfn") == before_bad + 3
    assert r.page(first) == ZERO and r.page(first + 2) == ZERO and r.page(ram_pages - 1) == ZERO
    assert r.page(first + 1) == pattern(first + 1)
    assert balloon.info()["inflated_pages"] == 3
    # Deflate with bad PFNs: counted too, device keeps serving.
    r.deflate([first, ram_pages + 1])
    assert balloon.errors("bad_pfn") == before_bad + 4
    assert balloon.info()["inflated_pages"] == 2
    assert balloon.alive


def test_pfn_array_not_multiple_of_4_is_counted_and_whole_pfns_apply(balloon, raw):
    r = raw()
    first = r.grab(2)
    gpa, n = r.pfn_buffer([first, first + 1])
    before = balloon.errors("bad_pfn_array")
    index = r.ring("inflateq")
    r.post(index, [(gpa, n - 2)], [], "odd")  # 6 bytes: one whole PFN and a half
    r.wait_used(index)
    assert balloon.errors("bad_pfn_array") == before + 1
    assert r.page(first) == ZERO
    assert r.page(first + 1) == pattern(first + 1)


def test_writable_pfn_buffer_is_rejected(balloon, raw):
    r = raw()
    first = r.grab(1)
    gpa, n = r.pfn_buffer([first])
    inflated0 = balloon.info()["moved_pages"]["inflated"]
    before = balloon.errors("bad_address")
    index = r.ring("inflateq")
    r.post(index, [], [(gpa, n)], "w")
    assert r.wait_used(index) == [("w", 0)]
    assert balloon.errors("bad_address") == before + 1
    assert r.page(first) == pattern(first)
    assert balloon.info()["moved_pages"]["inflated"] == inflated0


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------
def _stats_request(balloon, out: dict, timeout: float = 5.0) -> threading.Thread:
    def go() -> None:
        out["reply"] = balloon.ctl({"cmd": "balloon-stats", "timeout": timeout}, timeout=timeout + 5)

    t = threading.Thread(target=go)
    t.start()
    return t


@pytest.mark.fresh_device
def test_stats_buffer_is_held_until_requested_then_refreshed(balloon, raw):
    r = raw(features=STATS)
    index = r.ring("statsq")
    buf = r.scratch_page()
    first = [(s.VIRTIO_BALLOON_S_MEMFREE, 111 * MiB), (s.VIRTIO_BALLOON_S_MEMTOT, 512 * MiB),
             (0x7F, 42),  # unknown tag: must be ignored
             (s.VIRTIO_BALLOON_S_AVAIL, 100 * MiB)]
    r.post(index, [r.stats_buffer(first, buf)], [], "stats")
    r.assert_no_used(index, 0.3)  # the device holds the buffer
    info = balloon.info()
    assert info["stats"] == {"free_memory": 111 * MiB, "total_memory": 512 * MiB, "available_memory": 100 * MiB}

    out: dict = {}
    t = _stats_request(balloon, out)
    # The device asks for fresh numbers by returning the buffer.
    assert r.wait_used(index, 1, 5.0) == [("stats", 0)]
    second = [(s.VIRTIO_BALLOON_S_MEMFREE, 7 * MiB), (s.VIRTIO_BALLOON_S_MEMTOT, 512 * MiB),
              (s.VIRTIO_BALLOON_S_MAJFLT, 3), (0xBEEF, 1), (s.VIRTIO_BALLOON_S_CACHES, 4096)]
    r.post(index, [r.stats_buffer(second, buf)], [], "stats")
    t.join(15)
    assert not t.is_alive()
    reply = out["reply"]
    assert reply["ok"], reply
    assert reply["stats"]["free_memory"] == 7 * MiB
    assert reply["stats"]["major_faults"] == 3
    assert reply["stats"]["disk_caches"] == 4096
    assert reply["stats"]["total_memory"] == 512 * MiB
    assert set(reply["stats"]) <= set(s.STAT_NAMES.values())
    assert reply["stats_age_s"] is not None and reply["stats_age_s"] < 5
    # ...and the new buffer is held again.
    r.assert_no_used(index, 0.2)


def test_stats_request_without_guest_answer_returns_last_values(balloon, raw):
    r = raw(features=STATS)
    index = r.ring("statsq")
    r.post(index, [r.stats_buffer([(s.VIRTIO_BALLOON_S_MEMFREE, 5)])], [], "stats")
    r.assert_no_used(index, 0.2)
    reply = balloon.ctl({"cmd": "balloon-stats", "timeout": 0.3})
    assert reply["ok"] and reply["stats"]["free_memory"] == 5
    assert r.wait_used(index) == [("stats", 0)]
    # Nothing held now: another request returns at once with the same values.
    t0 = time.monotonic()
    reply = balloon.ctl({"cmd": "balloon-stats", "timeout": 5})
    assert time.monotonic() - t0 < 2
    assert reply["ok"] and reply["stats"]["free_memory"] == 5


def test_second_stats_buffer_is_an_overrun_and_returns_the_first(balloon, raw):
    r = raw(features=STATS)
    index = r.ring("statsq")
    before = balloon.errors("stats_buffer_overrun")
    r.post(index, [r.stats_buffer([(s.VIRTIO_BALLOON_S_MEMFREE, 1)])], [], "A")
    r.assert_no_used(index, 0.2)
    r.post(index, [r.stats_buffer([(s.VIRTIO_BALLOON_S_MEMFREE, 2)])], [], "B")
    assert r.wait_used(index) == [("A", 0)]
    r.assert_no_used(index, 0.2)  # B is held now
    assert balloon.errors("stats_buffer_overrun") == before + 1
    assert balloon.info()["stats"]["free_memory"] == 2
    reply = balloon.ctl({"cmd": "balloon-stats", "timeout": 0.3})
    assert reply["ok"]
    assert r.wait_used(index) == [("B", 0)]


def test_stats_buffer_of_bad_length_is_counted(balloon, raw):
    r = raw(features=STATS)
    index = r.ring("statsq")
    gpa, n = r.stats_buffer([(s.VIRTIO_BALLOON_S_MEMFREE, 9), (s.VIRTIO_BALLOON_S_MEMTOT, 10)])
    before = balloon.errors("bad_stats")
    r.post(index, [(gpa, n - 3)], [], "short")
    wait_for(lambda: balloon.errors("bad_stats") == before + 1, 5, "bad_stats to be counted")
    stats = balloon.info()["stats"]
    assert stats["free_memory"] == 9 and stats.get("total_memory") != 10  # the torn entry is not used


# ---------------------------------------------------------------------------
# free page reporting
# ---------------------------------------------------------------------------
def test_page_report_discards_writable_blocks(balloon, raw):
    r = raw(ram=64 * MiB, features=REPORTING)
    index = r.ring("reporting_vq")
    a = r.grab(512)  # one 2 MiB block
    b = r.grab(64)
    keep = r.grab(1)
    moved0 = balloon.info()["moved_pages"]
    before = r.resident()
    r.post(index, [], [(a * PAGE, 512 * PAGE), (b * PAGE, 64 * PAGE)], "rep")
    assert r.wait_used(index) == [("rep", 0)]
    assert before - r.resident() == 576 * PAGE
    assert r.page(a) == ZERO and r.page(a + 511) == ZERO and r.page(b + 63) == ZERO
    assert r.page(keep) == pattern(keep)
    moved = balloon.info()["moved_pages"]
    assert moved["reported"] - moved0["reported"] == 576
    # Reported pages are not in the balloon.
    assert moved["inflated"] == moved0["inflated"]


def test_page_report_with_readable_buffer_is_refused(balloon, raw):
    r = raw(features=REPORTING)
    index = r.ring("reporting_vq")
    a = r.grab(4)
    before = balloon.errors("bad_address")
    r.post(index, [(a * PAGE, 4 * PAGE)], [], "ro")
    assert r.wait_used(index) == [("ro", 0)]
    assert balloon.errors("bad_address") == before + 1
    assert r.page(a) == pattern(a)


def test_page_report_outside_ram_is_refused(balloon, raw):
    r = raw(ram=32 * MiB, features=REPORTING)
    index = r.ring("reporting_vq")
    before = balloon.errors("bad_address")
    r.post(index, [], [(r.ram - PAGE, 2 * PAGE)], "oob")
    assert r.wait_used(index) == [("oob", 0)]
    assert balloon.errors("bad_address") == before + 1
    assert balloon.alive


def test_page_report_unaligned_block_is_skipped(balloon, raw):
    r = raw(features=REPORTING)
    index = r.ring("reporting_vq")
    a = r.grab(3)
    before = balloon.errors("bad_report")
    r.post(index, [], [(a * PAGE + 512, PAGE), ((a + 2) * PAGE, PAGE)], "mis")
    r.wait_used(index)
    assert balloon.errors("bad_report") == before + 1
    assert r.page(a) == pattern(a) and r.page(a + 1) == pattern(a + 1)
    assert r.page(a + 2) == ZERO


def test_page_report_keeps_poisoned_pages(balloon, raw):
    """With PAGE_POISON and a non-zero poison_val, reported pages must keep reading as poison."""
    r = raw(features=POISON | REPORTING)
    r.fe.set_config(12, struct.pack("<I", 0xAAAAAAAA))
    index = r.ring("reporting_vq")
    a = r.grab(4)
    r.post(index, [], [(a * PAGE, 4 * PAGE)], "p")
    r.wait_used(index)
    assert r.page(a) == pattern(a)


# ---------------------------------------------------------------------------
# frontend disconnect = device reset
# ---------------------------------------------------------------------------
@pytest.mark.fresh_device
def test_next_frontend_starts_with_an_empty_balloon(balloon, raw):
    """A frontend disconnect resets the device: the next guest owns all its RAM and has sent no stats."""
    r = raw(features=STATS)
    first = r.grab(3)
    r.inflate([first, first + 1, first + 2])
    r.fe.set_config(s.CONFIG_ACTUAL_OFFSET, struct.pack("<I", 3))
    r.post(r.ring("statsq"), [r.stats_buffer([(s.VIRTIO_BALLOON_S_MEMFREE, 99)])], [], "st")
    r.assert_no_used(r.ring("statsq"), 0.2)
    info = balloon.info()
    assert (info["inflated_pages"], info["actual_pages"], info["stats"]) == (3, 3, {"free_memory": 99})
    r.close()
    wait_for(lambda: balloon.info()["ram_bytes"] == 0, 5, "the disconnect")
    r2 = raw()
    info = balloon.info()
    assert info["actual_pages"] == 0
    assert info["inflated_pages"] == 0, "the previous guest's balloon pages are still counted after a reset"
    assert info["stats"] == {} and info["stats_age_s"] is None, "the previous guest's statistics survived the reset"
    # A new guest deflating a PFN the old guest had inflated must not drive the count negative.
    r2.deflate([first])
    assert balloon.info()["inflated_pages"] == 0


# ---------------------------------------------------------------------------
# periodic statistics and metrics
# ---------------------------------------------------------------------------
def test_stats_interval_returns_the_buffer_periodically():
    """``--stats-interval`` makes the device ask for fresh statistics on its own."""
    from balloon_testlib import BalloonProc

    dev = BalloonProc(stats_interval=0.2, metrics=False)
    r = None
    try:
        r = RawBalloon(dev.socket_path, features=STATS)
        index = r.ring("statsq")
        buf = r.scratch_page()
        for value in (1, 2, 3):
            r.post(index, [r.stats_buffer([(s.VIRTIO_BALLOON_S_MEMFREE, value)], buf)], [], value)
            assert r.wait_used(index, 1, 3.0) == [(value, 0)]
        assert dev.info()["stats"]["free_memory"] == 3
    finally:
        if r is not None:
            r.close()
        dev.stop()


def test_metrics_follow_the_balloon(balloon, raw):
    from balloon_testlib import metric

    r = raw(ram=32 * MiB)
    assert balloon.ctl({"cmd": "balloon", "size": 24 * MiB})["ok"]
    r.fe.set_config(s.CONFIG_ACTUAL_OFFSET, struct.pack("<I", 77))
    first = r.grab(8)
    r.inflate(list(range(first, first + 8)))
    text = balloon.scrape()
    lbl = {"vm": balloon.vm, "device": "balloon"}
    assert metric(text, "simvirt_balloon_pages", kind="target", **lbl) == 2048
    assert metric(text, "simvirt_balloon_pages", kind="actual", **lbl) == 77
    assert metric(text, "simvirt_guest_ram_resident_bytes", **lbl) == r.resident()
    info = balloon.info()
    assert metric(text, "simvirt_balloon_moved_pages", kind="inflated", **lbl) == info["moved_pages"]["inflated"]
