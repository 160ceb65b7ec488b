"""Folio splits of anonymous THPs on the simulated kernel, against the v6.18 rules.

Three rules, each measured on the running 6.18 kernel (a C probe: mmap + MADV_HUGEPAGE + stores,
then the operation; smaps of the region, /proc/self/pagemap with /proc/kpageflags, and
/proc/vmstat deltas, each scenario run twice):

- **Every anon split maps the zero-filled pages to the shared zero page.**  __folio_split()
  remaps a successfully split anon folio with TTU_USE_SHARED_ZEROPAGE, whoever asked for the
  split: remove_migration_pte() -> try_to_map_unused_to_zeropage() installs the zero page for
  each mapping of a page that holds only zeros (not for a hwpoisoned page, nor in a VM_LOCKED
  VMA), and MM_ANONPAGES drops.  Not only the underused-THP shrinker: MADV_PAGEOUT (the partial
  range split in madvise_cold_or_pageout_pte_range(), and reclaim's split when no swap space
  can be had), MADV_COLD, MADV_FREE, the deferred split of a partially mapped folio, memory
  failure, the split before migrating a THP that has no THP target.  Measured: a THP with its
  first 256 pages written, MADV_PAGEOUT of 128 pages -> Rss, Anonymous and Private_Dirty
  1024 kB, 256 pagemap entries on the zero page's pfn.
- **MADV_PAGEOUT without swap still splits.**  shrink_folio_list() calls folio_alloc_swap()
  whether or not a swap device exists; it fails, so a large folio is split
  (split_folio_to_list(): thp_split_page, split, and thp_split_pmd for a PMD mapping) and
  THP_SWPOUT_FALLBACK (PMD order) / swpout_fallback are counted; the pieces fail again and are
  kept.  Measured with no swap device: thp_split_pmd, thp_split_page, thp_swpout_fallback,
  split and swpout_fallback +1 each, AnonHugePages 0, the zero-filled half on the zero page.
- **The unmapping before a split queues a PTE-mapped folio as partially mapped.**
  unmap_folio() -> try_to_migrate() removes PTE mappings one page at a time; the first page
  that loses its last mapping while another page is still mapped (no PMD left) makes
  __folio_remove_rmap() call deferred_split_folio(folio, true): thp_deferred_split_page and
  split_deferred +1, once per folio (not when it is already flagged).  A PMD-mapped THP never
  counts (its PMD goes whole).  And madvise's PTE walk batches a large folio only within one
  page table (madvise_folio_pte_batch()): a THP mremap()ed to an address that is not 2 MiB
  aligned spans two tables, so MADV_PAGEOUT, MADV_COLD and MADV_FREE split it even when the
  range covers all of it.  Measured: mremap by +1 MiB (thp_split_pmd +1), then MADV_PAGEOUT,
  MADV_COLD or MADV_FREE of all 2 MiB -> thp_split_page +1, thp_deferred_split_page +1,
  split_deferred +1, no thp_swpout_fallback; munmap of all of it -> thp_deferred_split_page +1
  (the first table's batch leaves the second table's pages mapped); further partial munmaps of
  the same folio count nothing more.
"""

from __future__ import annotations

import numpy as np
import pytest

from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_COLD, MADV_FREE, MADV_HUGEPAGE, MADV_PAGEOUT, PAGE_SIZE, Kernel,
)
from thpcow.kernel.constants import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MREMAP_FIXED, MREMAP_MAYMOVE, PROT_NONE
from thpcow.kernel.page_alloc import ZERO_PFN
from thpcow.kernel.task_mmu import PM_PFRAME_MASK, PM_PRESENT, PM_SWAP

from conftest import NR, THP_RAM, MiB, page_addrs, vmstat_delta

HALF = NR // 2
SWAP = 64 << 20


