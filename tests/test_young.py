"""The accessed (young) bit, PG_referenced and pagemap's PM_MMAP_EXCLUSIVE on the simulator.

kernel-semantics.md §1.2: the MMU sets the young bit of the PTE or PMD that translates every
load and store (x86: entries made from vm_page_prot are young from the start, the zero page's
and the huge zero PMD's too); fork maps the child's entries old and leaves the parent's alone;
MADV_COLD clears the young bits, MADV_PAGEOUT does not; both clear PG_referenced, as MADV_FREE
does.  Reclaim's folio_check_references() clears the young bits it finds and marks the folio
PG_referenced; smaps ``Referenced`` and khugepaged's referenced check read "young entry or
PG_referenced".  pagemap's PM_MMAP_EXCLUSIVE is the precise page mapcount == 1 (with CONFIG_PAGE_MAPCOUNT).
tests/test_realkernel_young.py runs the visible part of this on the running kernel too.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import NR, RW, THP_RAM, aligned_region, page_addrs, small_region, thp_region
from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_COLD, MADV_FREE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_PAGEOUT, PAGE_SIZE, PROT_READ,
    Kernel,
)
from thpcow.kernel import huge_memory as hm
from thpcow.kernel.folio import PG_REFERENCED
from thpcow.kernel.khugepaged import CollapseControl, ScanResult, collapse_scan_pmd
from thpcow.kernel.mm import PMD_LEAF, PMD_TABLE, _PAGE_ACCESSED
from thpcow.kernel.task_mmu import KPF_REFERENCED, PM_FILE, PM_MMAP_EXCLUSIVE, PM_PRESENT, kpageflags
from thpcow.lab import procfs

MiB = 1 << 20


def pte_young(p, a: int, n: int) -> np.ndarray:
    """Young bit of the PTEs of pages [a, a + n pages) (all under one PTE table)."""
    pt = p.mm.pt
    s = pt.slot_of[a // HPAGE_PMD_SIZE]
    assert pt.pmd_kind[s] == PMD_TABLE
    i = (a % HPAGE_PMD_SIZE) // PAGE_SIZE
    return (pt.pte_flags[pt.pmd_row[s], i: i + n] & _PAGE_ACCESSED).astype(bool)


def pmd_young(p, a: int) -> bool:
    pt = p.mm.pt
    s = pt.slot_of[a // HPAGE_PMD_SIZE]
    assert pt.pmd_kind[s] == PMD_LEAF
    return bool(pt.pmd_flags[s] & _PAGE_ACCESSED)


def folio_of(p, a: int) -> int:
    """The folio id mapped at ``a``."""
    from thpcow.kernel.access import resolve_pfns
    pfn = int(resolve_pfns(p.kernel, p.mm, np.array([a // PAGE_SIZE]))[0])
    return int(p.kernel.mem.folio[pfn])


def referenced(k: Kernel, fid: int) -> bool:
    return bool(k.folios.flags[fid] & PG_REFERENCED)


# -- loads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["read_many", "read"])
def test_loads_make_the_ptes_they_go_through_young(how):
    """A load through a present PTE sets its young bit (not only a fault does), page by page."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = small_region(p, 16, token=3)
    p.madvise(a, 16 * PAGE_SIZE, MADV_COLD)
    assert not pte_young(p, a, 16).any() and p.smaps_fields(a)["Referenced"] == 0
    if how == "read_many":
        assert (p.read_many(page_addrs(a, 3, first=5)[::-1]) == 3).all()
    else:
        assert (p.read(a + 5 * PAGE_SIZE + 100, 3 * PAGE_SIZE - 200) == 3).all()
    assert np.flatnonzero(pte_young(p, a, 16)).tolist() == [5, 6, 7]
    assert p.smaps_fields(a)["Referenced"] == 12


