"""GuestMemory: bounds-checked translation, shared segments, map_fd, user addresses."""
from __future__ import annotations

import mmap
import os
from multiprocessing import shared_memory

import pytest

from simvirt.memory import GuestAddressError, GuestMemory, MemoryRegion

PAGE = mmap.PAGESIZE


def region(gpa: int, size: int, user_addr: int = 0, fill: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa=gpa, size=size, view=memoryview(bytearray([fill]) * size), user_addr=user_addr)


@pytest.fixture
def two_regions() -> GuestMemory:
    # [0x0000, 0x2000) and, directly adjacent, [0x2000, 0x3000); a hole, then [0x10000, 0x11000).
    return GuestMemory([region(0x2000, 0x1000, user_addr=0x7F00_0000_2000, fill=2),
                        region(0x0, 0x2000, user_addr=0x7F00_0000_0000, fill=1),
                        region(0x10000, 0x1000, user_addr=0x5000_0000, fill=3)])


class TestTranslate:
    def test_inside_each_region(self, two_regions):
        assert bytes(two_regions.translate(0, 4)) == b"\x01" * 4
        assert bytes(two_regions.translate(0x1FFC, 4)) == b"\x01" * 4
        assert bytes(two_regions.translate(0x2000, 0x1000)) == b"\x02" * 0x1000
        assert bytes(two_regions.translate(0x10FFF, 1)) == b"\x03"

    def test_regions_sorted_by_gpa(self, two_regions):
        assert [r.gpa for r in two_regions.regions] == [0, 0x2000, 0x10000]
        assert two_regions.size == 0x4000

    @pytest.mark.parametrize("gpa,length", [
        (-1, 1),            # negative address
        (-16, 32),          # starts below RAM, ends inside
        (0x3000, 1),        # first byte after the second region
        (0x2FFF, 2),        # crosses the end of the second region
        (0x1FFF, 2),        # spans two adjacent regions
        (0x0, 0x3000),      # covers both adjacent regions
        (0x8000, 16),       # in the hole
        (0x10FFF, 2),       # past the end of the last region
        (0x12000, 0),       # zero bytes, but outside every region
        (0, -1),            # negative length
        (0x10, -0x10),
        (2**64 - 8, 16),    # wraps past 2**64
        (0, 2**64),
    ])
    def test_out_of_bounds(self, two_regions, gpa, length):
        with pytest.raises(GuestAddressError) as ei:
            two_regions.translate(gpa, length)
        assert ei.value.addr == gpa and ei.value.length == length and ei.value.space == "gpa"
        assert isinstance(ei.value, ValueError)

    def test_read_write(self, two_regions):
        two_regions.write(0x1FFE, b"ab")
        assert two_regions.read(0x1FFE, 2) == b"ab"
        with pytest.raises(GuestAddressError):
            two_regions.write(0x1FFF, b"ab")  # would span into the next region
        assert two_regions.read(0x2000, 1) == b"\x02"  # and wrote nothing there

    def test_translation_is_a_live_view(self, two_regions):
        v = two_regions.translate(0x10, 4)
        v[:] = b"wxyz"
        assert two_regions.read(0x10, 4) == b"wxyz"

    def test_overlapping_region_rejected(self, two_regions):
        with pytest.raises(ValueError):
            two_regions.add_region(region(0x1000, 0x2000))
        with pytest.raises(ValueError):
            two_regions.add_region(region(0x10FFF, 0x10))
        two_regions.add_region(region(0x3000, 0x1000))  # adjacent is fine
        assert two_regions.read(0x3000, 1) == b"\x00"


class TestUserAddresses:
    def test_user_translation(self, two_regions):
        assert bytes(two_regions.translate_user(0x7F00_0000_2000 + 8, 8)) == b"\x02" * 8
        assert two_regions.user_to_gpa(0x5000_0010) == 0x10010
        assert two_regions.gpa_to_user(0x10010) == 0x5000_0010
        for gpa in (0, 0x1FFF, 0x2000, 0x2FFF, 0x10000):
            assert two_regions.user_to_gpa(two_regions.gpa_to_user(gpa)) == gpa

    @pytest.mark.parametrize("uaddr,length", [
        (0x7F00_0000_0000 - 1, 1),
        (0x7F00_0000_2000 + 0x1000, 1),
        (0x7F00_0000_2000 + 0xFFF, 2),
        (0x5000_0000 + 0x1000, 0x10),
        (0, 1),
    ])
    def test_user_out_of_bounds(self, two_regions, uaddr, length):
        with pytest.raises(GuestAddressError) as ei:
            two_regions.translate_user(uaddr, length)
        assert ei.value.space == "user"

    def test_user_to_gpa_outside(self, two_regions):
        with pytest.raises(GuestAddressError):
            two_regions.user_to_gpa(0x5000_1000)
        with pytest.raises(GuestAddressError):
            two_regions.gpa_to_user(0x3000)


