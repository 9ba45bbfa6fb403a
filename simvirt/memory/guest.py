"""Guest-physical memory as a table of mapped regions.

Both sides use the same class: the driver process builds it from its own
named shared-memory segment, a device process builds it from the regions a
vhost-user frontend sends with SET_MEM_TABLE (fd + mmap offset each).
Every translation is bounds-checked, so a guest-supplied address can never
reach outside a region: it raises :class:`GuestAddressError` instead.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Optional

from simvirt.memory.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate


class GuestAddressError(ValueError):
    """A (guest-physical or frontend-virtual) range is not inside guest RAM."""

    def __init__(self, addr: int, length: int, space: str = "gpa") -> None:
        super().__init__(f"{space} range [{addr:#x}, +{length:#x}) is outside guest memory")
        self.addr = addr
        self.length = length
        self.space = space


@dataclass
class MemoryRegion:
    """One contiguous piece of guest RAM.

    ``user_addr`` is the frontend's virtual address of the region: vhost-user
    ring addresses (SET_VRING_ADDR) are expressed in it, descriptor addresses
    are guest-physical.
    """

    gpa: int
    size: int
    view: memoryview
    user_addr: int = 0
    mmap_offset: int = 0
    fd: int = -1
    _mmap: Optional[mmap.mmap] = field(default=None, repr=False)

    def close(self) -> None:
        self.view.release()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A consumer still holds a slice; the mapping dies with it.
                pass
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _buffer_address(buf: mmap.mmap) -> int:
    """Virtual address of an mmap'd buffer, used as the vhost-user user_addr."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class GuestMemory:
    """A set of non-overlapping regions with bounds-checked translation."""

    def __init__(self, regions: Optional[list[MemoryRegion]] = None) -> None:
        self.regions: list[MemoryRegion] = []
        self._shm: Optional[shared_memory.SharedMemory] = None
        for r in regions or []:
            self.add_region(r)

    # -- construction -----------------------------------------------------
    @classmethod
    def create_shared(cls, size: int, name: Optional[str] = None, gpa: int = 0) -> "GuestMemory":
        """Allocate guest RAM as a named POSIX shared-memory segment.

        The name lets tools attach (``SharedMemory(name)``); the fd is what
        travels to device processes over vhost-user.
        """
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"guest RAM size must be a positive multiple of {mmap.PAGESIZE}")
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        fd = os.dup(shm._fd)  # type: ignore[attr-defined]
        # Re-map ourselves so we own a mapping whose address we can report.
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        region = MemoryRegion(gpa=gpa, size=size, view=memoryview(mm), user_addr=_buffer_address(mm),
                              mmap_offset=0, fd=fd, _mmap=mm)
        mem = cls([region])
        mem._shm = shm
        return mem

    @classmethod
    def map_fd(cls, fd: int, gpa: int, size: int, user_addr: int, mmap_offset: int) -> MemoryRegion:
        """Map a region received from a frontend (takes ownership of ``fd``).

        Like libvhost-user we map ``size + mmap_offset`` bytes from offset 0,
        so an offset that is not page aligned still works.
        """
        if size <= 0 or mmap_offset < 0 or size + mmap_offset > sys.maxsize:
            os.close(fd)
            raise ValueError(f"memory region of size {size:#x} at mmap offset {mmap_offset:#x} is unmappable")
        try:
            mm = mmap.mmap(fd, size + mmap_offset, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            os.close(fd)
            raise ValueError(f"cannot map memory region of size {size:#x}: {e}") from None
        view = memoryview(mm)[mmap_offset:mmap_offset + size]
        return MemoryRegion(gpa=gpa, size=size, view=view, user_addr=user_addr,
                            mmap_offset=mmap_offset, fd=fd, _mmap=mm)

    def add_region(self, region: MemoryRegion) -> None:
        for r in self.regions:
            if region.gpa < r.gpa + r.size and r.gpa < region.gpa + region.size:
                raise ValueError(f"region at gpa {region.gpa:#x} overlaps one at {r.gpa:#x}")
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)

    @property
    def shm_name(self) -> Optional[str]:
        return self._shm.name if self._shm is not None else None

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self, unlink: bool = True) -> None:
        for r in self.regions:
            r.close()
        self.regions = []
        if self._shm is not None:
            self._shm.close()
            if unlink:
                try:
                    self._shm.unlink()
                except FileNotFoundError:
                    pass
            self._shm = None

    # -- translation ------------------------------------------------------
    def translate(self, gpa: int, length: int) -> memoryview:
        """Guest-physical ``[gpa, gpa+length)`` as a writable memoryview."""
        if length < 0:
            raise GuestAddressError(gpa, length)
        for r in self.regions:
            off = gpa - r.gpa
            if 0 <= off and off + length <= r.size:
                return r.view[off:off + length]
        raise GuestAddressError(gpa, length)

    def translate_user(self, uaddr: int, length: int) -> memoryview:
        """Frontend-virtual ``[uaddr, uaddr+length)``: how vhost-user names ring areas."""
        if length < 0:
            raise GuestAddressError(uaddr, length, space="user")
        for r in self.regions:
            off = uaddr - r.user_addr
            if 0 <= off and off + length <= r.size:
                return r.view[off:off + length]
        raise GuestAddressError(uaddr, length, space="user")

    def user_to_gpa(self, uaddr: int) -> int:
        for r in self.regions:
            off = uaddr - r.user_addr
            if 0 <= off < r.size:
                return r.gpa + off
        raise GuestAddressError(uaddr, 1, space="user")

    def gpa_to_user(self, gpa: int) -> int:
        for r in self.regions:
            off = gpa - r.gpa
            if 0 <= off < r.size:
                return r.user_addr + off
        raise GuestAddressError(gpa, 1)

    def discard(self, gpa: int, length: int) -> None:
        """Hand ``[gpa, gpa+length)`` back to the host: its pages leave the segment.

        Punches a hole in the backing shmem/memfd file, which frees the pages
        from every process that maps them (the balloon's whole point); later
        reads see zeros. Falls back to zero-filling when the fd can't punch.
        """
        for r in self.regions:
            off = gpa - r.gpa
            if 0 <= off and off + length <= r.size:
                if r.fd >= 0:
                    try:
                        fallocate(r.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.mmap_offset + off, length)
                        return
                    except OSError:
                        pass
                r.view[off:off + length] = bytes(length)
                return
        raise GuestAddressError(gpa, length)

    def resident_bytes(self) -> int:
        """Bytes of guest RAM the host really holds (allocated blocks of the backing files)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for r in self.regions:
            if r.fd < 0:
                continue
            st = os.fstat(r.fd)
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
        return total

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.translate(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.translate(gpa, len(data))[:] = data
