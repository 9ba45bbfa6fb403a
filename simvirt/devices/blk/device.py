"""virtio-blk device logic (virtio 1.2, section 5.2), transport-agnostic.

Each chain is one request: a 16-byte device-readable header, data, and a
trailing device-writable status byte. The parse accepts any framing (the
header or status may share a descriptor with data), validates everything a
guest controls (segment counts and sizes against seg_max/size_max, sector
ranges against capacity, discard segments against their limits) and answers
OK, IOERR or UNSUPP. A chain with no writable byte for a status cannot be
answered; it is returned with length 0 and counted.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence

from simvirt import metrics
from simvirt.devices.base import VirtioDevice
from simvirt.devices.blk import spec as s
from simvirt.devices.blk.impair import BlkImpairer, make_impairer
from simvirt.devices.blk.storage import Storage
from simvirt.impair.settings import BlkSettings
from simvirt.impair.timer import Clock, TimerFactory
from simvirt.memory.guest import GuestAddressError
from simvirt.virtio.errors import ChainLayoutError, VirtqueueError
from simvirt.virtio.queue import Queue
from simvirt.virtio.spec import VIRTIO_ID_BLOCK, bit

log = logging.getLogger(__name__)

_UNPACK_HDR = s.OUTHDR.unpack_from
_UNPACK_SEG = s.DISCARD_SEG.unpack_from


class RequestError(Exception):
    """A request we answer with a non-OK status, counted under ``reason``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class BlkDevice(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "blk"
    max_queue_size = 1024

    def __init__(
        self,
        storage: Storage,
        *,
        serial: str = "simvirt",
        num_queues: int = 1,
        readonly: bool = False,
        seg_max: int = 254,
        size_max: int = 1 << 20,
        blk_size: int = 512,
        max_discard_sectors: int = 1 << 22,
        max_discard_seg: int = 32,
        vm: str = "standalone",
        label: Optional[str] = None,
    ) -> None:
        super().__init__(num_queues, vm=vm, device_label=label)
        self.storage = storage
        self.serial = serial.encode()[: s.VIRTIO_BLK_ID_BYTES]
        self.readonly = readonly or storage.readonly
        self.seg_max = seg_max
        self.size_max = size_max
        self.blk_size = blk_size
        self.capacity = storage.size // s.SECTOR_SIZE
        self.max_discard_sectors = min(max_discard_sectors, 0xFFFFFFFF)
        self.max_discard_seg = max_discard_seg
        self.writeback = 1
        self.batch = int(os.environ.get("SIMVIRT_BLK_BATCH", "16"))
        # Off only to measure what metrics cost (simvirt bench blk-metrics).
        self.count_metrics = True
        # Per request type: [requests, bytes] in this batch, folded into OpStats per batch.
        self._ops = {k: [0, 0] for k in s.OP_NAMES}
        self._op_stats = {k: metrics.OpStats(vm, self.label, name) for k, name in s.OP_NAMES.items()}
        metrics.declare_errors(vm, self.label, ["bad_address", "missing_status", "short_header", "out_of_range",
                                                "unsupported_request", "io_error", "chain_too_long"])
        # Set while an impairment is (see set_impairment): process_queue hands requests to it.
        self.impairer: Optional[BlkImpairer] = None
        self.impair_stats = metrics.ImpairStats(vm, self.label)

    # -- negotiation and config ------------------------------------------
    def device_features(self) -> int:
        f = super().device_features()
        f |= bit(s.VIRTIO_BLK_F_SIZE_MAX) | bit(s.VIRTIO_BLK_F_SEG_MAX) | bit(s.VIRTIO_BLK_F_BLK_SIZE)
        f |= bit(s.VIRTIO_BLK_F_TOPOLOGY) | bit(s.VIRTIO_BLK_F_FLUSH) | bit(s.VIRTIO_BLK_F_CONFIG_WCE)
        f |= bit(s.VIRTIO_BLK_F_MQ) | bit(s.VIRTIO_BLK_F_DISCARD) | bit(s.VIRTIO_BLK_F_WRITE_ZEROES)
        if self.readonly:
            f |= bit(s.VIRTIO_BLK_F_RO)
        return f

    def config(self) -> bytes:
        phys_exp = max(0, (self.blk_size // s.SECTOR_SIZE).bit_length() - 1)
        return s.CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            0, 0, 0,
            self.blk_size,
            phys_exp, 0, 1, 0,
            self.writeback,
            0,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            1,
            self.max_discard_sectors,
            self.max_discard_seg,
            1,
            0, 0, 0,
        )

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == s.CONFIG_WRITEBACK_OFFSET and len(data) == 1:
            self.writeback = 1 if data[0] else 0
            log.info("%s: write cache %s", self.label, "on (writeback)" if self.writeback else "off (writethrough)")
            return
        raise ValueError(f"config write at {offset} (+{len(data)}) is not allowed; only writeback is writable")

    def reset(self) -> None:
        super().reset()
        self.writeback = 1
        if self.impairer is not None:
            self.impairer.forget()  # the impairment itself stays: it is the device's, not the guest's

    def queue_stopped(self, index: int) -> None:
        if self.impairer is not None:
            self.impairer.queue_stopped(index)

    # -- impairment (simvirt.impair; the control socket's "impair" command) --------------------
    def set_impairment(self, settings: Optional[BlkSettings], *, clock: Optional[Clock] = None,
                       timers: Optional[TimerFactory] = None) -> None:
        """Replace the impairment; None or all-default settings clear it.

        Requests held by the previous one are re-admitted under the new limits
        (in their order), or, when clearing, served at once.
        """
        old = self.impairer
        new = make_impairer(self, settings, self.impair_stats, clock=clock, timers=timers)
        self.impairer = new
        self.impair_stats.holder = new  # the held count is read from what the impairer holds
        if old is not None:
            if new is None:
                old.release_all()
            else:
                new.adopt(old)

    def impair_info(self) -> dict[str, Any]:
        st = self.impair_stats
        imp = self.impairer
        return {
            "impair": imp.settings.as_dict() if imp is not None else {},
            "delayed": st.delayed,
            "throttled": st.throttled,
            "failed": st.failed,
            "held": st.held,
            "requests": {name: self._op_stats[k].requests for k, name in s.OP_NAMES.items()},
        }

    # -- data path --------------------------------------------------------
    def process_queue(self, index: int, queue: Queue, stats: metrics.QueueStats) -> None:
        impairer = self.impairer
        if impairer is not None:  # the one check the unimpaired hot path pays
            impairer.process(index, queue, stats)
            return
        # Bounded batches: completing (and interrupting) every few chains lets a
        # polling driver refill the ring while we work, instead of lock-step.
        heads = queue.pop_heads(self.batch)
        if heads:
            self.serve_heads(queue, stats, heads)

    def serve_heads(self, queue: Queue, stats: metrics.QueueStats, heads: list[int],
                    answered: Sequence[tuple[int, int]] = ()) -> None:
        """Serve requests popped off ``queue`` and return them in one used-ring update.

        The unimpaired path calls this for each batch it pops; an impairer,
        for each batch of held requests that falls due. ``answered``: (head,
        used length) of requests already answered without being served
        (injected errors), returned in the same update, ahead of ``heads``.
        Interrupting the driver is the caller's (the server's run_queue, or
        the impairer's signal).
        """
        nchains = len(heads) + len(answered)
        if not nchains:
            return
        t0 = time.perf_counter()
        mem = queue.mem
        # Fast path: a single RAM region (our own driver; QEMU with <3G guests)
        # and the canonical 3-descriptor request [header][data][status].
        if len(mem.regions) == 1:
            region = mem.regions[0]
            base, rsize, ram = region.gpa, region.size, region.view
        else:
            base, rsize, ram = 0, -1, None
        used = list(answered)
        ndesc = 0
        ops = self._ops
        walk = queue.walk
        storage = self.storage
        size_max = self.size_max
        capacity = self.capacity
        table = queue._desc
        qsize = queue.size
        null_io = storage.null_io
        n_rd = b_rd = n_wr = b_wr = 0
        for head in heads:
            # Inline walk of the canonical direct chain: a 16-byte readable
            # header, one data buffer, a 1-byte writable status. Anything else
            # (indirect tables, more segments, odd framing) takes walk().
            if ram is not None and head < qsize:
                w0 = table[2 * head + 1]
                if w0 >> 32 & 0xFFFF == 1 and w0 & 0xFFFFFFFF == 16:
                    i1 = w0 >> 48
                    if i1 < qsize:
                        w1 = table[2 * i1 + 1]
                        f1 = w1 >> 32 & 0xFFFF
                        i2 = w1 >> 48
                        if f1 & 5 == 1 and i2 < qsize:
                            w2 = table[2 * i2 + 1]
                            if w2 >> 32 & 0xFFFF == 2 and w2 & 0xFFFFFFFF == 1:
                                h = table[2 * head] - base
                                d = table[2 * i1] - base
                                st = table[2 * i2] - base
                                l1 = w1 & 0xFFFFFFFF
                                if 0 <= h and h + 16 <= rsize and 0 <= st < rsize and 0 <= d and d + l1 <= rsize:
                                    rtype, _, sector = _UNPACK_HDR(ram, h)
                                    if ((rtype == 0 and f1 & 2) or (rtype == 1 and not f1 & 2 and not self.readonly)) and \
                                            0 < l1 <= size_max and not l1 & 511 and sector + (l1 >> 9) <= capacity:
                                        ndesc += 3
                                        try:
                                            if null_io:
                                                pass
                                            elif rtype == 0:
                                                storage.read(sector << 9, (ram[d:d + l1],))
                                            else:
                                                storage.write(sector << 9, (ram[d:d + l1],))
                                                if not self.writeback:
                                                    storage.flush()
                                            ram[st] = 0
                                        except OSError as e:
                                            self._error("io_error", f"{s.OP_NAMES[rtype]} at sector {sector}: {e}")
                                            ram[st] = s.VIRTIO_BLK_S_IOERR
                                            used.append((head, 1))
                                            continue
                                        if rtype == 0:
                                            n_rd += 1
                                            b_rd += l1
                                            used.append((head, l1 + 1))
                                        else:
                                            n_wr += 1
                                            b_wr += l1
                                            used.append((head, 1))
                                        continue
            try:
                descs = walk(head)
            except VirtqueueError as e:
                self._error(e.reason, f"chain {head}: {e}")
                used.append((head, self._fail_unwalkable(queue, head)))
                continue
            ndesc += len(descs)
            used.append((head, self._process_general(head, descs, mem.translate)))
        queue.add_used_many(used)
        if n_rd:
            ops[0][0] += n_rd
            ops[0][1] += b_rd
        if n_wr:
            ops[1][0] += n_wr
            ops[1][1] += b_wr
        stats.chains += nchains
        stats.descriptors += ndesc
        if self.count_metrics:
            self._flush_op_stats(time.perf_counter() - t0, nchains)

    @staticmethod
    def _fail_unwalkable(queue: Queue, head: int) -> int:
        """Put IOERR in the status byte of a malformed chain if we can find it.

        A guest must never read a stale "OK" from a request we refused.
        """
        last = queue.last_descriptor(head)
        if last is None or not last[2] & 2 or not last[1]:
            return 0
        try:
            queue.mem.translate(last[0] + last[1] - 1, 1)[0] = s.VIRTIO_BLK_S_IOERR
        except GuestAddressError:
            return 0
        return 1

    def _process_general(self, head: int, descs: list[tuple[int, int, int]], translate) -> int:
        """Any framing, every check; returns the used length."""
        try:
            rd = []
            wr = []
            for addr, length, flags in descs:
                if flags & 2:
                    wr.append(translate(addr, length))
                elif wr:
                    raise ChainLayoutError("device-readable descriptor after a writable one", "readable_after_writable")
                else:
                    rd.append(translate(addr, length))
        except GuestAddressError as e:
            self._error("bad_address", str(e))
            status = self._status_view(descs, translate)
            if status is not None:
                status[0] = s.VIRTIO_BLK_S_IOERR
                return 1
            return 0
        except ChainLayoutError as e:
            self._error(e.reason, str(e))
            status = self._status_view(descs, translate)  # only ever the chain's final byte
            if status is not None:
                status[0] = s.VIRTIO_BLK_S_IOERR
                return 1
            return 0
        # Status: the last byte of the last writable buffer.
        if not wr or not len(wr[-1]):
            self._error("missing_status", f"chain {head} has no writable status byte")
            return 0
        last = wr[-1]
        status_view = last[-1:]
        if len(last) > 1:
            wr[-1] = last[:-1]
        else:
            wr.pop()
        # Header: the first 16 readable bytes.
        hdr = _gather(rd, 16)
        if hdr is None:
            self._error("short_header", f"chain {head}: header shorter than 16 bytes")
            status_view[0] = s.VIRTIO_BLK_S_IOERR
            return 1
        rtype, _, sector = _UNPACK_HDR(hdr)
        try:
            written = self._serve(rtype, sector, rd, wr)
            status_view[0] = s.VIRTIO_BLK_S_OK
            op = self._ops.get(rtype)
            if op is not None:
                op[0] += 1
                op[1] += written if rtype != s.VIRTIO_BLK_T_OUT else sum(len(b) for b in rd)
        except RequestError as e:
            self._error(e.reason, str(e))
            status_view[0] = e.status
            written = 0
        except OSError as e:
            self._error("io_error", f"{s.OP_NAMES.get(rtype, rtype)} at sector {sector}: {e}")
            status_view[0] = s.VIRTIO_BLK_S_IOERR
            written = 0
        return written + 1

    def _flush_op_stats(self, elapsed: float, nchains: int) -> None:
        per = elapsed / nchains
        for rtype, op in self._ops.items():
            n = op[0]
            if n:
                st = self._op_stats[rtype]
                st.requests += n
                st.bytes += op[1]
                st.service.observe(per, n)
                op[0] = op[1] = 0

    @staticmethod
    def _status_view(descs: list, translate) -> Optional[memoryview]:
        """The status byte of a chain whose data part failed to translate, if reachable."""
        if descs and descs[-1][2] & 2 and descs[-1][1]:
            addr, length, _ = descs[-1]
            try:
                return translate(addr + length - 1, 1)
            except GuestAddressError:
                return None
        return None

    def _error(self, reason: str, message: str) -> None:
        log.warning("%s: %s", self.label, message)
        metrics.count_error(self.vm, self.label, reason)

    def _check_rw(self, sector: int, bufs: list[memoryview]) -> int:
        if len(bufs) > self.seg_max:
            raise RequestError(s.VIRTIO_BLK_S_IOERR, "seg_max", f"{len(bufs)} data segments > seg_max {self.seg_max}")
        total = 0
        for b in bufs:
            n = len(b)
            if n > self.size_max:
                raise RequestError(s.VIRTIO_BLK_S_IOERR, "size_max", f"segment of {n} bytes > size_max {self.size_max}")
            total += n
        if total % s.SECTOR_SIZE:
            raise RequestError(s.VIRTIO_BLK_S_IOERR, "unaligned_length", f"data length {total} is not a multiple of 512")
        if sector + total // s.SECTOR_SIZE > self.capacity:
            raise RequestError(s.VIRTIO_BLK_S_IOERR, "out_of_range",
                               f"sectors [{sector}, +{total // s.SECTOR_SIZE}) beyond capacity {self.capacity}")
        return total

    def _serve(self, rtype: int, sector: int, rd: list[memoryview], wr: list[memoryview]) -> int:
        """Execute one request; return bytes written into the chain (status excluded)."""
        if rtype == s.VIRTIO_BLK_T_IN:
            if rd:
                raise RequestError(s.VIRTIO_BLK_S_IOERR, "bad_layout", "read request with device-readable data")
            total = self._check_rw(sector, wr)
            self.storage.read(sector * s.SECTOR_SIZE, wr)
            return total
        if rtype == s.VIRTIO_BLK_T_OUT:
            if self.readonly:
                raise RequestError(s.VIRTIO_BLK_S_IOERR, "read_only", "write to a read-only device")
            if wr:
                raise RequestError(s.VIRTIO_BLK_S_IOERR, "bad_layout", "write request with device-writable data")
            self._check_rw(sector, rd)
            self.storage.write(sector * s.SECTOR_SIZE, rd)
            if not self.writeback:
                self.storage.flush()
            return 0
        if rtype == s.VIRTIO_BLK_T_FLUSH:
            self.storage.flush()
            return 0
        if rtype == s.VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(s.VIRTIO_BLK_ID_BYTES, b"\0")
            done = 0
            for b in wr:
                n = min(len(b), len(ident) - done)
                b[:n] = ident[done:done + n]
                done += n
                if done == len(ident):
                    break
            return done
        if rtype in (s.VIRTIO_BLK_T_DISCARD, s.VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_or_zero(rtype, rd)
        raise RequestError(s.VIRTIO_BLK_S_UNSUPP, "unsupported_request", f"request type {rtype} is not supported")

    def _discard_or_zero(self, rtype: int, rd: list[memoryview]) -> int:
        discard = rtype == s.VIRTIO_BLK_T_DISCARD
        if self.readonly:
            raise RequestError(s.VIRTIO_BLK_S_IOERR, "read_only", "discard/write-zeroes on a read-only device")
        data = b"".join(rd)
        if not data or len(data) % s.DISCARD_SEG.size:
            raise RequestError(s.VIRTIO_BLK_S_IOERR, "bad_discard", f"discard/write-zeroes payload of {len(data)} bytes")
        nseg = len(data) // s.DISCARD_SEG.size
        if nseg > self.max_discard_seg:
            raise RequestError(s.VIRTIO_BLK_S_IOERR, "bad_discard", f"{nseg} segments > max {self.max_discard_seg}")
        segs = [_UNPACK_SEG(data, i * s.DISCARD_SEG.size) for i in range(nseg)]
        for sector, num, flags in segs:
            if flags & ~s.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                raise RequestError(s.VIRTIO_BLK_S_UNSUPP, "bad_discard_flags", f"segment flags {flags:#x}")
            if num > self.max_discard_sectors:
                raise RequestError(s.VIRTIO_BLK_S_IOERR, "bad_discard", f"segment of {num} sectors > max {self.max_discard_sectors}")
            if sector + num > self.capacity:
                raise RequestError(s.VIRTIO_BLK_S_IOERR, "out_of_range", f"discard [{sector}, +{num}) beyond capacity")
        for sector, num, flags in segs:
            off, length = sector * s.SECTOR_SIZE, num * s.SECTOR_SIZE
            if discard:
                self.storage.discard(off, length)
            else:
                self.storage.write_zeroes(off, length, unmap=bool(flags & s.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return 0


def _gather(bufs: list[memoryview], n: int) -> Optional[bytes]:
    """Take the first ``n`` bytes off a list of buffers (consuming them), or None if short."""
    out = bytearray()
    while bufs and len(out) < n:
        b = bufs[0]
        take = min(len(b), n - len(out))
        out += b[:take]
        if take == len(b):
            bufs.pop(0)
        else:
            bufs[0] = b[take:]
    return bytes(out) if len(out) == n else None
