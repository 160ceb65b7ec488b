"""Behaviour of the COW core that only mutation testing showed to be unchecked (docs/testing.md).

Each test names the kernel function whose behaviour it pins down; the mutants it kills
are listed in docs/testing.md.  They go through the public API (system calls, smaps,
pagemap, vmstat and the TLB flush log a machine model reads); where no system call can
set a state up (memory held by the rest of the system, an unshare fault from GUP) the
test says so.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import NR, RW, THP_RAM, page_addrs, small_region, thp_region, vmstat_delta
from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_COLLAPSE, MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_PAGEOUT, PAGE_SIZE,
    PROT_READ, Kernel,
)

MiB = 1 << 20
ADDRESS_SPACE_END = 1 << 47          # x86-64 4-level paging: the user address space


def exhaust_thp_blocks(k: Kernel) -> None:
    """Break every free 2 MiB block with an unmovable page: no order-9 block is left."""
    k.mem.fragment(1.0, np.random.default_rng(0))
    assert not k.mem.has_free_order(9)


def range_flushes(k: Kernel, pid: int) -> list[tuple[int, int]]:
    """The (start, end) range flushes recorded for ``pid``."""
    return [(e[1], e[2]) for e in k.tlb_flush_log if len(e) == 3 and e[0] == pid]


def page_flushes(k: Kernel, pid: int) -> list[int]:
    """The virtual page numbers of the single-page flushes recorded for ``pid``."""
    return [int(v) for e in k.tlb_flush_log if len(e) == 2 and e[0] == pid for v in e[1]]


# -- TLB flushes -------------------------------------------------------------------------------------------
def test_fork_flushes_the_parents_whole_address_space():
    """dup_mmap() ends with flush_tlb_mm(oldmm): the parent's PTEs were write-protected, so every
    translation of the parent is flushed (the child has none cached yet)."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    small_region(p, 4)
    k.tlb_flush_log = []
    c = p.fork()
    flushes = range_flushes(k, p.pid)
    assert len(flushes) == 1
    start, end = flushes[0]
    assert start == 0 and end >= ADDRESS_SPACE_END
    assert range_flushes(k, c.pid) == [] and page_flushes(k, c.pid) == []


def test_whole_pmd_cow_flushes_the_old_pmd_of_the_faulting_mm():
    """wp_huge_pmd_page_copy() (the series): pmdp_huge_clear_flush() of the 2 MiB it replaces,
    in the faulting mm only; the other mm keeps its translation of the old THP."""
    k = Kernel(ram=THP_RAM, check=True)
    k.sysfs.write("thp_cow", "always")
    p = k.spawn()
    a = thp_region(p, 4 << 20)
    c = p.fork()
    k.tlb_flush_log = []
    before = k.vmstat_snapshot()
    c.write(a + (2 << 20) + 5 * PAGE_SIZE, 8, 2)
    d = vmstat_delta(k, before)
    assert d["thp_split_pmd"] == 0 and d["thp_fault_alloc"] == 1
    assert range_flushes(k, c.pid) == [(a + (2 << 20), a + (4 << 20))]
    assert range_flushes(k, p.pid) == [] and page_flushes(k, p.pid) == []


