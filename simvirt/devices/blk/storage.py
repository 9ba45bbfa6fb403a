"""Block storage backends: raw image file, anonymous memory, null.

Reads and writes take lists of memoryviews that point straight into guest
RAM, so a file backend moves data with one ``preadv``/``pwritev`` system
call per request and no intermediate copy.
"""
from __future__ import annotations

import mmap
import os
from typing import Sequence

from simvirt.memory.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate


_ZEROS = bytes(1 << 20)


class Storage:
    """A byte-addressed block store of fixed size."""

    kind = "storage"
    size: int
    readonly: bool = False
    # True when reads and writes are no-ops (null): the fast path skips the call.
    null_io: bool = False

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        raise NotImplementedError

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        """Drop the range; reads of it may return anything (we return zeros)."""
        self.write_zeroes(offset, length, unmap=True)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.kind} {self.size} bytes"


class FileStorage(Storage):
    kind = "file"

    def __init__(self, path: str, readonly: bool = False, size: int | None = None) -> None:
        self.path = path
        self.readonly = readonly
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if size is not None and not readonly:
            flags |= os.O_CREAT
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        if size is not None and not readonly and os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.size = os.fstat(self.fd).st_size
        self._can_punch = True

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        got = os.preadv(self.fd, bufs, offset)
        if got != want:
            self._finish(offset, bufs, got, want, write=False)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        got = os.pwritev(self.fd, bufs, offset)
        if got != want:
            self._finish(offset, bufs, got, want, write=True)

    def _finish(self, offset: int, bufs: Sequence[memoryview], done: int, want: int, write: bool) -> None:
        """Complete a short transfer one buffer at a time."""
        pos = 0
        for b in bufs:
            end = pos + len(b)
            if end > done:
                view = b[max(0, done - pos):]
                off = offset + max(done, pos)
                while len(view):
                    n = os.pwrite(self.fd, view, off) if write else os.preadv(self.fd, [view], off)
                    if n == 0:
                        raise OSError(5, "short read past end of image")
                    view = view[n:]
                    off += n
            pos = end

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if unmap else FALLOC_FL_ZERO_RANGE
        try:
            fallocate(self.fd, mode, offset, length)
            return
        except OSError:
            pass
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError:
            pass
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, memoryview(_ZEROS)[: min(len(_ZEROS), end - offset)], offset)
            offset += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        return f"file {self.path} ({self.size} bytes{', read-only' if self.readonly else ''})"


class MemoryStorage(Storage):
    """RAM disk in an anonymous mapping (pages appear on first write)."""

    kind = "memory"

    def __init__(self, size: int, readonly: bool = False) -> None:
        self.size = size
        self.readonly = readonly
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._mm)

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        v = self._view
        for b in bufs:
            n = len(b)
            b[:] = v[offset:offset + n]
            offset += n

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        v = self._view
        for b in bufs:
            n = len(b)
            v[offset:offset + n] = b
            offset += n

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        end = (offset + length) // page * page
        if unmap and end > start:
            self._zero(offset, start - offset)
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            self._zero(end, offset + length - end)
        else:
            self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZEROS))
            self._view[offset:offset + n] = _ZEROS[:n]
            offset += n
            length -= n

    def close(self) -> None:
        self._view.release()
        self._mm.close()


class NullStorage(Storage):
    """Like QEMU's null-co: reads leave the buffer untouched, writes vanish."""

    kind = "null"
    null_io = True

    def __init__(self, size: int, readonly: bool = False) -> None:
        self.size = size
        self.readonly = readonly

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        pass

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        pass
