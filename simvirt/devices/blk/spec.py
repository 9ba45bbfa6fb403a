"""virtio-blk constants and layouts (virtio 1.2, section 5.2)."""
from __future__ import annotations

import struct

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

FEATURE_NAMES = {
    VIRTIO_BLK_F_SIZE_MAX: "VIRTIO_BLK_F_SIZE_MAX",
    VIRTIO_BLK_F_SEG_MAX: "VIRTIO_BLK_F_SEG_MAX",
    VIRTIO_BLK_F_GEOMETRY: "VIRTIO_BLK_F_GEOMETRY",
    VIRTIO_BLK_F_RO: "VIRTIO_BLK_F_RO",
    VIRTIO_BLK_F_BLK_SIZE: "VIRTIO_BLK_F_BLK_SIZE",
    VIRTIO_BLK_F_FLUSH: "VIRTIO_BLK_F_FLUSH",
    VIRTIO_BLK_F_TOPOLOGY: "VIRTIO_BLK_F_TOPOLOGY",
    VIRTIO_BLK_F_CONFIG_WCE: "VIRTIO_BLK_F_CONFIG_WCE",
    VIRTIO_BLK_F_MQ: "VIRTIO_BLK_F_MQ",
    VIRTIO_BLK_F_DISCARD: "VIRTIO_BLK_F_DISCARD",
    VIRTIO_BLK_F_WRITE_ZEROES: "VIRTIO_BLK_F_WRITE_ZEROES",
}

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

OP_NAMES = {
    VIRTIO_BLK_T_IN: "read",
    VIRTIO_BLK_T_OUT: "write",
    VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_GET_ID: "get_id",
    VIRTIO_BLK_T_DISCARD: "discard",
    VIRTIO_BLK_T_WRITE_ZEROES: "write_zeroes",
}

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512

OUTHDR = struct.Struct("<IIQ")  # type, reserved, sector
DISCARD_SEG = struct.Struct("<QII")  # sector, num_sectors, flags

# struct virtio_blk_config up to and including the secure-erase fields.
CONFIG = struct.Struct(
    "<Q"  # 0 capacity
    "I"  # 8 size_max
    "I"  # 12 seg_max
    "HBB"  # 16 geometry: cylinders, heads, sectors
    "I"  # 20 blk_size
    "BBHI"  # 24 topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "B"  # 32 writeback
    "B"  # 33 unused0
    "H"  # 34 num_queues
    "I"  # 36 max_discard_sectors
    "I"  # 40 max_discard_seg
    "I"  # 44 discard_sector_alignment
    "I"  # 48 max_write_zeroes_sectors
    "I"  # 52 max_write_zeroes_seg
    "B"  # 56 write_zeroes_may_unmap
    "3x"  # 57 unused1
    "I"  # 60 max_secure_erase_sectors
    "I"  # 64 max_secure_erase_seg
    "I"  # 68 secure_erase_sector_alignment
)
CONFIG_WRITEBACK_OFFSET = 32
# The driver reads through unused1 (60 bytes): libvhost-user backends refuse
# reads longer than their own struct, and older ones stop there.
CONFIG_DRIVER_READ = 60
assert CONFIG.size == 72