def test_swapping_out_a_thp_flushes_each_page_at_its_address():
    """The reverse map of a new THP (map_anon_folio_pmd_nopf()) knows where each page is
    mapped: swap-out splits the PMD (one 2 MiB flush) and unmaps every page, flushing it at
    its own address (try_to_unmap_one())."""
    k = Kernel(ram=THP_RAM, check=True, swap=64 * MiB)
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=3)
    k.tlb_flush_log = []
    p.madvise(a, 2 << 20, MADV_PAGEOUT)
    assert p.smaps_fields(a)["Swap"] == 2048
    assert range_flushes(k, p.pid) == [(a, a + (2 << 20))]
    assert sorted(page_flushes(k, p.pid)) == list(range(a // PAGE_SIZE, a // PAGE_SIZE + NR))
    assert (p.read(a, 2 << 20) == 3).all()


# -- dirty and young bits: MADV_FREE'd (lazyfree) memory tells them apart -----------------------------
def lazyfree_thp_shared_with_a_child(k: Kernel):
    """A THP MADV_FREE'd whole (madvise_free_huge_pmd(): clean, old, lazyfree), then fork."""
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=3)
    p.madvise(a, 2 << 20, MADV_FREE)
    assert p.smaps_fields(a)["LazyFree"] == 2048 and p.smaps_fields(a)["AnonHugePages"] == 2048
    c = p.fork()
    assert c.smaps_fields(a)["LazyFree"] == 2048
    return p, c, a


def test_zapping_a_clean_pmd_leaves_the_thp_clean():
    """zap_huge_pmd(): a clean PMD does not dirty its folio, so the other mm's copy of a
    lazyfree THP stays lazily freeable after the child unmaps its own."""
    k = Kernel(ram=THP_RAM, check=True)
    p, c, a = lazyfree_thp_shared_with_a_child(k)
    c.munmap(a, 2 << 20)
    assert p.smaps_fields(a)["LazyFree"] == 2048
    assert p.smaps_fields(a)["Private_Dirty"] == 0


def test_whole_pmd_cow_of_a_clean_pmd_leaves_the_old_thp_clean():
    """wp_huge_pmd_page_copy() (the series): the child's clean PMD is cleared without dirtying
    the old folio, so the parent's copy of the lazyfree THP stays lazily freeable; the
    child's new THP is dirty."""
    k = Kernel(ram=THP_RAM, check=True)
    k.sysfs.write("thp_cow", "always")
    p, c, a = lazyfree_thp_shared_with_a_child(k)
    before = k.vmstat_snapshot()
    c.write(a, 8, 4)
    assert vmstat_delta(k, before)["thp_fault_alloc"] == 1
    assert p.smaps_fields(a)["LazyFree"] == 2048
    f = c.smaps_fields(a)
    assert f["LazyFree"] == 0 and f["AnonHugePages"] == 2048 and f["Private_Dirty"] == 2048
    assert (c.read(a + PAGE_SIZE, 4) == 3).all() and c.read(a)[0] == 4


def test_splitting_a_clean_pmd_leaves_the_thp_clean():
    """__split_huge_pmd_locked() moves the PMD's dirty bit to the folio only when it is set:
    the child's COW split of its clean PMD (upstream: split, copy 4 KiB) leaves the parent's
    lazyfree THP lazily freeable."""
    k = Kernel(ram=THP_RAM, check=True)
    p, c, a = lazyfree_thp_shared_with_a_child(k)
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 8, 4)
    assert vmstat_delta(k, before)["thp_split_pmd"] == 1
    assert p.smaps_fields(a)["LazyFree"] == 2048 and p.smaps_fields(a)["Private_Dirty"] == 0
    assert c.smaps_fields(a)["LazyFree"] == 2044


# -- folio ids are recycled ----------------------------------------------------------------------------------
def test_whole_pmd_cow_into_the_first_folio_id_recycled():
    """wp_huge_pmd_page_copy() (the series) takes whatever folio the allocator hands out: here
    the first folio ever made, freed just before the fault.  The copy is still a THP."""
    k = Kernel(ram=THP_RAM, check=True)
    k.sysfs.write("thp_cow", "always")
    p = k.spawn()
    b = small_region(p, 1)                       # the first folio of this kernel
    a = thp_region(p, 2 << 20, token=5)
    c = p.fork()
    c.munmap(b, PAGE_SIZE)
    p.munmap(b, PAGE_SIZE)                      # freed: its id is the next one handed out
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 8, 6)
    d = vmstat_delta(k, before)
    assert d["thp_fault_alloc"] == 1 and d["thp_split_pmd"] == 0
    assert c.smaps_fields(a)["AnonHugePages"] == 2048
    assert c.read(a + PAGE_SIZE)[0] == 6 and p.read(a + PAGE_SIZE)[0] == 5


# -- kernel builds: pre-5.8 --------------------------------------------------------------------------------
def _thp_then(k: Kernel, how: str):
    """A THP faulted with enabled=always in a VMA without MADV_HUGEPAGE, shared by fork, then
    THP switched off for that VMA in one of three ways."""
    k.sysfs.write("enabled", "always")
    p = k.spawn()
    a = p.mmap(2 << 20)
    p.write(a, 2 << 20, 3)
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    if how == "prctl-except-advised":
        from thpcow.kernel import PR_SET_THP_DISABLE
        from thpcow.kernel.constants import PR_THP_DISABLE_EXCEPT_ADVISED
        p.prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED)
    c = p.fork()
    if how == "enabled=never":
        k.sysfs.write("enabled", "never")
    elif how == "enabled=madvise":
        k.sysfs.write("enabled", "madvise")          # the VMA has no MADV_HUGEPAGE
    return p, c, a