# -- helpers -------------------------------------------------------------------------------------
def half_written_thp(k: Kernel):
    """A process with one PMD THP whose first half holds tokens 1..256, the rest zeros: (p, a, expected)."""
    p = k.spawn()
    a = p.mmap(HPAGE_PMD_SIZE)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    expected = np.zeros(NR, dtype=np.int64)
    expected[:HALF] = np.arange(1, HALF + 1)
    p.write_many(page_addrs(a, HALF), expected[:HALF])
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    return p, a, expected


def on_zero_page(p, a: int, n: int) -> np.ndarray:
    """Bool per page: present and mapping the shared zero page's pfn."""
    pm = p.pagemap(a, n)
    return ((pm & np.uint64(PM_PRESENT)) != 0) & ((pm & np.uint64(PM_PFRAME_MASK)) == np.uint64(ZERO_PFN))


def assert_reads(p, a: int, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(p.read(a, len(expected) * PAGE_SIZE), expected)


def mthp(k: Kernel, item: str) -> int:
    return k.vmstat.mthp_stat(9, item)


def spanning_thp(k: Kernel):
    """A fully written PMD THP mremap()ed to 1 MiB past a 2 MiB boundary: PTE-mapped, spanning
    two page tables.  Returns (p, new address, tokens)."""
    p = k.spawn()
    raw = p.mmap(8 * HPAGE_PMD_SIZE, prot=PROT_NONE)
    base = (raw + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
    a = p.mmap(HPAGE_PMD_SIZE, addr=base, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    toks = np.arange(1, NR + 1, dtype=np.int64)
    p.write_many(page_addrs(a, NR), toks)
    v0 = k.vmstat_snapshot()
    b = p.mremap(a, HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, base + 4 * HPAGE_PMD_SIZE + MiB)
    d = vmstat_delta(k, v0)
    assert d["thp_split_pmd"] == 1 and d["thp_deferred_split_page"] == 0
    assert p.smaps_fields(b)["AnonHugePages"] == 0 and p.smaps_fields(b)["Rss"] == 2048
    return p, b, toks


# ==================================================================================================
# 1. Every anon split maps the zero-filled pages to the shared zero page
# ==================================================================================================
def _split_by_pageout_of_part(k, p, a):
    p.madvise(a, HALF // 2 * PAGE_SIZE, MADV_PAGEOUT)


def _split_by_cold_of_part(k, p, a):
    p.madvise(a, HALF // 2 * PAGE_SIZE, MADV_COLD)


def _split_by_free_of_one_page(k, p, a):
    p.madvise(a + (NR - 1) * PAGE_SIZE, PAGE_SIZE, MADV_FREE)


def _split_by_pageout_without_swap(k, p, a):
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)


def _split_by_deferred_split_shrinker(k, p, a):
    p.munmap(a + (NR - 1) * PAGE_SIZE, PAGE_SIZE)        # partially mapped: queued
    k.reclaim(1)                                         # shrink_slab(): deferred_split_scan()


def _split_by_migration_without_thp_target(k, p, a):
    k.mem.fragment(1.0, np.random.default_rng(0))
    pfn = int(p.pagemap(a, 1)[0] & np.uint64(PM_PFRAME_MASK))
    k.migrate(pfn)


SPLITS = {
    "MADV_PAGEOUT of part": (_split_by_pageout_of_part, NR),
    "MADV_COLD of part": (_split_by_cold_of_part, NR),
    "MADV_FREE of one page": (_split_by_free_of_one_page, NR),
    "MADV_PAGEOUT without swap": (_split_by_pageout_without_swap, NR),
    "deferred split shrinker": (_split_by_deferred_split_shrinker, NR - 1),
    "migration without a THP target": (_split_by_migration_without_thp_target, NR),
}


@pytest.mark.parametrize("how", list(SPLITS))
def test_every_anon_split_maps_zero_filled_pages_to_the_zero_page(how):
    """remap_page(TTU_USE_SHARED_ZEROPAGE) after every successful anon __folio_split(): the 256
    zero-filled pages leave Rss, Anonymous and Private_Dirty and map the zero page; the written
    half keeps its pages; every page still reads what it held."""
    k = Kernel(ram=THP_RAM, check=True)
    p, a, expected = half_written_thp(k)
    split, mapped = SPLITS[how]
    v0 = k.vmstat_snapshot()
    free = k.mem.nr_free
    split(k, p, a)
    d = vmstat_delta(k, v0)
    assert d["thp_split_page"] == 1
    s = p.smaps_fields(a)
    assert s["AnonHugePages"] == 0
    assert s["Rss"] == s["Anonymous"] == 4 * HALF
    assert s["Private_Dirty"] == 4 * HALF
    assert p.status()["RssAnon"] == 4 * HALF
    zero = on_zero_page(p, a, mapped)
    assert zero.sum() == mapped - HALF and not zero[:HALF].any()
    if how != "migration without a THP target":           # (fragment() took frames itself)
        assert k.mem.nr_free - free == mapped - HALF or how == "deferred split shrinker"
    assert_reads(p, a, expected[:mapped])
    p.write(a + (NR - 2) * PAGE_SIZE, 1, 99)               # a store to a zero-page entry allocates
    expected[NR - 2] = 99
    assert_reads(p, a, expected[:mapped])


def test_memory_failure_split_maps_zero_pages_but_never_the_poisoned_one():
    """memory_failure() marks the page PageHWPoison before splitting; try_to_map_unused_to_zeropage()
    skips a poisoned page, so a zero-filled poisoned page is unmapped to a hwpoison entry like
    any other, while the other zero-filled pages go to the zero page."""
    from thpcow.kernel.errors import HardwarePoison
    k = Kernel(ram=THP_RAM, check=True)
    p, a, expected = half_written_thp(k)
    victim = NR - 10                                        # a zero-filled page
    pfn = int(p.pagemap(a, NR)[victim] & np.uint64(PM_PFRAME_MASK))
    v0 = k.vmstat_snapshot()
    k.memory_failure(pfn)
    assert vmstat_delta(k, v0)["thp_split_page"] == 1
    zero = on_zero_page(p, a, NR)
    assert zero.sum() == HALF - 1 and not zero[victim] and not zero[:HALF].any()
    assert p.smaps_fields(a)["Rss"] == 4 * HALF
    with pytest.raises(HardwarePoison):
        p.read(a + victim * PAGE_SIZE)
    assert k.mem.reserved[pfn]


def test_a_split_remaps_zero_pages_in_every_mm_that_maps_them():
    """A THP shared with a child, PTE-mapped in the child (a COW) and PMD-mapped in the parent:
    memory failure splits it; each mapping of a zero-filled page, in either mm, goes to the zero
    page (MM_ANONPAGES drops in both)."""
    k = Kernel(ram=THP_RAM, check=True)
    p, a, expected = half_written_thp(k)
    c = p.fork()
    c.write(a, 1, 500)                                      # the child's PMD is split, page 0 copied
    written_pfn = int(p.pagemap(a + PAGE_SIZE, 1)[0] & np.uint64(PM_PFRAME_MASK))
    k.memory_failure(written_pfn)
    for proc in (p, c):
        zero = on_zero_page(proc, a, NR)
        assert zero.sum() == HALF and not zero[:HALF].any()
        assert proc.status()["RssAnon"] == 4 * (HALF - 1)    # page 1 is poisoned in both
    exp_c = expected.copy()
    exp_c[0] = 500
    assert_reads(c, a, exp_c[:1])
    assert_reads(c, a + 2 * PAGE_SIZE, exp_c[2:])
    assert_reads(p, a, expected[:1])
    assert_reads(p, a + 2 * PAGE_SIZE, expected[2:])


def test_underused_split_counts_and_remaps_through_the_one_split_path(k):
    """The underused-THP shrinker no longer has its own remap: split_folio() does it."""
    k.sysfs.write("khugepaged/max_ptes_none", "64")
    p, a, expected = half_written_thp(k)
    v0 = k.vmstat_snapshot()
    k.reclaim(1)
    d = vmstat_delta(k, v0)
    assert d["thp_underused_split_page"] == 1 and d["thp_split_page"] == 1
    assert on_zero_page(p, a, NR).sum() == HALF
    assert p.smaps_fields(a)["Rss"] == 4 * HALF
    assert_reads(p, a, expected)


# ==================================================================================================
# 2. MADV_PAGEOUT without a swap device
# ==================================================================================================
def test_pageout_of_a_pmd_thp_without_swap_splits_it_and_keeps_the_pieces():
    """shrink_folio_list(): folio_alloc_swap() fails (no swap device), the THP is split
    (split_folio_to_list(): thp_split_pmd, thp_split_page, split), THP_SWPOUT_FALLBACK and
    swpout_fallback are counted, and the 4 KiB pieces fail too and stay mapped.  As measured on
    6.18 (no swap): +1 for each of those counters, AnonHugePages 0, Rss 1024 kB, 256 zero pages."""
    k = Kernel(ram=THP_RAM, check=True)
    assert k.swap is None
    p, a, expected = half_written_thp(k)
    v0 = k.vmstat_snapshot()
    split0, fb0, defer0 = mthp(k, "split"), mthp(k, "swpout_fallback"), mthp(k, "split_deferred")
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert (d["thp_split_pmd"], d["thp_split_page"], d["thp_swpout_fallback"]) == (1, 1, 1)
    assert (d["thp_swpout"], d["pswpout"], d["thp_deferred_split_page"]) == (0, 0, 0)
    assert mthp(k, "split") - split0 == 1 and mthp(k, "swpout_fallback") - fb0 == 1
    assert mthp(k, "split_deferred") == defer0 and mthp(k, "nr_anon") == 0
    s = p.smaps_fields(a)
    assert s["AnonHugePages"] == 0 and s["Rss"] == 4 * HALF and s["Swap"] == 0
    pm = p.pagemap(a, NR)
    assert ((pm & np.uint64(PM_PRESENT)) != 0).all() and not ((pm & np.uint64(PM_SWAP)) != 0).any()
    assert on_zero_page(p, a, NR).sum() == HALF
    assert_reads(p, a, expected)


def test_pageout_of_a_pte_mapped_thp_without_swap_splits_it_in_reclaim():
    """A THP PTE-mapped in one table (mprotect() of one page and back): the batch covers it, so
    madvise hands it whole to reclaim, which splits it after folio_alloc_swap() fails:
    thp_split_page, thp_swpout_fallback, and thp_deferred_split_page (the split's unmapping
    takes the PTEs one by one); no thp_split_pmd.  Measured on 6.18 exactly so."""
    from thpcow.kernel.constants import PROT_READ, PROT_WRITE
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = p.mmap(HPAGE_PMD_SIZE)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    toks = np.arange(1, NR + 1, dtype=np.int64)
    p.write_many(page_addrs(a, NR), toks)
    p.mprotect(a, PAGE_SIZE, PROT_READ)
    p.mprotect(a, PAGE_SIZE, PROT_READ | PROT_WRITE)
    assert p.smaps_fields(a)["AnonHugePages"] == 0
    v0 = k.vmstat_snapshot()
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert (d["thp_split_pmd"], d["thp_split_page"], d["thp_swpout_fallback"], d["thp_deferred_split_page"]) == \
        (0, 1, 1, 1)
    assert mthp(k, "nr_anon_partially_mapped") == 0
    assert p.smaps_fields(a)["Rss"] == 2048
    assert_reads(p, a, toks)


def test_pageout_with_swap_still_swaps_a_thp_whole():
    """With a free swap cluster nothing changes: thp_swpout, no split."""
    k = Kernel(ram=THP_RAM, swap=SWAP, check=True)
    p, a, expected = half_written_thp(k)
    v0 = k.vmstat_snapshot()
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert (d["thp_swpout"], d["thp_split_page"], d["thp_swpout_fallback"]) == (1, 0, 0)
    assert p.smaps_fields(a)["Swap"] == 2048
    assert_reads(p, a, expected)


# ==================================================================================================
# 3. Deferred split accounting of a PTE-mapped THP spanning two page tables
# ==================================================================================================
@pytest.mark.parametrize("advice", [MADV_PAGEOUT, MADV_COLD, MADV_FREE], ids=["PAGEOUT", "COLD", "FREE"])
def test_madvise_of_a_whole_thp_spanning_two_tables_splits_it_and_counts_a_deferred_split(advice):
    """madvise_folio_pte_batch() stops at the end of the first table: 256 < 512, so the folio is
    split (not taken whole, even by MADV_PAGEOUT); the split's unmapping queues it as partially
    mapped first (thp_deferred_split_page +1, split_deferred +1), then the split takes it off
    the queue.  No thp_swpout_fallback: reclaim only sees 4 KiB pieces."""
    k = Kernel(ram=THP_RAM, check=True)
    p, b, toks = spanning_thp(k)
    v0 = k.vmstat_snapshot()
    defer0, split0 = mthp(k, "split_deferred"), mthp(k, "split")
    p.madvise(b, HPAGE_PMD_SIZE, advice)
    d = vmstat_delta(k, v0)
    assert (d["thp_split_page"], d["thp_deferred_split_page"], d["thp_swpout_fallback"], d["thp_split_pmd"]) == \
        (1, 1, 0, 0)
    assert mthp(k, "split_deferred") - defer0 == 1 and mthp(k, "split") - split0 == 1
    assert mthp(k, "nr_anon_partially_mapped") == 0 and mthp(k, "nr_anon") == 0
    assert p.smaps_fields(b)["Rss"] == 2048
    assert_reads(p, b, toks)


def test_munmap_of_a_whole_thp_spanning_two_tables_counts_one_deferred_split():
    """zap_pte_range() removes the rmap a table at a time: after the first table's batch the
    second table's pages are still mapped, so __folio_remove_rmap() queues the folio (+1) just
    before the second batch frees it."""
    k = Kernel(ram=THP_RAM, check=True)
    p, b, _ = spanning_thp(k)
    v0 = k.vmstat_snapshot()
    p.munmap(b, HPAGE_PMD_SIZE)
    d = vmstat_delta(k, v0)
    assert d["thp_deferred_split_page"] == 1 and d["thp_split_page"] == 0
    assert mthp(k, "nr_anon_partially_mapped") == 0 and not k.deferred


def test_an_already_partially_mapped_folio_is_counted_once():
    """deferred_split_folio(true) counts only when it sets PG_partially_mapped: later partial
    unmaps, and the split that finally comes (here MADV_PAGEOUT), count nothing more."""
    k = Kernel(ram=THP_RAM, check=True)
    p, b, toks = spanning_thp(k)
    v0 = k.vmstat_snapshot()
    p.munmap(b, PAGE_SIZE)
    assert vmstat_delta(k, v0)["thp_deferred_split_page"] == 1
    assert mthp(k, "nr_anon_partially_mapped") == 1
    p.munmap(b + PAGE_SIZE, PAGE_SIZE)
    p.munmap(b + 300 * PAGE_SIZE, PAGE_SIZE)
    p.madvise(b + 2 * PAGE_SIZE, 200 * PAGE_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert d["thp_deferred_split_page"] == 1 and d["thp_split_page"] == 1
    assert mthp(k, "nr_anon_partially_mapped") == 0
    assert_reads(p, b + 2 * PAGE_SIZE, toks[2:300])


def test_splitting_a_pmd_mapped_thp_counts_no_deferred_split():
    """A PMD mapping is removed whole by the split's unmapping: the folio is never seen partially
    mapped (measured: MADV_PAGEOUT of part of a PMD THP counts no thp_deferred_split_page)."""
    k = Kernel(ram=THP_RAM, check=True)
    p, a, _ = half_written_thp(k)
    v0 = k.vmstat_snapshot()
    p.madvise(a, HALF // 2 * PAGE_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert d["thp_split_page"] == 1 and d["thp_deferred_split_page"] == 0