class TestShared:
    def test_create_shared_validates_size(self):
        for bad in (0, -PAGE, PAGE + 1):
            with pytest.raises(ValueError):
                GuestMemory.create_shared(bad)

    def test_shared_segment_is_attachable_and_user_addr_is_real(self):
        mem = GuestMemory.create_shared(4 * PAGE, gpa=0x100000)
        try:
            (r,) = mem.regions
            assert r.gpa == 0x100000 and r.size == 4 * PAGE and r.fd >= 0 and r.user_addr != 0
            mem.write(0x100000 + PAGE, b"hello")
            # Another attachment of the named segment sees the bytes.
            other = shared_memory.SharedMemory(mem.shm_name)
            try:
                assert bytes(other.buf[PAGE:PAGE + 5]) == b"hello"
            finally:
                other.close()
            # user_addr is this process's address of the mapping (what SET_VRING_ADDR carries).
            import ctypes
            assert ctypes.string_at(mem.gpa_to_user(0x100000 + PAGE), 5) == b"hello"
            with pytest.raises(GuestAddressError):
                mem.translate(0, 1)
        finally:
            name = mem.shm_name
            mem.close()
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name)  # unlinked on close

    def test_map_fd_with_mmap_offset(self):
        mem = GuestMemory.create_shared(4 * PAGE)
        try:
            mem.write(0, bytes(range(256)) * (4 * PAGE // 256))
            # Page-aligned offset.
            r = GuestMemory.map_fd(os.dup(mem.regions[0].fd), gpa=0x40000, size=2 * PAGE,
                                   user_addr=0xAB0000, mmap_offset=PAGE)
            # Unaligned offset: libvhost-user style (map from 0, view from the offset).
            r2 = GuestMemory.map_fd(os.dup(mem.regions[0].fd), gpa=0x80000, size=100,
                                    user_addr=0xCD0000, mmap_offset=PAGE + 7)
            dev = GuestMemory([r, r2])
            try:
                assert dev.read(0x40000, 4) == mem.read(PAGE, 4)
                assert dev.read(0x40000 + 2 * PAGE - 4, 4) == mem.read(3 * PAGE - 4, 4)
                assert dev.read(0x80000, 100) == mem.read(PAGE + 7, 100)
                assert bytes(dev.translate_user(0xAB0000 + 16, 4)) == mem.read(PAGE + 16, 4)
                # Writes are shared with the driver's mapping.
                dev.write(0x40000 + 10, b"XYZ")
                assert mem.read(PAGE + 10, 3) == b"XYZ"
                with pytest.raises(GuestAddressError):
                    dev.translate(0x40000 + 2 * PAGE - 1, 2)
                with pytest.raises(GuestAddressError):
                    dev.translate(0x80000 + 99, 2)
            finally:
                dev.close()
        finally:
            mem.close()

    def test_map_fd_failures_close_the_fd(self):
        mem = GuestMemory.create_shared(2 * PAGE)
        try:
            fd = os.dup(mem.regions[0].fd)
            with pytest.raises(ValueError):
                GuestMemory.map_fd(fd, 0, 0, 0, 0)
            with pytest.raises(OSError):
                os.fstat(fd)
            fd = os.dup(mem.regions[0].fd)
            with pytest.raises((ValueError, OSError)):
                GuestMemory.map_fd(fd, 0, 4 * PAGE, 0, 0)  # larger than the segment
            with pytest.raises(OSError):
                os.fstat(fd)
        finally:
            mem.close()

    def test_close_owned_fd(self):
        mem = GuestMemory.create_shared(PAGE)
        fd = os.dup(mem.regions[0].fd)
        r = GuestMemory.map_fd(fd, 0, PAGE, 0, 0)
        r.close()
        with pytest.raises(OSError):
            os.fstat(fd)
        mem.close()


class TestDiscard:
    def test_discard_punches_shared_pages_out(self):
        mem = GuestMemory.create_shared(64 * PAGE)
        try:
            mem.write(0, b"\xab" * (64 * PAGE))
            full = mem.resident_bytes()
            assert full >= 64 * PAGE
            other = GuestMemory([GuestMemory.map_fd(os.dup(mem.regions[0].fd), 0, 64 * PAGE, 0, 0)])
            try:
                mem.discard(8 * PAGE, 32 * PAGE)
                # Measure before reading: a read fault on a shmem hole allocates the page again.
                assert mem.resident_bytes() <= full - 32 * PAGE
                assert mem.read(8 * PAGE, 32 * PAGE) == bytes(32 * PAGE)
                assert other.read(8 * PAGE, 32 * PAGE) == bytes(32 * PAGE)  # gone for every mapping
                assert mem.read(8 * PAGE - 1, 1) == b"\xab" and mem.read(40 * PAGE, 1) == b"\xab"
            finally:
                other.close()
            with pytest.raises(GuestAddressError):
                mem.discard(60 * PAGE, 8 * PAGE)
        finally:
            mem.close()

    def test_discard_without_fd_zero_fills(self, two_regions):
        two_regions.discard(0x10, 0x20)
        assert two_regions.read(0x10, 0x20) == bytes(0x20) and two_regions.read(0xF, 1) == b"\x01"
        assert two_regions.resident_bytes() == 0  # no backing files to measure