def test_a_load_makes_the_whole_pmd_young():
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = thp_region(p, HPAGE_PMD_SIZE)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_COLD)
    assert not pmd_young(p, a) and p.smaps_fields(a)["Referenced"] == 0
    p.read(a + 77 * PAGE_SIZE)
    assert pmd_young(p, a) and p.smaps_fields(a)["Referenced"] == 2048
    assert procfs.parse_smaps_rollup(p.smaps_rollup())["Referenced"] == 2048


def test_read_faults_map_the_zero_page_and_the_huge_zero_pmd_young():
    """The faulting loads end young: do_anonymous_page() and set_huge_zero_folio() build the
    entries from vm_page_prot, which has _PAGE_ACCESSED on x86 (and the MMU sets it anyway);
    a load batch that mixes mapped pages and faults leaves every page young."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    z = aligned_region(p, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    assert (p.read(z, HPAGE_PMD_SIZE) == 0).all()
    assert pmd_young(p, z)
    a = small_region(p, 8, token=4)
    p.madvise(a, 8 * PAGE_SIZE, MADV_COLD)
    b = p.mmap(8 * PAGE_SIZE)
    p.madvise(b, 8 * PAGE_SIZE, MADV_NOHUGEPAGE)
    got = p.read_many(np.concatenate((page_addrs(b, 4), page_addrs(a, 8), page_addrs(b, 4, first=4))))
    assert (got[4:12] == 4).all() and (got[:4] == 0).all() and (got[12:] == 0).all()
    assert pte_young(p, a, 8).all() and pte_young(p, b, 8).all()


# -- fork -------------------------------------------------------------------------------------------------
def test_fork_maps_the_zero_page_and_the_huge_zero_pmd_old_in_the_child_only():
    """__copy_present_ptes() applies pte_mkold() to every PTE it copies, the zero page's too;
    copy_huge_pmd() ends with pmd_mkold() for the huge zero PMD as well."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    z = aligned_region(p, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    p.read(z)
    a = p.mmap(2 * PAGE_SIZE)
    p.madvise(a, 2 * PAGE_SIZE, MADV_NOHUGEPAGE)
    p.write(a, 8, 3)                                      # the VMA gets its anon_vma
    p.read(a + PAGE_SIZE)                                 # the zero page
    c = p.fork()
    assert pmd_young(p, z) and not pmd_young(c, z)
    assert pte_young(p, a, 2).all() and not pte_young(c, a, 2).any()
    c.read(a, 2 * PAGE_SIZE)
    c.read(z)
    assert pte_young(c, a, 2).all() and pmd_young(c, z)