@pytest.mark.parametrize("how", ["enabled=never", "enabled=madvise", "prctl-except-advised"])
def test_pre58_copies_small_pages_when_thp_is_off_for_the_vma(how):
    """Before v5.8 do_huge_pmd_wp_page() only allocated a THP for the copy when THP was enabled
    for the VMA (__transparent_hugepage_enabled(): sysfs, VM_NOHUGEPAGE, PR_SET_THP_DISABLE);
    otherwise do_huge_pmd_wp_page_fallback() copied the 512 pages into 4 KiB pages."""
    k = Kernel(ram=THP_RAM, check=True, build="pre-5.8")
    p, c, a = _thp_then(k, how)
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 8, 6)
    d = vmstat_delta(k, before)
    assert d["thp_fault_alloc"] == 0 and d["thp_fault_fallback"] == 1
    assert d["sim_cow_pages"] == NR and d["thp_split_pmd"] == 0
    assert c.smaps_fields(a)["AnonHugePages"] == 0 and p.smaps_fields(a)["AnonHugePages"] == 2048
    assert c.read(a + PAGE_SIZE)[0] == 6 and c.read(a)[0] == 3 and p.read(a + PAGE_SIZE)[0] == 3


def test_pre58_without_512_free_pages_splits_and_copies_one_page():
    """The pre-5.8 build's last resort: no order-9 block for a THP copy and fewer than 512 free
    pages for the small-page copy, so it splits the PMD as upstream does and copies 4 KiB."""
    k = Kernel(ram=THP_RAM, check=True, build="pre-5.8")
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=3)
    c = p.fork()
    exhaust_thp_blocks(k)
    assert k.mem.alloc_bulk(k.mem.nr_free - 300) is not None      # the rest of the system takes the rest
    assert k.mem.nr_free < NR
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 8, 6)
    d = vmstat_delta(k, before)
    assert d["thp_fault_fallback"] == 1 and d["thp_split_pmd"] == 1 and d["sim_cow_pages"] == 1
    assert c.smaps_fields(a)["AnonHugePages"] == 0 and p.smaps_fields(a)["AnonHugePages"] == 2048
    assert c.read(a + PAGE_SIZE)[0] == 6 and c.read(a)[0] == 3 and p.read(a + PAGE_SIZE)[0] == 3


# -- kernel builds: mthp-cow -------------------------------------------------------------------------------
def test_mthp_cow_copies_small_folios_one_page_at_a_time():
    """mthp-cow copies a block only out of a large folio: a 4 KiB folio is COWed 4 KiB."""
    k = Kernel(ram=THP_RAM, check=True, build="mthp-cow:order=4")
    p = k.spawn()
    a = small_region(p, 16, token=3)
    c = p.fork()
    before = k.vmstat_snapshot()
    c.write(a + 5 * PAGE_SIZE, 8, 6)
    d = vmstat_delta(k, before)
    assert d["sim_cow_pages"] == 1 and d["sim_cow_bytes"] == PAGE_SIZE
    assert k.vmstat.mthp_stat(4, "nr_anon") == 0
    assert list(c.read(a + 4 * PAGE_SIZE, 3 * PAGE_SIZE)) == [3, 6, 3]


