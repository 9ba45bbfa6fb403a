"""QEMU -netdev stream/socket framing (simvirt/net/framing.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from simvirt.net.framing import (
    DEFAULT_MAX_FRAME,
    FramingError,
    StreamDeframer,
    frame_for_stream,
    frames_for_stream,
)


def test_prefix_is_4_byte_big_endian_length():
    assert frame_for_stream(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame_for_stream(bytes(1514))[:4] == b"\x00\x00\x05\xea"
    assert frames_for_stream([b"a", b"bc"]) == b"\0\0\0\x01a\0\0\0\x02bc"


def test_whole_and_batched_feeds():
    d = StreamDeframer()
    assert d.feed(frame_for_stream(b"one")) == [b"one"]
    assert d.feed(frames_for_stream([b"two", b"three", bytes(1514)])) == [b"two", b"three", bytes(1514)]
    assert d.pending == 0 and d.frames == 4


def test_byte_at_a_time():
    frames = [b"x" * n for n in (1, 60, 1514, 9000)]
    blob = frames_for_stream(frames)
    d = StreamDeframer()
    out = []
    for i in range(len(blob)):
        out += d.feed(blob[i : i + 1])
        assert d.pending == sum(len(f) + 4 for f in frames) - len(b"".join(out)) - 4 * len(out) - (
            len(blob) - i - 1)
    assert out == frames


def test_split_inside_prefix_and_inside_frame():
    blob = frames_for_stream([b"hello", b"world!"])
    d = StreamDeframer()
    assert d.feed(blob[:2]) == [] and d.pending == 2
    assert d.feed(blob[2:6]) == [] and d.pending == 6
    assert d.feed(blob[6:11]) == [b"hello"] and d.pending == 2
    assert d.feed(memoryview(blob)[11:]) == [b"world!"] and d.pending == 0


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=12), st.lists(st.integers(1, 5000), max_size=30))
def test_any_chunking_yields_the_same_frames(frames, cuts):
    blob = frames_for_stream(frames)
    d = StreamDeframer()
    out, pos = [], 0
    for c in cuts:
        out += d.feed(blob[pos : pos + c])
        pos += c
    out += d.feed(blob[pos:])
    assert out == frames and d.pending == 0


def test_empty_frames_are_skipped_and_counted():
    d = StreamDeframer()
    assert d.feed(frames_for_stream([b"", b"a", b""])) == [b"a"]
    assert d.empty_frames == 2


def test_oversize_frame_breaks_the_stream():
    d = StreamDeframer()
    assert DEFAULT_MAX_FRAME == 65535
    assert d.feed(frame_for_stream(bytes(65535))) == [bytes(65535)]
    with pytest.raises(FramingError):
        d.feed(b"\x00\x01\x00\x00")  # 65536: rejected as soon as the prefix is complete
    with pytest.raises(FramingError):
        d.feed(frame_for_stream(b"ok"))  # no trustworthy boundary is left
    assert d.broken


def test_oversize_detected_across_partial_prefix_and_custom_limit():
    d = StreamDeframer(max_frame=1514)
    assert d.feed(b"\x00\x00") == []
    with pytest.raises(FramingError):
        d.feed(b"\x05\xeb" + bytes(10))  # 1515
    with pytest.raises(ValueError):
        StreamDeframer(max_frame=0)


def test_frames_are_independent_copies():
    buf = bytearray(frame_for_stream(b"abcd"))
    d = StreamDeframer()
    (f,) = d.feed(buf)
    buf[4:8] = b"zzzz"
    assert f == b"abcd"
