"""Guest RAM: shared-memory regions, address translation, page allocation."""
from simvirt.memory.guest import GuestAddressError, GuestMemory, MemoryRegion
from simvirt.memory.alloc import OutOfGuestMemory, PageAllocator, PAGE_SIZE

__all__ = [
    "GuestAddressError",
    "GuestMemory",
    "MemoryRegion",
    "OutOfGuestMemory",
    "PageAllocator",
    "PAGE_SIZE",
]