def test_mthp_cow_order9_leaves_pte_mapped_thps_to_4k_copies():
    """mthp-cow:order=9 copies whole THPs at PMD level only; a PTE-mapped THP (split by a
    partial mprotect() that was undone, so one VMA maps all 512 pages) is COWed 4 KiB."""
    k = Kernel(ram=THP_RAM, check=True, build="mthp-cow:order=9")
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=3)
    p.mprotect(a + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    p.mprotect(a + PAGE_SIZE, PAGE_SIZE, RW)
    assert len(p.vmas()) == 1 and p.smaps_fields(a)["AnonHugePages"] == 0
    c = p.fork()
    before = k.vmstat_snapshot()
    c.write(a + 5 * PAGE_SIZE, 8, 6)
    d = vmstat_delta(k, before)
    assert d["sim_cow_bytes"] == PAGE_SIZE and d["thp_fault_alloc"] == 0
    assert list(c.read(a + 4 * PAGE_SIZE, 3 * PAGE_SIZE)) == [3, 6, 3]


# -- kernel builds: reservation and cow-density ----------------------------------------------------------------
def test_reservation_falls_back_once_its_pool_is_empty():
    """The reservation pool serves THP faults the buddy cannot; once it is empty a THP fault
    falls back to small pages as upstream does (thp_fault_fallback)."""
    k = Kernel(ram=THP_RAM, check=True, build="reservation:pool_mib=2")
    exhaust_thp_blocks(k)
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    before = k.vmstat_snapshot()
    p.write(a, 4 << 20, 5)
    d = vmstat_delta(k, before)
    assert d["thp_fault_alloc"] == 1 and d["thp_fault_fallback"] == 1
    assert p.smaps_fields(a)["AnonHugePages"] == 2048 and not k.build.pool
    assert (p.read(a, 4 << 20) == 5).all()


def _cow_density_child(k: Kernel):
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=1)
    return p, p.fork(), a


def test_cow_density_does_not_collapse_where_thp_is_off():
    """cow-density collapses a block only where a THP fault could map one
    (thp_vma_allowable_order()): not after MADV_NOHUGEPAGE."""
    k = Kernel(ram=THP_RAM, check=True, build="cow-density:threshold=4")
    p, c, a = _cow_density_child(k)
    c.madvise(a, 2 << 20, MADV_NOHUGEPAGE)
    for i in range(6):
        c.write(a + i * PAGE_SIZE, 8, 10 + i)
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 0
    assert c.smaps_fields(a)["AnonHugePages"] == 0
    assert list(c.read(a, 7 * PAGE_SIZE)) == [10, 11, 12, 13, 14, 15, 1]


def test_cow_density_does_not_collapse_a_block_the_vma_only_partly_covers():
    """cow-density collapses only a 2 MiB block that lies inside the VMA."""
    k = Kernel(ram=THP_RAM, check=True, build="cow-density:threshold=4")
    p, c, a = _cow_density_child(k)
    c.munmap(a + (2 << 20) - PAGE_SIZE, PAGE_SIZE)
    for i in range(6):
        c.write(a + i * PAGE_SIZE, 8, 10 + i)
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 0
    assert list(c.read(a, 7 * PAGE_SIZE)) == [10, 11, 12, 13, 14, 15, 1]


