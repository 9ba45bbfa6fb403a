"""PageAllocator: first fit, coalescing frees, double-free detection, exhaustion."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from simvirt.memory import OutOfGuestMemory, PageAllocator

P = 4096
BASE = 0x10000


@pytest.fixture
def a() -> PageAllocator:
    return PageAllocator(BASE, 16 * P)


def test_construction_checks():
    with pytest.raises(ValueError):
        PageAllocator(100, 16 * P)
    with pytest.raises(ValueError):
        PageAllocator(0, 16 * P + 1)
    empty = PageAllocator(0, 0)
    assert empty.free_pages == 0 and empty.extents() == [] and empty.largest_free_run == 0
    with pytest.raises(OutOfGuestMemory):
        empty.alloc_pages(1)


def test_first_fit_and_alignment(a):
    assert a.alloc_pages(1) == BASE
    assert a.alloc_pages(3) == BASE + P
    assert a.alloc(1) == BASE + 4 * P            # rounds up to one page
    assert a.alloc(P + 1) == BASE + 5 * P        # two pages
    assert a.alloc(0) == BASE + 7 * P            # at least one page
    assert a.free_pages == 16 - 8
    assert a.extents() == [(BASE + 8 * P, 8)]


def test_bad_requests(a):
    for n in (0, -1):
        with pytest.raises(ValueError):
            a.alloc_pages(n)


def test_free_coalesces_both_sides(a):
    x = a.alloc_pages(2)
    y = a.alloc_pages(2)
    z = a.alloc_pages(2)
    a.alloc_pages(10)  # the rest
    assert a.extents() == []
    a.free_range(x, 2)
    a.free_range(z, 2)
    assert a.extents() == [(x, 2), (z, 2)]
    a.free_range(y, 2)  # merges with both neighbours
    assert a.extents() == [(x, 6)]
    assert a.largest_free_run == 6 and a.free_pages == 6


def test_free_merges_with_next_only_and_prev_only(a):
    pages = [a.alloc_pages(1) for _ in range(16)]
    a.free_range(pages[5], 1)
    a.free_range(pages[4], 1)  # merges with the following extent
    assert a.extents() == [(pages[4], 2)]
    a.free_range(pages[6], 1)  # merges with the preceding extent
    assert a.extents() == [(pages[4], 3)]
    a.free_range(pages[0], 1)
    assert a.extents() == [(pages[0], 1), (pages[4], 3)]


def test_first_fit_reuses_holes(a):
    x = a.alloc_pages(4)
    a.alloc_pages(4)
    a.free_range(x, 4)
    assert a.alloc_pages(2) == x          # first hole that fits
    assert a.alloc_pages(4) == BASE + 8 * P  # hole of 2 left is too small
    assert a.alloc_pages(2) == x + 2 * P


@pytest.mark.parametrize("gpa_off,npages", [
    (0, 1),        # exactly an already-free page
    (2 * P, 4),    # overlaps the start of a free extent
    (5 * P, 1),    # inside a free extent
    (7 * P, 2),    # overlaps the end of a free extent
])
def test_double_free_detected(a, gpa_off, npages):
    a.alloc_pages(16)
    a.free_range(BASE, 1)
    a.free_range(BASE + 4 * P, 4)  # free: [0,1) and [4,8)
    before = (a.extents(), a.free_pages)
    with pytest.raises(ValueError, match="double free"):
        a.free_range(BASE + gpa_off, npages)
    assert (a.extents(), a.free_pages) == before  # state untouched


@pytest.mark.parametrize("gpa,npages", [
    (BASE - P, 1),            # below the range
    (BASE + 15 * P, 2),       # runs past the end
    (BASE + 1, 1),            # not page aligned
    (BASE + 16 * P, 1),       # first page after the range
])
def test_free_of_invalid_range(a, gpa, npages):
    a.alloc_pages(16)
    with pytest.raises(ValueError):
        a.free_range(gpa, npages)
    assert a.free_pages == 0


def test_out_of_memory_with_fragmentation(a):
    pages = [a.alloc_pages(1) for _ in range(16)]
    for p in pages[::2]:
        a.free_range(p, 1)
    assert a.free_pages == 8 and a.largest_free_run == 1
    with pytest.raises(OutOfGuestMemory) as ei:
        a.alloc_pages(2)  # 8 pages free, but no two contiguous
    assert isinstance(ei.value, MemoryError)
    assert a.free_pages == 8
    with pytest.raises(OutOfGuestMemory):
        PageAllocator(0, 4 * P).alloc(5 * P)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "range"]), st.integers(1, 6), st.integers(0, 1000)),
                max_size=60))
def test_random_alloc_free_against_page_model(ops):
    """Random alloc/alloc_range/free sequences: no page is handed out twice, free lists stay canonical."""
    total = 32
    a = PageAllocator(BASE, total * P)
    used: dict[int, int] = {}  # gpa -> npages
    for op, n, pick in ops:
        if op == "range":
            first = pick % total
            busy_now = set()
            for g, m in used.items():
                busy_now.update(range((g - BASE) // P, (g - BASE) // P + m))
            want_free = first + n <= total and not busy_now & set(range(first, first + n))
            gpa = BASE + first * P
            if want_free:
                a.alloc_range(gpa, n)
                used[gpa] = n
            else:
                with pytest.raises(ValueError):
                    a.alloc_range(gpa, n)
        elif op == "alloc" or not used:
            try:
                gpa = a.alloc_pages(n)
            except OutOfGuestMemory:
                assert a.largest_free_run < n
                continue
            assert (gpa - BASE) % P == 0 and BASE <= gpa and gpa + n * P <= BASE + total * P
            for g, m in used.items():
                assert gpa + n * P <= g or g + m * P <= gpa, "overlapping allocations"
            used[gpa] = n
        else:
            gpa = sorted(used)[pick % len(used)]
            a.free_range(gpa, used.pop(gpa))
            with pytest.raises(ValueError):
                a.free_range(gpa, 1)  # immediately freeing again is a double free
        # Model: free pages are exactly those not in use, as maximal sorted extents.
        busy = set()
        for g, m in used.items():
            busy.update(range((g - BASE) // P, (g - BASE) // P + m))
        assert a.free_pages == total - len(busy)
        exts = a.extents()
        assert exts == sorted(exts)
        covered = set()
        for g, m in exts:
            assert m > 0
            covered.update(range((g - BASE) // P, (g - BASE) // P + m))
        assert covered == set(range(total)) - busy
        for (g1, m1), (g2, _) in zip(exts, exts[1:]):
            assert g1 + m1 * P < g2, "adjacent free extents were not coalesced"
    for gpa, n in list(used.items()):
        a.free_range(gpa, n)
    assert a.extents() == [(BASE, total)]


@pytest.mark.parametrize("npages", [0, -1, -4])
def test_free_of_non_positive_page_count_rejected(a, npages):
    """alloc_pages() refuses n <= 0; free_range() must too, or its bookkeeping breaks."""
    x = a.alloc_pages(4)
    a.alloc_pages(12)
    before = (a.extents(), a.free_pages)
    with pytest.raises(ValueError):
        a.free_range(x, npages)
    assert (a.extents(), a.free_pages) == before


def test_alloc_range_and_listeners(a):
    seen = []
    a.alloc_listeners.append(lambda gpa, n: seen.append((gpa, n)))
    a.alloc_range(BASE + 4 * P, 2)
    assert a.extents() == [(BASE, 4), (BASE + 6 * P, 10)]
    assert a.alloc_pages(5) == BASE + 6 * P  # first fit skips the hole of 4
    assert seen == [(BASE + 4 * P, 2), (BASE + 6 * P, 5)]
    with pytest.raises(ValueError):
        a.alloc_range(BASE + 4 * P, 1)  # taken
    with pytest.raises(ValueError):
        a.alloc_range(BASE + 3 * P, 2)  # straddles a taken page
    with pytest.raises(ValueError):
        a.alloc_range(BASE + 1, 1)  # unaligned


def test_oom_handlers_get_a_chance(a):
    x = a.alloc_pages(16)
    calls = []

    def refuse(n):
        calls.append(("refuse", n))
        return False

    def release(n):
        calls.append(("release", n))
        a.free_range(x, 4)
        return True

    a.oom_handlers += [refuse, release]
    assert a.alloc_pages(3) == x
    assert calls == [("refuse", 3), ("release", 3)]
    a.oom_handlers[:] = [refuse]
    with pytest.raises(OutOfGuestMemory):
        a.alloc_pages(4)
