"""Internet checksum: fast path against the word-loop reference (simvirt/net/checksum.py)."""
from __future__ import annotations

import os
import random
import struct
import time

from hypothesis import assume, given, settings, strategies as st

from netref import ref_checksum, ref_pseudo, ref_sum
from simvirt.net.checksum import finish, fold, internet_checksum, ones_sum, pseudo_header_sum, update16


@given(st.binary(max_size=9000))
def test_matches_reference(data):
    assert ones_sum(data) == ref_sum(data)
    assert internet_checksum(data) == ref_checksum(data)


@settings(max_examples=30)
@given(st.integers(4097, 70000), st.integers(0, 2**32))
def test_long_buffers_cross_chunk_boundaries(n, seed):
    data = random.Random(seed).randbytes(n)
    assert ones_sum(data) == ref_sum(data)
    assert ones_sum(memoryview(data)) == ref_sum(data)
    assert ones_sum(bytearray(data)) == ref_sum(data)


def test_odd_lengths_pad_with_zero():
    assert ones_sum(b"\x01") == 0x0100
    assert ones_sum(b"\x01\x02\x03") == 0x0402
    big = os.urandom(5001)
    assert ones_sum(big) == ref_sum(big)


def test_ones_complement_zero_cases():
    assert ones_sum(b"") == 0 and ones_sum(b"\0" * 100) == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF  # negative zero, as the fold loop gives
    assert ones_sum(b"\x80\x00\x7f\xff") == 0xFFFF
    assert ones_sum(b"\xff\xff\x00\x01") == 0x0001
    assert internet_checksum(b"\0\0") == 0xFFFF
    assert fold(0) == 0 and fold(0xFFFF) == 0xFFFF and fold(0x1FFFE) == 0xFFFF


def test_rfc1071_example():
    # RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2
    assert ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2


def test_known_ipv4_header():
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(hdr) == 0xB861


def test_initial_chains_like_concatenation():
    a, b = os.urandom(300), os.urandom(301)
    assert ones_sum(b, ones_sum(a)) == ref_sum(a + b)


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_pseudo_header_v4(src, dst, proto, length):
    assert pseudo_header_sum(src, dst, proto, length) == ref_sum(ref_pseudo(src, dst, proto, length))


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(0, 255),
       st.integers(0, 0xFFFFFFFF))
def test_pseudo_header_v6(src, dst, proto, length):
    assert pseudo_header_sum(src, dst, proto, length) == ref_sum(ref_pseudo(src, dst, proto, length))


def test_finish_zero_handling():
    assert finish(0xFFFF) == 0xFFFF  # computed 0 is written as 0xFFFF
    assert finish(0xFFFF, zero_as_ffff=False) == 0


@given(st.binary(min_size=20, max_size=20).map(bytearray), st.integers(0, 9), st.integers(0, 0xFFFF))
def test_incremental_update_matches_recompute(data, word, new):
    data[10:12] = b"\0\0"
    if word == 5:
        word = 4  # never patch the checksum word itself
    struct.pack_into("!H", data, 10, internet_checksum(data))
    (old,) = struct.unpack_from("!H", data, 2 * word)
    patched = update16(struct.unpack_from("!H", data, 10)[0], old, new)
    struct.pack_into("!H", data, 2 * word, new)
    # RFC 1624's -0/+0 corner: an all-zero header has no valid checksum
    # encoding that sums to 0xFFFF.  Real IP headers never are (version 4).
    assume(any(data[:10]) or any(data[12:]))
    assert ref_sum(bytes(data[:10]) + struct.pack("!H", patched) + bytes(data[12:])) == 0xFFFF


def test_64k_throughput_is_not_pathological():
    data = os.urandom(65536)
    ones_sum(data)
    t0 = time.perf_counter()
    for _ in range(20):
        ones_sum(data)
    per = (time.perf_counter() - t0) / 20
    # ~0.1 ms on a laptop; a per-word Python loop takes ~4 ms.  Generous bound for loaded CI.
    assert per < 0.0025, f"{per * 1e3:.2f} ms per 64 KiB"