# -- the PMD bits of a new THP ------------------------------------------------------------------------------
def test_collapsed_thp_is_mapped_dirty_and_young():
    """map_anon_folio_pmd_nopf(), called by MADV_COLLAPSE with no store after it: the PMD is
    dirty and young (pmd_mkdirty(), and vm_page_prot has _PAGE_ACCESSED on x86), so smaps
    counts the THP as Private_Dirty and Referenced."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = p.mmap(2 << 20)
    p.write(a, 2 << 20, 3)                            # enabled=madvise: 4 KiB pages
    assert p.smaps_fields(a)["AnonHugePages"] == 0
    p.madvise(a, 2 << 20, MADV_COLLAPSE)
    f = p.smaps_fields(a)
    assert f["AnonHugePages"] == 2048
    assert f["Private_Dirty"] == 2048 and f["Referenced"] == 2048
    assert (p.read(a, 2 << 20) == 3).all()


def test_unshare_copy_of_a_thp_is_young_clean_and_read_only():
    """wp_huge_pmd_page_copy() for an unshare fault (the series, map_anon_folio_pmd_nopf() with
    cow): the new PMD is read-only and clean but young.  No system call makes an unshare
    fault (it comes from GUP), so the fault is made by hand as the kernel would."""
    from thpcow.kernel import huge_memory as hm
    from thpcow.kernel.memory import FAULT_FLAG_UNSHARE, VmFault
    k = Kernel(ram=THP_RAM, check=True)
    k.sysfs.write("thp_cow", "always")
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=3)
    c = p.fork()
    s = c.mm.pt.slot_of[a // HPAGE_PMD_SIZE]
    vmf = VmFault(c.mm, c.vmas()[0], a, FAULT_FLAG_UNSHARE, pmd=s, orig_pmd=int(c.mm.pt.pmd_flags[s]))
    assert hm.do_huge_pmd_wp_page(k, vmf) == 0
    k.check()
    f = c.smaps_fields(a)
    assert f["AnonHugePages"] == 2048 and f["Referenced"] == 2048 and f["Private_Dirty"] == 0
    before = k.vmstat_snapshot()
    c.write(a, 8, 5)                                  # the copy is exclusive: reused, no copy
    d = vmstat_delta(k, before)
    assert d["thp_fault_alloc"] == 0 and d["pgfault"] == 1
    assert c.read(a)[0] == 5 and p.read(a)[0] == 3


# -- zap does not move an anon PTE's dirty bit to the folio -----------------------------------------------
def _lazyfree_page_dirty_in_the_child_only(k: Kernel):
    """A page stored to after MADV_FREE (its PTE dirty again), shared by fork (the child's
    PTE keeps the dirty bit), then MADV_FREE'd again by the parent: the folio is not dirty
    (only PTEs were), so the parent's PTE is cleaned and only the child's stays dirty."""
    p = k.spawn()
    a = small_region(p, 1, token=3)
    p.madvise(a, PAGE_SIZE, MADV_FREE)
    p.write(a, 8, 4)
    c = p.fork()
    p.madvise(a, PAGE_SIZE, MADV_FREE)
    assert p.smaps_fields(a)["LazyFree"] == 4 and c.smaps_fields(a)["LazyFree"] == 0
    return p, c, a


@pytest.mark.parametrize("how", ["exit", "munmap", "dontneed"])
def test_zapping_an_anon_pte_does_not_dirty_the_folio(how):
    """zap_present_folio_ptes(): for an anon folio "we don't need up-to-date accessed/dirty
    bits": unlike a file folio, the zapped PTE's dirty bit is dropped, not moved to the
    folio.  So when the child's dirty mapping goes, the parent's clean mapping of the
    lazyfree page stays lazily freeable."""
    from thpcow.kernel import MADV_DONTNEED
    k = Kernel(ram=THP_RAM, check=True)
    p, c, a = _lazyfree_page_dirty_in_the_child_only(k)
    if how == "exit":
        c.exit()
    elif how == "munmap":
        c.munmap(a, PAGE_SIZE)
    else:
        c.madvise(a, PAGE_SIZE, MADV_DONTNEED)
    f = p.smaps_fields(a)
    assert f["LazyFree"] == 4 and f["Private_Dirty"] == 0


# -- fork's PTE copy and the 4 KiB COW ----------------------------------------------------------------------
def test_fork_makes_the_childs_ptes_old_and_keeps_them_dirty():
    """copy_present_ptes(): the child's PTEs are read-only and old (pte_mkold()); a private
    mapping keeps the dirty bit.  smaps: the child's pages are shared, dirty, not referenced."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = small_region(p, 8, token=3)
    c = p.fork()
    f = c.smaps_fields(a)
    assert f["Rss"] == 32 and f["Referenced"] == 0
    assert f["Shared_Dirty"] == 32 and f["Shared_Clean"] == 0
    assert p.smaps_fields(a)["Referenced"] == 32


def test_fork_copies_zero_page_ptes():
    """copy_present_ptes() copies a zero-page PTE as it is (no reference, no rss): in a VMA
    that has an anon_vma, the child sees the zero page mapped (pagemap present) and reads 0."""
    from thpcow.kernel.task_mmu import PM_PRESENT
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = p.mmap(2 * PAGE_SIZE)
    p.madvise(a, 2 * PAGE_SIZE, MADV_NOHUGEPAGE)
    p.write(a, 8, 3)                                          # the VMA gets its anon_vma
    assert p.read(a + PAGE_SIZE)[0] == 0                      # the zero page, mapped
    c = p.fork()
    pm = c.pagemap(a, 2)
    assert pm[0] & PM_PRESENT and pm[1] & PM_PRESENT
    assert c.status()["RssAnon"] == 4 and c.read(a + PAGE_SIZE)[0] == 0


