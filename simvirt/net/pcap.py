"""Classic libpcap capture files: an encoder, a buffered file writer and a reader.

Format (pcap-savefile(5), and IETF draft-ietf-opsawg-pcap): a 24-byte
global header -- magic, version 2.4, thiszone, sigfigs, snaplen, link type
-- then per packet a 16-byte record header (seconds, sub-second part,
captured length, original length) and the captured bytes.  The magic says
both the byte order and the timestamp unit: 0xa1b2c3d4 for microseconds,
0xa1b23c4d for nanoseconds.  We write little-endian with LINKTYPE_ETHERNET
(1), which tcpdump, tshark and scapy all read.

:class:`PcapEncoder` is sans-IO (frames in, bytes out).  :class:`PcapWriter`
wraps a binary file and batches records, flushing with one ``write`` per
``flush_bytes`` (default 1 MiB) instead of one syscall per frame, so
capturing a device's traffic costs little more than a ``bytes`` join.
"""
from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple, Union

Buffer = Union[bytes, bytearray, memoryview]

LINKTYPE_ETHERNET = 1
MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
VERSION_MAJOR = 2
VERSION_MINOR = 4
DEFAULT_SNAPLEN = 262144  # tcpdump's default

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
GLOBAL_HEADER_LEN = _GLOBAL.size  # 24
RECORD_HEADER_LEN = _RECORD.size  # 16


class PcapError(ValueError):
    """Not a pcap file, or a truncated/corrupt one."""


class PcapHeader(NamedTuple):
    byteorder: str  # "<" or ">"
    nanoseconds: bool
    version: tuple[int, int]
    snaplen: int
    linktype: int


class PcapRecord(NamedTuple):
    ts_ns: int  # timestamp in nanoseconds since the epoch (microsecond files: multiple of 1000)
    orig_len: int  # length on the wire; > len(data) when truncated to snaplen
    data: bytes


class PcapEncoder:
    """Turn frames into pcap bytes; no I/O."""

    def __init__(self, *, nanoseconds: bool = False, snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> None:
        if snaplen <= 0:
            raise ValueError("snaplen must be positive")
        self.nanoseconds = nanoseconds
        self.snaplen = snaplen
        self.linktype = linktype

    def global_header(self) -> bytes:
        magic = MAGIC_NS if self.nanoseconds else MAGIC_US
        return _GLOBAL.pack(magic, VERSION_MAJOR, VERSION_MINOR, 0, 0, self.snaplen, self.linktype)

    def record_parts(self, frame: Buffer, ts_ns: int) -> tuple[bytes, bytes]:
        """(record header, captured bytes): the frame is copied once, truncated to ``snaplen``.

        Copying matters: callers pass memoryviews of guest buffers that the
        guest reuses as soon as the descriptor is returned.
        """
        sec, sub = divmod(ts_ns, 1_000_000_000)
        if not self.nanoseconds:
            sub //= 1000
        n = len(frame)
        cap = min(n, self.snaplen)
        return _RECORD.pack(sec & 0xFFFFFFFF, sub, cap, n), bytes(frame[:cap])

    def record(self, frame: Buffer, ts_ns: int) -> bytes:
        """Record header plus the frame, truncated to ``snaplen``."""
        return b"".join(self.record_parts(frame, ts_ns))


class PcapWriter:
    """Append frames to a pcap file object, flushing in large batches.

    Use as a context manager or call :meth:`close`.  ``clock`` supplies
    timestamps (ns) for frames written without one; tests pass a fake.
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        *,
        nanoseconds: bool = False,
        snaplen: int = DEFAULT_SNAPLEN,
        linktype: int = LINKTYPE_ETHERNET,
        flush_bytes: int = 1 << 20,
        clock: Callable[[], int] = time.time_ns,
        close_file: bool = False,
    ) -> None:
        self._file = fileobj
        self._enc = PcapEncoder(nanoseconds=nanoseconds, snaplen=snaplen, linktype=linktype)
        self._pending: list[bytes] = [self._enc.global_header()]
        self._pending_bytes = GLOBAL_HEADER_LEN
        self._flush_bytes = flush_bytes
        self._clock = clock
        self._close_file = close_file
        self.frames = 0
        self.bytes_written = 0
        self.closed = False

    @classmethod
    def open(cls, path: str, **kwargs: object) -> PcapWriter:
        """Create (truncate) ``path`` and write to it; the writer owns the file."""
        return cls(open(path, "wb"), close_file=True, **kwargs)  # type: ignore[arg-type]

    def write(self, frame: Buffer, ts_ns: int | None = None) -> None:
        if self.closed:
            raise ValueError("write to a closed PcapWriter")
        head, data = self._enc.record_parts(frame, self._clock() if ts_ns is None else ts_ns)
        self._pending.append(head)
        self._pending.append(data)
        self._pending_bytes += RECORD_HEADER_LEN + len(data)
        self.frames += 1
        if self._pending_bytes >= self._flush_bytes:
            self.flush()

    def write_many(self, frames: Iterable[Buffer], ts_ns: int | None = None) -> None:
        """Several frames sharing one timestamp (e.g. one device batch)."""
        ts = self._clock() if ts_ns is None else ts_ns
        for frame in frames:
            self.write(frame, ts)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._file.write(data)
            self.bytes_written += len(data)
            self._pending.clear()
            self._pending_bytes = 0
        self._file.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self._close_file:
            self._file.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pcap(data: Buffer) -> tuple[PcapHeader, list[PcapRecord]]:
    """Parse a whole capture held in memory (either byte order, µs or ns)."""
    header, records = _parse(memoryview(data))
    return header, list(records)


def iter_pcap(data: Buffer) -> Iterator[PcapRecord]:
    return _parse(memoryview(data))[1]


def _parse(mv: memoryview) -> tuple[PcapHeader, Iterator[PcapRecord]]:
    if len(mv) < GLOBAL_HEADER_LEN:
        raise PcapError("shorter than a pcap global header")
    for order in ("<", ">"):
        (magic,) = struct.unpack_from(order + "I", mv)
        if magic in (MAGIC_US, MAGIC_NS):
            break
    else:
        raise PcapError(f"bad pcap magic {bytes(mv[:4]).hex()}")
    _, major, minor, _, _, snaplen, linktype = struct.unpack_from(order + "IHHiIII", mv)
    header = PcapHeader(order, magic == MAGIC_NS, (major, minor), snaplen, linktype)
    rec = struct.Struct(order + "IIII")
    scale = 1 if header.nanoseconds else 1000

    def records() -> Iterator[PcapRecord]:
        pos = GLOBAL_HEADER_LEN
        end = len(mv)
        while pos < end:
            if end - pos < RECORD_HEADER_LEN:
                raise PcapError(f"truncated record header at offset {pos}")
            sec, sub, incl, orig = rec.unpack_from(mv, pos)
            pos += RECORD_HEADER_LEN
            if incl > end - pos:
                raise PcapError(f"record at offset {pos - RECORD_HEADER_LEN} claims {incl} bytes, {end - pos} left")
            yield PcapRecord(sec * 1_000_000_000 + sub * scale, orig, bytes(mv[pos : pos + incl]))
            pos += incl

    return header, records()