# -- madvise ----------------------------------------------------------------------------------------------
def test_madv_pageout_leaves_the_young_bits_of_what_it_cannot_reclaim():
    """madvise_cold_or_pageout_pte_range() clears young bits only for MADV_COLD; MADV_PAGEOUT
    hands the folios to reclaim_pages(), which ignores references.  Without swap the folios
    stay, young (the running kernel: Referenced stays 2048 kB after MADV_PAGEOUT); the THP is
    split on the way (no swap for it: AnonHugePages 0) and its PTEs inherit the PMD's young bit."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    t = thp_region(p, HPAGE_PMD_SIZE)
    s = small_region(p, 8)
    p.madvise(t, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    p.madvise(s, 8 * PAGE_SIZE, MADV_PAGEOUT)
    assert p.smaps_fields(t)["AnonHugePages"] == 0
    assert pte_young(p, t, HPAGE_PMD_SIZE // PAGE_SIZE).all() and pte_young(p, s, 8).all()
    assert p.smaps_fields(t)["Referenced"] == 2048 and p.smaps_fields(s)["Referenced"] == 32


@pytest.mark.parametrize("advice", [MADV_COLD, MADV_PAGEOUT, MADV_FREE])
def test_madvise_clears_pg_referenced(advice):
    """MADV_COLD and MADV_PAGEOUT call folio_clear_referenced(); MADV_FREE's lru_lazyfree()
    clears it too (PG_referenced set here as reclaim's aging would set it)."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    t = thp_region(p, HPAGE_PMD_SIZE)
    s = small_region(p, 4)
    fids = [folio_of(p, t)] + [folio_of(p, a) for a in page_addrs(s, 4).tolist()]
    k.folios.flags[fids] |= PG_REFERENCED
    p.madvise(t, HPAGE_PMD_SIZE, advice)
    p.madvise(s, 4 * PAGE_SIZE, advice)
    assert not any(referenced(k, f) for f in fids)


def test_madv_cold_leaves_folios_mapped_by_another_mm_alone():
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    t = thp_region(p, HPAGE_PMD_SIZE)
    c = p.fork()
    k.folios.flags[folio_of(p, t)] |= PG_REFERENCED
    p.madvise(t, HPAGE_PMD_SIZE, MADV_COLD)
    assert pmd_young(p, t) and referenced(k, folio_of(p, t))
    c.exit()
    p.madvise(t, HPAGE_PMD_SIZE, MADV_COLD)
    assert not pmd_young(p, t) and not referenced(k, folio_of(p, t))


# -- reclaim ---------------------------------------------------------------------------------------------
def test_reclaim_marks_the_young_folios_it_keeps_referenced():
    """folio_check_references(): a young folio has its young bits cleared, is marked
    PG_referenced and kept; an old one is reclaimed whatever PG_referenced said.  smaps counts
    the kept pages as Referenced through PG_referenced (their PTEs are old), kpageflags shows
    KPF_REFERENCED."""
    k = Kernel(ram=THP_RAM, check=True, swap=64 * MiB)
    p = k.spawn()
    n = 64
    a = small_region(p, n, token=5)
    k.reclaim(1)
    pm = p.pagemap(a, n)
    resident = (pm & np.uint64(PM_PRESENT)) != 0
    assert 0 < int(resident.sum()) < n, "some pages were swapped at the second look, some kept"
    assert not pte_young(p, a, n).any()
    kept = [folio_of(p, int(x)) for x in page_addrs(a, n)[resident]]
    assert all(referenced(k, f) for f in kept)
    assert p.smaps_fields(a)["Referenced"] == 4 * int(resident.sum())
    pfns = (pm[resident] & np.uint64((1 << 55) - 1)).astype(np.int64)
    assert (kpageflags(k, pfns) >> np.uint64(KPF_REFERENCED) & np.uint64(1)).all()
    # The next look: old PTEs, so reclaimed although PG_referenced was set.
    k.reclaim(n)
    assert p.smaps_fields(a)["Swap"] == 4 * n
    assert (p.read(a, n * PAGE_SIZE) == 5).all()


def test_reclaim_without_swap_keeps_a_lazyfree_folio_that_was_read():
    """A clean MADV_FREE'd folio is discarded only when folio_check_references() finds no young
    mapping: a load after MADV_FREE makes it young, so the first look keeps it (marked
    PG_referenced) and a later one may drop it."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    n = 8
    a = small_region(p, n, token=6)
    p.madvise(a, n * PAGE_SIZE, MADV_FREE)
    p.read_many(page_addrs(a, 4))                       # pages 0-3 accessed again
    before = k.vmstat_snapshot()["pglazyfreed"]
    k.reclaim(n)
    assert k.vmstat_snapshot()["pglazyfreed"] - before == 4
    assert (p.read_many(page_addrs(a, 4)) == 6).all()
    assert (p.read_many(page_addrs(a, 4, first=4)) == 0).all()


def test_a_split_copies_pg_referenced_to_every_new_folio():
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    t = thp_region(p, HPAGE_PMD_SIZE)
    fid = folio_of(p, t)
    k.folios.flags[fid] |= PG_REFERENCED
    assert hm.split_folio(k, fid) == 0
    assert all(referenced(k, folio_of(p, int(x))) for x in page_addrs(t, NR))


# -- khugepaged's referenced check ----------------------------------------------------------------------
def pte_mapped_block(k: Kernel):
    """A 2 MiB block of 512 exclusive 4 KiB pages in a VM_HUGEPAGE VMA, all old and unreferenced."""
    p = k.spawn()
    a = aligned_region(p, HPAGE_PMD_SIZE, MADV_NOHUGEPAGE)
    p.write_many(page_addrs(a, NR), 1)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_COLD)
    return p, a


def scan(p, a: int, khugepaged: bool) -> ScanResult:
    return collapse_scan_pmd(p.kernel, p.mm, p.mm.find_vma(a), a, CollapseControl(is_khugepaged=khugepaged))


def test_khugepaged_needs_a_young_pte_or_a_referenced_folio():
    """hpage_collapse_scan_pmd(): khugepaged (not MADV_COLLAPSE) gives up on a block with no
    referenced page; a page counts when its PTE is young or its folio is PG_referenced."""
    k = Kernel(ram=THP_RAM, check=True)
    p, a = pte_mapped_block(k)
    assert scan(p, a, khugepaged=True) == ScanResult.SCAN_LACK_REFERENCED_PAGE
    assert scan(p, a, khugepaged=False) == ScanResult.SCAN_SUCCEED
    k.folios.flags[folio_of(p, a + 9 * PAGE_SIZE)] |= PG_REFERENCED      # as reclaim's aging marks it
    assert scan(p, a, khugepaged=True) == ScanResult.SCAN_SUCCEED
    p.madvise(a, HPAGE_PMD_SIZE, MADV_COLD)
    assert scan(p, a, khugepaged=True) == ScanResult.SCAN_LACK_REFERENCED_PAGE
    p.read(a + 300 * PAGE_SIZE)                                          # one load: one young PTE
    assert scan(p, a, khugepaged=True) == ScanResult.SCAN_SUCCEED


# -- pagemap ----------------------------------------------------------------------------------------------
def excl(p, a: int, n: int = NR) -> list[int]:
    return np.flatnonzero(p.pagemap(a, n) & np.uint64(PM_MMAP_EXCLUSIVE)).tolist()


def test_pagemap_exclusive_is_the_precise_page_mapcount():
    """CONFIG_PAGE_MAPCOUNT: PM_MMAP_EXCLUSIVE iff PTE mapcount + entire mapcount == 1, page by
    page; a PMD leaf reports its head page for all 512."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = thp_region(p, 3 * HPAGE_PMD_SIZE)
    b, c = a + HPAGE_PMD_SIZE, a + 2 * HPAGE_PMD_SIZE
    p.mprotect(c + PAGE_SIZE, PAGE_SIZE, PROT_READ)       # PTE-map the third THP
    p.mprotect(c + PAGE_SIZE, PAGE_SIZE, RW)
    assert excl(p, a, 3 * NR) == list(range(3 * NR))
    ch = p.fork()
    assert excl(p, a, 3 * NR) == [] and excl(ch, a, 3 * NR) == []
    ch.write(a + PAGE_SIZE, 1, 9)                         # a tail page: the head stays shared
    ch.write(b, 1, 9)                                     # the head page
    ch.write(c + 5 * PAGE_SIZE, 1, 9)
    assert excl(p, a) == [] and excl(ch, a) == [1]
    assert excl(p, b) == list(range(NR)) and excl(ch, b) == [0]
    assert excl(p, c) == [5] and excl(ch, c) == [5]
    ch.exit()
    assert excl(p, a, 3 * NR) == list(range(3 * NR))


def test_pagemap_of_the_zero_pages():
    """The huge zero PMD: present and PM_FILE (not an anon folio), never exclusive (mapcount 0);
    a zero-page PTE has no normal page: present only."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    z = aligned_region(p, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    s = aligned_region(p, HPAGE_PMD_SIZE, MADV_NOHUGEPAGE)
    p.read(z, HPAGE_PMD_SIZE)
    p.read(s, HPAGE_PMD_SIZE)
    flags = np.uint64(PM_PRESENT | PM_FILE | PM_MMAP_EXCLUSIVE)
    assert (p.pagemap(z, NR) & flags == np.uint64(PM_PRESENT | PM_FILE)).all()
    assert (p.pagemap(s, NR) & flags == np.uint64(PM_PRESENT)).all()