def test_fork_counts_the_childs_swap_entries_in_every_table():
    """copy_nonpresent_pte(): MM_SWAPENTS += 1 per swap entry the child gets, summed over
    every PTE table copied."""
    k = Kernel(ram=THP_RAM, check=True, swap=64 * MiB)
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.madvise(a, 4 << 20, MADV_NOHUGEPAGE)
    p.write(a, 4 << 20, 3)
    p.madvise(a, 2 * PAGE_SIZE, MADV_PAGEOUT)                 # 2 pages of the first table
    p.madvise(a + (2 << 20), 3 * PAGE_SIZE, MADV_PAGEOUT)     # 3 of the second
    assert p.status()["VmSwap"] == 20
    c = p.fork()
    assert c.status()["VmSwap"] == 20
    assert (c.read(a, 3 * PAGE_SIZE) == 3).all()


def test_pte_cow_flushes_the_faulting_page_only():
    """wp_page_copy(): ptep_clear_flush() of the one page it remaps, in the faulting mm."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = small_region(p, 4, token=3)
    c = p.fork()
    k.tlb_flush_log = []
    c.write(a + 2 * PAGE_SIZE, 8, 4)
    assert page_flushes(k, c.pid) == [a // PAGE_SIZE + 2]
    assert range_flushes(k, c.pid) == [] and page_flushes(k, p.pid) == []


def test_zero_page_cow_prepares_the_anon_vma_of_the_faulted_vmas_only():
    """wp_page_copy() of zero pages: vmf_anon_prepare() gives the faulted VMAs an anon_vma.
    A VMA between them that was only read keeps none, so fork copies no page table of it:
    the child's pagemap shows its page not present."""
    from thpcow.kernel.task_mmu import PM_PRESENT
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = p.mmap(3 * PAGE_SIZE)
    p.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_NOHUGEPAGE)      # three VMAs: A | B | C
    assert len(p.vmas()) == 3
    assert (p.read(a, 3 * PAGE_SIZE) == 0).all()             # zero pages, no anon_vma anywhere
    p.write_many(page_addrs(a, 2, 0)[[0]].tolist() + [a + 2 * PAGE_SIZE], [5, 6])
    assert [bool(v.anon_vma) for v in p.vmas()] == [True, False, True]
    c = p.fork()
    pm = c.pagemap(a, 3)
    assert pm[0] & PM_PRESENT and not pm[1] & PM_PRESENT and pm[2] & PM_PRESENT
    assert list(c.read(a, 3 * PAGE_SIZE)) == [5, 0, 6]


def test_pte_cow_without_a_free_page_is_oom():
    """wp_page_copy() cannot allocate its page: VM_FAULT_OOM, nothing changes (the store is
    not done, both processes still share the page)."""
    from thpcow.kernel.errors import OutOfMemory
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = small_region(p, 2, token=3)
    c = p.fork()
    assert k.mem.alloc_bulk(k.mem.nr_free) is not None        # the rest of the system takes it all
    for store in (lambda: c.write(a, 8, 4), lambda: c.write_many([a, a + PAGE_SIZE], 4)):
        with pytest.raises(OutOfMemory):
            store()
        assert list(c.read(a, 2 * PAGE_SIZE)) == [3, 3] and c.smaps_fields(a)["Shared_Dirty"] == 8


