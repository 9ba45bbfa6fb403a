"""A page allocator for guest drivers.

Free space is a sorted list of extents ``(first_page, npages)``; allocation
is first-fit, freeing coalesces neighbours. It is what a guest kernel's page
allocator is to its drivers: virtqueue rings and I/O buffers come from here,
and the balloon driver takes pages out of it.
"""
from __future__ import annotations

import bisect
from typing import Callable

PAGE_SIZE = 4096


class OutOfGuestMemory(MemoryError):
    """No free run of pages is large enough."""


class PageAllocator:
    def __init__(self, base_gpa: int, size: int, page_size: int = PAGE_SIZE) -> None:
        if base_gpa % page_size or size % page_size:
            raise ValueError("allocator range must be page aligned")
        self.page_size = page_size
        self.base_gpa = base_gpa
        self.total_pages = size // page_size
        self._starts: list[int] = [0] if self.total_pages else []
        self._lengths: list[int] = [self.total_pages] if self.total_pages else []
        self.free_pages = self.total_pages
        # Called with the number of pages wanted when an allocation fails; a
        # handler that frees memory returns True (DEFLATE_ON_OOM hooks in here).
        self.oom_handlers: list[Callable[[int], bool]] = []
        # Called with (gpa, npages) after every allocation (free page reporting
        # uses it to forget that those pages were reported).
        self.alloc_listeners: list[Callable[[int, int], None]] = []

    def alloc_pages(self, npages: int) -> int:
        """Allocate ``npages`` contiguous pages; return the gpa of the first."""
        if npages <= 0:
            raise ValueError("npages must be positive")
        try:
            return self._alloc_pages(npages)
        except OutOfGuestMemory:
            for handler in list(self.oom_handlers):
                if handler(npages):
                    try:
                        return self._alloc_pages(npages)
                    except OutOfGuestMemory:
                        continue
            raise

    def alloc_range(self, gpa: int, npages: int) -> None:
        """Take exactly ``[gpa, +npages)``, which must be free (used to isolate pages)."""
        start = (gpa - self.base_gpa) // self.page_size
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._starts[i] + self._lengths[i] < start + npages or (gpa - self.base_gpa) % self.page_size:
            raise ValueError(f"range {gpa:#x}+{npages} pages is not free")
        s0, n0 = self._starts[i], self._lengths[i]
        pieces = []
        if start > s0:
            pieces.append((s0, start - s0))
        if start + npages < s0 + n0:
            pieces.append((start + npages, s0 + n0 - start - npages))
        self._starts[i:i + 1] = [p[0] for p in pieces]
        self._lengths[i:i + 1] = [p[1] for p in pieces]
        self.free_pages -= npages
        for listener in self.alloc_listeners:
            listener(gpa, npages)

    def _alloc_pages(self, npages: int) -> int:
        for i, length in enumerate(self._lengths):
            if length >= npages:
                start = self._starts[i]
                if length == npages:
                    del self._starts[i]
                    del self._lengths[i]
                else:
                    self._starts[i] = start + npages
                    self._lengths[i] = length - npages
                self.free_pages -= npages
                gpa = self.base_gpa + start * self.page_size
                for listener in self.alloc_listeners:
                    listener(gpa, npages)
                return gpa
        raise OutOfGuestMemory(f"no run of {npages} free pages ({self.free_pages} free in all)")

    def alloc(self, nbytes: int) -> int:
        """Allocate at least ``nbytes`` (page granular, page aligned)."""
        return self.alloc_pages(max(1, -(-nbytes // self.page_size)))

    def free_range(self, gpa: int, npages: int) -> None:
        if npages <= 0:
            raise ValueError(f"free of {npages} pages")
        start = (gpa - self.base_gpa) // self.page_size
        if (gpa - self.base_gpa) % self.page_size or start < 0 or start + npages > self.total_pages:
            raise ValueError(f"free of invalid range {gpa:#x}+{npages} pages")
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] < start + npages:
            raise ValueError(f"double free at {gpa:#x}")
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start:
            raise ValueError(f"double free at {gpa:#x}")
        merge_prev = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start
        merge_next = i < len(self._starts) and self._starts[i] == start + npages
        if merge_prev and merge_next:
            self._lengths[i - 1] += npages + self._lengths[i]
            del self._starts[i]
            del self._lengths[i]
        elif merge_prev:
            self._lengths[i - 1] += npages
        elif merge_next:
            self._starts[i] = start
            self._lengths[i] += npages
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, npages)
        self.free_pages += npages

    def extents(self) -> list[tuple[int, int]]:
        """Free extents as ``(gpa, npages)``: what free-page reporting walks."""
        return [(self.base_gpa + s * self.page_size, n) for s, n in zip(self._starts, self._lengths)]

    @property
    def largest_free_run(self) -> int:
        return max(self._lengths, default=0)