def test_fork_keeps_vma_offsets_and_leaves_unfaulted_vmas_without_anon_vma():
    """dup_mmap(): vm_area_dup() copies vm_pgoff, and only a VMA with an anon_vma gets one
    (anon_vma_fork()).  In the parent a never-faulted VMA merges with its faulted neighbour
    once their flags match (the offsets run on, one anon_vma is set): /proc/PID/maps shows
    one mapping.  In the child it does not: the faulted VMA's anon_vma_chain also links the
    parent's anon_vma (vma_had_uncowed_parents()), and is_mergeable_anon_vma() refuses to
    give its anon_vma to a VMA without one (Linux 6.18 shows the two mappings too)."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = p.mmap(2 * PAGE_SIZE)
    p.mprotect(a + PAGE_SIZE, PAGE_SIZE, PROT_READ)          # two VMAs
    p.write(a, 8, 3)                                          # only the first is faulted
    c = p.fork()
    assert [(v.start - a, v.end - a, bool(v.anon_vma)) for v in c.vmas()] == [
        (0, PAGE_SIZE, True), (PAGE_SIZE, 2 * PAGE_SIZE, False)]
    assert [v.pgoff for v in c.vmas()] == [v.pgoff for v in p.vmas()]
    for proc, merged in ((c, False), (p, True)):
        proc.mprotect(a + PAGE_SIZE, PAGE_SIZE, RW)
        assert [(v.start - a, v.end - a) for v in proc.vmas()] == (
            [(0, 2 * PAGE_SIZE)] if merged else [(0, PAGE_SIZE), (PAGE_SIZE, 2 * PAGE_SIZE)])
    assert list(c.read(a, 2 * PAGE_SIZE)) == [3, 0]


def test_fork_keeps_the_offset_of_a_moved_vma():
    """dup_mmap() copies vm_pgoff: a VMA moved by mremap() keeps the page offset of where its
    pages came from, so it does not merge with a fresh neighbour whose offset does not run
    on from it, in the parent or in the child."""
    from thpcow.kernel import MAP_FIXED_NOREPLACE
    from thpcow.kernel.constants import MREMAP_FIXED, MREMAP_MAYMOVE
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    x = p.mmap(PAGE_SIZE)
    p.write(x, 8, 3)
    t = p.mmap(4 * PAGE_SIZE)
    p.munmap(t, 4 * PAGE_SIZE)
    assert p.mremap(x, PAGE_SIZE, PAGE_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, t) == t
    p.mmap(PAGE_SIZE, flags=0x22 | MAP_FIXED_NOREPLACE, addr=t + PAGE_SIZE)   # MAP_PRIVATE | MAP_ANONYMOUS
    c = p.fork()
    for proc in (c, p):
        proc.mprotect(t + PAGE_SIZE, PAGE_SIZE, PROT_READ)
        proc.mprotect(t + PAGE_SIZE, PAGE_SIZE, RW)           # a merge attempt with the moved VMA
        assert [(v.start - t, v.end - t) for v in proc.vmas()] == [(0, PAGE_SIZE), (PAGE_SIZE, 2 * PAGE_SIZE)]
    assert c.read(t)[0] == 3


# -- the page-table writers (kernel/pgtable.py) -------------------------------------------------------------
def test_madv_collapse_flushes_the_block_it_collapses():
    """pmdp_collapse_flush(): the PTE table under the block is detached with a flush of the
    whole 2 MiB at its address, in the collapsing mm only."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    a = p.mmap(4 << 20)
    a = (a + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
    p.madvise(a, 2 << 20, MADV_NOHUGEPAGE)
    for va in page_addrs(a, NR)[::8]:
        p.write(int(va), 8, 5)
    p.madvise(a, 2 << 20, MADV_HUGEPAGE)
    c = p.fork()
    k.tlb_flush_log = []
    p.madvise(a, 2 << 20, MADV_COLLAPSE)
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert (a, a + HPAGE_PMD_SIZE) in range_flushes(k, p.pid)
    assert range_flushes(k, c.pid) == []
    assert p.read(a)[0] == 5 and c.read(a)[0] == 5


def test_reclaim_gives_a_young_thp_a_second_chance_through_its_pmd():
    """folio_referenced() on a PMD-mapped THP: pmdp_test_and_clear_young() reports the
    parent's young PMD and clears only its young bit (the PMD stays read-only: the child
    shares the THP), so the first look keeps the THP and the second swaps it out."""
    k = Kernel(ram=THP_RAM, check=True, swap=64 * MiB)
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=7)
    c = p.fork()                                    # the child's PMD is old, the parent's young
    assert p.smaps_fields(a)["Referenced"] == 2048 and c.smaps_fields(a)["Referenced"] == 0
    before = k.vmstat_snapshot()
    k.reclaim(NR)
    d = vmstat_delta(k, before)
    assert d["pgscan_anon"] == 2, "young at the first look, old at the second"
    assert d["thp_swpout"] == 1 and d["pswpout"] == NR
    assert p.smaps_fields(a)["Swap"] == 2048 and c.smaps_fields(a)["Swap"] == 2048
    assert (p.read(a, 2 << 20) == 7).all() and (c.read(a, 2 << 20) == 7).all()


@pytest.mark.parametrize("writer", ["set_pte_at", "set_ptes", "set_ptes_scatter", "pte_update_flags", "clear_ptes",
                                    "free_pte_table", "set_pmd_at", "pmd_update_flags", "pmd_clear", "pmd_populate"])
def test_page_table_check_names_the_mm_of_a_bad_store(writer):
    """The writers pass their mm to page_table_check, whose report names it.  The bad stores
    are made by hand (a shared page made writable, an entry planted behind the writers'
    back): no system call makes one."""
    from thpcow.kernel import pgtable
    from thpcow.kernel.page_table_check import PageTableCheckError
    from thpcow.kernel.pgtable import PMD_LEAF, PTE_NEW_ANON, _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    huge = writer in ("set_pmd_at", "pmd_update_flags", "pmd_clear", "pmd_populate")
    a = thp_region(p, 2 << 20) if huge else small_region(p, 2)
    c = p.fork()
    pt = c.mm.pt
    s = pt.slot_of[a // HPAGE_PMD_SIZE]
    if huge:
        fid = int(pt.pmd_folio[s])
    else:
        row, i = int(pt.pmd_row[s]), (a // PAGE_SIZE) % NR
        pfn = int(pt.pte_pfn[row, i])
    if writer in ("clear_ptes", "free_pte_table"):
        # a THP split with half of it unmapped: a page still in the folio, mapped nowhere
        k = Kernel(ram=THP_RAM, check=True)
        c = k.spawn()
        a = thp_region(c, 2 << 20)
        c.madvise(a + (1 << 20), 1 << 20, MADV_DONTNEED)
        pt = c.mm.pt
        s = pt.slot_of[a // HPAGE_PMD_SIZE]
        row, j = int(pt.pmd_row[s]), NR - 1
        pt.pte_pfn[row, j], pt.pte_flags[row, j] = pt.pte_pfn[row, 0] + j, PTE_NEW_ANON & ~_PAGE_RW   # planted
    with pytest.raises(PageTableCheckError, match=f"page_table_check: mm {c.pid}: "):
        if writer == "set_pte_at":
            pgtable.set_pte_at(k, c.mm, row, i, pfn, PTE_NEW_ANON)
        elif writer == "pte_update_flags":
            pgtable.pte_update_flags(k, c.mm, row, i, set_bits=_PAGE_RW)
        elif writer == "set_ptes":
            pgtable.set_ptes(k, c.mm, row, i, np.array([pfn]), PTE_NEW_ANON)
        elif writer == "set_ptes_scatter":
            pgtable.set_ptes_scatter(k, c.mm, np.array([row]), np.array([i]), np.array([pfn]), PTE_NEW_ANON)
        elif writer == "clear_ptes":
            pgtable.clear_ptes(k, c.mm, row, j, j + 1)
        elif writer == "free_pte_table":
            pgtable.free_pte_table(k, c.mm, s)
        elif writer == "set_pmd_at":
            pgtable.set_pmd_at(k, c.mm, s, fid, _PAGE_PRESENT | _PAGE_RW | _PAGE_DIRTY)
        elif writer == "pmd_update_flags":
            pgtable.pmd_update_flags(k, c.mm, s, set_bits=_PAGE_RW)
        else:
            for _ in range(2):                      # the child's and then the parent's count taken back ...
                pgtable.pmd_clear(k, c.mm, s)
                pt.pmd_kind[s], pt.pmd_folio[s] = PMD_LEAF, fid                        # ... planted again
            if writer == "pmd_clear":
                pgtable.pmd_clear(k, c.mm, s)
            else:                                   # as __split_huge_pmd_locked() does
                pgtable.pmd_populate(k, c.mm, s, pt.alloc_row())


def test_mprotect_makes_an_exclusive_thp_writable_again_without_checking():
    """pmd_update_flags() consults page_table_check only when there is one: on an unchecked
    kernel mprotect(PROT_READ|PROT_WRITE) still makes the PMD of an exclusive THP writable
    in place, and the next store needs no fault."""
    k = Kernel(ram=THP_RAM)
    assert k.ptc is None
    p = k.spawn()
    a = thp_region(p, 2 << 20, token=4)
    p.mprotect(a, 2 << 20, PROT_READ)
    p.mprotect(a, 2 << 20, RW)
    before = k.vmstat_snapshot()
    p.write(a + 7 * PAGE_SIZE, 8, 9)
    assert vmstat_delta(k, before)["pgfault"] == 0
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert p.read(a + 7 * PAGE_SIZE)[0] == 9 and p.read(a)[0] == 4

