"""The lifecycle of anonymous THPs on the simulated kernel: swap, reclaim, the deferred split
shrinker, compaction, migration, memory failure and collapse of swapped ranges.

Every test runs with ``check=True`` (the invariant checker after every call) and keeps a
reference model of the memory contents: each page holds a distinct token and must read back
exactly as written after swap-out/in, migration, compaction and collapse.  The expected
counters follow the v6.18 sources (kernel-semantics.md §5.4, §6, §7, §8, §9.4):

- swap-out: mm/vmscan.c shrink_folio_list() (folio_alloc_swap(), split_folio_to_list() and
  THP_SWPOUT_FALLBACK, try_to_unmap(TTU_SPLIT_HUGE_PMD)), mm/page_io.c (PSWPOUT, THP_SWPOUT);
- swap-in: mm/memory.c do_swap_page() (PGMAJFAULT), mm/swapfile.c (setup of the clusters,
  the header page in slot 0);
- deferred split: mm/huge_memory.c deferred_split_scan(), thp_underused();
- migration: mm/migrate.c migrate_pages_batch() and its THP_MIGRATION_* accounting;
- memory failure: mm/memory-failure.c (split, then one poisoned PTE: SIGBUS on access);
- collapse: mm/khugepaged.c hpage_collapse_scan_pmd() (max_ptes_swap),
  __collapse_huge_page_swapin().
"""

from __future__ import annotations

import numpy as np
import pytest

from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_COLD, MADV_COLLAPSE, MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_NOHUGEPAGE,
    MADV_PAGEOUT, PAGE_SIZE, Kernel,
)
from thpcow.kernel.clock import NSEC_PER_SEC
from thpcow.kernel.errors import HardwarePoison, KernelError
from thpcow.kernel.mm import PMD_LEAF, _PAGE_ACCESSED, _PAGE_RW
from thpcow.kernel.task_mmu import PM_MMAP_EXCLUSIVE, PM_PFRAME_MASK, PM_PRESENT, PM_SWAP

from conftest import NR, THP_RAM, MiB, page_addrs, page_tokens, small_region, thp_region, vmstat_delta

RAM = THP_RAM
SWAP = 64 << 20


# -- helpers -------------------------------------------------------------------------------------
def assert_reads(p, a: int, expected: np.ndarray) -> None:
    """Reference model: every page of [a, a + len*4K) reads back as ``expected``."""
    np.testing.assert_array_equal(p.read(a, len(expected) * PAGE_SIZE), expected)


def swapped_out_thp(k: Kernel):
    """A new process with one PMD THP region (tokens from 100), all of it paged out: (p, a, toks)."""
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    return p, a, toks


def pfns_of(p, a: int, n: int) -> np.ndarray:
    pm = p.pagemap(a, n)
    assert (pm & np.uint64(PM_PRESENT)).all()
    return (pm & np.uint64(PM_PFRAME_MASK)).astype(np.int64)


def swapped(p, a: int, n: int) -> np.ndarray:
    """Bool per page: the pagemap entry is a swap entry (PM_SWAP, not PM_PRESENT)."""
    pm = p.pagemap(a, n)
    sw = (pm & np.uint64(PM_SWAP)) != 0
    assert not ((pm & np.uint64(PM_PRESENT)) != 0)[sw].any()
    return sw


def swap_offsets(p, a: int, n: int) -> np.ndarray:
    """Swap offsets of swap entries (pagemap frame = type | offset << MAX_SWAPFILES_SHIFT)."""
    pm = p.pagemap(a, n)
    return ((pm & np.uint64(PM_PFRAME_MASK)) >> np.uint64(5)).astype(np.int64)


# ==================================================================================================
# Swap
# ==================================================================================================
def test_pageout_of_exclusive_pmd_thp_swaps_it_out_whole_and_in_at_4k():
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    slots_before = k.swap.nr_free
    v0 = k.vmstat_snapshot()
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    # add_to_swap() got a whole cluster; try_to_unmap() split the PMD; one 2 MiB write.
    assert d["thp_swpout"] == 1
    assert d["pswpout"] == NR
    assert d["thp_split_pmd"] == 1
    assert d["thp_swpout_fallback"] == 0 and d["thp_split_page"] == 0
    assert k.vmstat.mthp_stat(9, "swpout") == 1
    assert k.vmstat.mthp_stat(9, "swpout_fallback") == 0
    assert slots_before - k.swap.nr_free == NR
    s = p.smaps_fields(a)
    assert s["Swap"] == 2048 and s["Rss"] == 0 and s["AnonHugePages"] == 0
    assert p.status()["RssAnon"] == 0 and p.status()["VmSwap"] == 2048
    assert swapped(p, a, NR).all()
    offs = swap_offsets(p, a, NR)
    assert offs[0] % NR == 0 and (np.diff(offs) == 1).all()      # one aligned cluster
    # Swap-in at 4 KiB on access: major faults, 512 reads, data intact, no PMD re-formed.
    v1 = k.vmstat_snapshot()
    assert_reads(p, a, toks)
    d = vmstat_delta(k, v1)
    assert d["pswpin"] == NR
    assert 1 <= d["pgmajfault"] <= NR
    assert d["thp_fault_alloc"] == 0 and d["thp_collapse_alloc"] == 0
    s = p.smaps_fields(a)
    assert s["Swap"] == 0 and s["Rss"] == 2048 and s["AnonHugePages"] == 0
    assert p.status()["RssAnon"] == 2048 and p.status()["VmSwap"] == 0
    assert not swapped(p, a, NR).any()
    # Stores after swap-in land in place.
    p.write(a + 7 * PAGE_SIZE, 1, 7777)
    toks[7] = 7777
    assert_reads(p, a, toks)


def test_pagemap_of_a_swap_entry_has_no_exclusive_bit():
    """pte_to_pagemap_entry(): PM_MMAP_EXCLUSIVE only for present pages (a swap entry has no page)."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    p, a, _ = swapped_out_thp(k)
    pm = p.pagemap(a, NR)
    assert ((pm & np.uint64(PM_SWAP)) != 0).all()
    assert not ((pm & np.uint64(PM_MMAP_EXCLUSIVE)) != 0).any(), \
        "swap entries reported PM_MMAP_EXCLUSIVE"


def test_pageout_falls_back_to_4k_when_no_swap_cluster_is_free():
    """Two clusters: THP A takes one whole cluster, two 4 KiB pages make the other one partial;
    THP B finds no free cluster: split_folio (thp_split_page) + thp_swpout_fallback, then 4 KiB."""
    k = Kernel(ram=RAM, swap=4 << 20, check=True)
    p = k.spawn()
    ta = page_tokens(NR, 1000)
    a = thp_region(p, HPAGE_PMD_SIZE, ta)
    tb = page_tokens(NR, 5000)
    b = thp_region(p, HPAGE_PMD_SIZE, tb)
    tc = page_tokens(2, 9000)
    c = small_region(p, 2, tc)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    p.madvise(c, 2 * PAGE_SIZE, MADV_PAGEOUT)
    assert swapped(p, a, NR).all() and swapped(p, c, 2).all()
    v0 = k.vmstat_snapshot()
    p.madvise(b, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert d["thp_swpout_fallback"] == 1
    assert d["thp_split_page"] == 1
    assert d["thp_swpout"] == 0
    assert k.vmstat.mthp_stat(9, "swpout_fallback") == 1
    assert k.vmstat.mthp_stat(9, "split") == 1
    n_out = int(swapped(p, b, NR).sum())
    assert 0 < n_out < NR                          # the rest did not find a slot
    assert d["pswpout"] == n_out
    s = p.smaps_fields()
    assert s["Swap"] == 4 * (NR + 2 + n_out)
    assert s["AnonHugePages"] == 0
    assert k.swap.nr_free == 0 or k.swap.nr_free < NR
    for addr, t in ((a, ta), (b, tb), (c, tc)):
        assert_reads(p, addr, t)


@pytest.mark.parametrize("size", [1 << 20, 2 << 20], ids=["1MiB", "2MiB"])
def test_pageout_to_a_device_without_a_whole_free_cluster(size):
    """mm/swapfile.c setup_swap_clusters_info(): slot 0 is the swap header and the tail of a
    partial last cluster is unusable, but the cluster stays usable for 4 KiB entries
    (si->pages = maxpages - 1).  A 1 MiB device has 255 usable slots, a 2 MiB one 511: neither
    has a free cluster, so a THP falls back and 4 KiB pages fill every usable slot."""
    usable = size // PAGE_SIZE - 1
    k = Kernel(ram=RAM, swap=size, check=True)
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    v0 = k.vmstat_snapshot()
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert d["thp_swpout_fallback"] == 1
    assert d["thp_split_page"] == 1
    assert d["thp_swpout"] == 0
    assert d["pswpout"] == usable, f"{size >> 10} KiB of swap holds {usable} pages besides the header"
    assert p.smaps_fields(a)["Swap"] == 4 * usable
    assert p.status()["RssAnon"] == 4 * (NR - usable)
    assert_reads(p, a, toks)


def test_pageout_skips_a_thp_shared_with_a_child():
    """madvise_cold_or_pageout_pte_range(): folio_maybe_mapped_shared() -> leave it alone."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    free0 = k.swap.nr_free                         # every usable slot
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    c = p.fork()
    v0 = k.vmstat_snapshot()
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    c.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    assert vmstat_delta(k, v0) == {}
    for q in (p, c):
        s = q.smaps_fields(a)
        assert s["Swap"] == 0 and s["AnonHugePages"] == 2048
        assert q.status()["VmSwap"] == 0
        assert_reads(q, a, toks)
    assert k.swap.nr_free == free0


def test_fork_of_swapped_memory_shares_the_slots_and_cow_keeps_processes_apart():
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    free0 = k.swap.nr_free                         # every usable slot
    p, a, toks = swapped_out_thp(k)
    offs = swap_offsets(p, a, NR)
    assert (k.swap.swap_map[offs] == 1).all()
    free = k.swap.nr_free
    c = p.fork()                                  # copy_nonpresent_pte(): swap_duplicate()
    assert (k.swap.swap_map[offs] == 2).all()
    assert k.swap.nr_free == free
    for q in (p, c):
        assert q.status()["VmSwap"] == 2048 and q.status()["RssAnon"] == 0
        assert q.smaps_fields(a)["Swap"] == 2048
        assert swapped(q, a, NR).all()
        np.testing.assert_array_equal(swap_offsets(q, a, NR), offs)
    # The child reads everything back from swap.
    v0 = k.vmstat_snapshot()
    assert_reads(c, a, toks)
    assert vmstat_delta(k, v0)["pswpin"] == NR
    assert c.status()["VmSwap"] == 0 and c.status()["RssAnon"] == 2048
    assert (k.swap.swap_map[offs] == 1).all()     # the parent still holds every slot
    assert p.status()["VmSwap"] == 2048
    # COW after swap-in keeps them apart, both ways.
    ptoks, ctoks = toks.copy(), toks.copy()
    c.write(a, 1, 111)
    ctoks[0] = 111
    p.write(a + PAGE_SIZE, 1, 222)
    ptoks[1] = 222
    assert_reads(p, a, ptoks)
    assert_reads(c, a, ctoks)
    c.write(a + 2 * PAGE_SIZE, 1, 333)
    ctoks[2] = 333
    assert_reads(p, a, ptoks)
    assert_reads(c, a, ctoks)
    c.exit()
    assert_reads(p, a, ptoks)
    p.exit()
    assert k.swap.nr_free == free0


def test_a_slot_shared_after_fork_is_read_once_and_shared_through_the_swap_cache():
    """do_swap_page(): the first process to fault reads the slot into a folio that stays in
    the swap cache while the other process's swap entry points at the slot; the second one
    maps that same folio (a minor fault: no pswpin, no pgmajfault, no new frame), read-only,
    and the folio leaves the swap cache with the slot's last entry, which frees the slot.
    A write then copies (COW) and the processes stay apart."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    free0 = k.swap.nr_free
    p, a, toks = swapped_out_thp(k)
    offs = swap_offsets(p, a, NR)
    c = p.fork()
    v0, frames0 = k.vmstat_snapshot(), k.mem.nr_free
    assert_reads(c, a, toks)
    d = vmstat_delta(k, v0)
    assert d["pswpin"] == NR and d["pgmajfault"] == NR
    assert frames0 - k.mem.nr_free == NR
    assert k.swap.in_cache[offs].all() and (k.swap.swap_map[offs] == 1).all()
    v1, frames1 = k.vmstat_snapshot(), k.mem.nr_free
    assert_reads(p, a, toks)
    d = vmstat_delta(k, v1)
    assert d["pswpin"] == 0 and d["pgmajfault"] == 0 and d["pgfault"] == NR
    assert k.mem.nr_free == frames1                     # the child's frames, now mapped by both
    np.testing.assert_array_equal(pfns_of(p, a, NR), pfns_of(c, a, NR))
    assert not k.swap.in_cache[offs].any() and k.swap.nr_free == free0
    assert p.smaps_fields(a)["Rss"] == 2048 and p.smaps_fields(a)["Pss"] == 1024
    c.write(a, 1, 111)
    ctoks = toks.copy()
    ctoks[0] = 111
    assert_reads(p, a, toks)
    assert_reads(c, a, ctoks)
    c.exit()
    p.exit()
    assert k.swap.nr_free == free0


def test_the_swap_cache_keeps_a_folio_its_last_mapper_dropped_and_reclaim_reuses_the_slot():
    """A folio swapped in by a process that then exits stays in the swap cache (the other
    process's entry still points at the slot): reclaim frees it without writing it again
    (the slot holds its contents), and the other process's write fault takes it over."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    free0 = k.swap.nr_free
    p, a, toks = swapped_out_thp(k)
    offs = swap_offsets(p, a, NR)
    c = p.fork()
    assert_reads(c, a, toks)
    # Reclaim of cached folios that the child maps: back to the same slots, nothing written.
    v0, slots0 = k.vmstat_snapshot(), k.swap.nr_free
    c.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    d = vmstat_delta(k, v0)
    assert d["pswpout"] == 0 and k.swap.nr_free == slots0
    np.testing.assert_array_equal(swap_offsets(c, a, NR), offs)
    assert (k.swap.swap_map[offs] == 2).all() and not k.swap.in_cache[offs].any()
    # The child reads half back, then exits: those folios stay cached, mapped by nobody.
    half = NR // 2
    assert_reads(c, a, toks[:half])
    frames = k.mem.nr_free
    c.exit()
    assert k.mem.nr_free == frames                      # the swap cache still holds them
    assert k.swap.in_cache[offs[:half]].all() and (k.swap.swap_map[offs] == 1).all()
    # The parent writes every page: the cached half is taken over without a read or a copy,
    # the other half is read from the slots.
    v1, frames1 = k.vmstat_snapshot(), k.mem.nr_free
    ptoks = toks + 1000
    p.write_many(page_addrs(a, NR), ptoks)
    d = vmstat_delta(k, v1)
    assert d["pswpin"] == NR - half
    assert frames1 - k.mem.nr_free == NR - half
    assert not k.swap.in_cache.any() and k.swap.nr_free == free0
    assert_reads(p, a, ptoks)
    p.exit()


def test_a_folio_in_the_swap_cache_migrates_and_stays_in_the_cache():
    """migrate_pages(): the swap cache's reference is expected, so a cached folio moves (mapped
    or not) and the other process's fault still finds it there."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    p, a, toks = swapped_out_thp(k)
    c = p.fork()
    assert_reads(c, a, toks[:2])                        # two pages swapped in, both cached
    old = pfns_of(c, a, 2)
    c.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)  # the second one is now mapped by nobody
    v0 = k.vmstat_snapshot()
    k.migrate(int(old[0]))
    k.migrate(int(old[1]))
    assert vmstat_delta(k, v0)["pgmigrate_success"] == 2
    assert pfns_of(c, a, 1)[0] != old[0]
    v1 = k.vmstat_snapshot()
    assert_reads(p, a, toks[:2])                        # both found in the swap cache
    assert vmstat_delta(k, v1)["pswpin"] == 0
    assert pfns_of(p, a, 1)[0] == pfns_of(c, a, 1)[0]   # the page the child maps, moved


@pytest.mark.parametrize("order", ["swap in, then fork", "fork, then both swap in"])
def test_madv_free_in_one_process_keeps_a_swapped_in_page_the_other_still_maps(order):
    """folio_free_swap() marks the folio dirty when its swap copy goes: then MADV_FREE skips a
    page that another process maps too, and reclaim cannot drop the other process's data."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    p = k.spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, 1, 7)
    p.madvise(a, PAGE_SIZE, MADV_PAGEOUT)
    if order == "swap in, then fork":
        assert_reads(p, a, np.array([7]))
        c = p.fork()
    else:
        c = p.fork()
        assert_reads(p, a, np.array([7]))
        assert_reads(c, a, np.array([7]))
    p.madvise(a, PAGE_SIZE, MADV_FREE)
    for _ in range(3):
        k.reclaim(1 << 16)
    assert_reads(c, a, np.array([7]))
    assert_reads(p, a, np.array([7]))


def test_memory_failure_of_a_folio_in_the_swap_cache_leaves_swap_entries():
    """hwpoison_user_mappings() keeps a clean swap cache page's data: its mappings become swap
    entries again (no SIGBUS) and the next fault reads the slot."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    p = k.spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, 1, 7)
    p.madvise(a, PAGE_SIZE, MADV_PAGEOUT)
    c = p.fork()
    assert_reads(p, a, np.array([7]))                   # cached: the child's entry uses the slot
    k.memory_failure(int(pfns_of(p, a, 1)[0]))
    assert swapped(p, a, 1).all() and p.status()["VmSwap"] == 4
    v0 = k.vmstat_snapshot()
    assert_reads(p, a, np.array([7]))
    assert_reads(c, a, np.array([7]))
    assert vmstat_delta(k, v0)["pswpin"] == 1


def test_an_exclusive_swap_entry_is_mapped_writable_on_a_read_fault():
    """do_swap_page(): an exclusive entry in a VM_WRITE mapping is mapped writable (not dirty)
    even on a read, so the write after it takes no second fault.  A read of an entry another
    process still uses maps it read-only."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    p = k.spawn()
    toks = page_tokens(8, 100)
    a = small_region(p, 8, toks)
    p.madvise(a, 8 * PAGE_SIZE, MADV_PAGEOUT)
    assert_reads(p, a, toks)
    v0 = k.vmstat_snapshot()
    p.write_many(page_addrs(a, 8), toks + 1)
    assert vmstat_delta(k, v0)["pgfault"] == 0
    p.madvise(a, 8 * PAGE_SIZE, MADV_PAGEOUT)
    c = p.fork()                                        # the entries are no longer exclusive
    assert_reads(p, a, toks + 1)
    v1 = k.vmstat_snapshot()
    p.write_many(page_addrs(a, 8), toks + 2)
    assert vmstat_delta(k, v1)["pgfault"] == 8
    assert_reads(c, a, toks + 1)


def test_dontneed_munmap_and_exit_free_swap_slots():
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    free0 = k.swap.nr_free                         # every usable slot
    p = k.spawn()
    toks = page_tokens(4 * NR, 100)
    a = thp_region(p, 4 * HPAGE_PMD_SIZE, toks)
    p.madvise(a, 4 * HPAGE_PMD_SIZE, MADV_PAGEOUT)
    assert k.swap.nr_free == free0 - 4 * NR
    assert p.status()["VmSwap"] == 8192
    c = p.fork()
    c.exit()                                       # the child's references go, the slots stay
    assert k.swap.nr_free == free0 - 4 * NR
    p.madvise(a, HPAGE_PMD_SIZE, MADV_DONTNEED)    # zap_nonpresent_ptes(): free_swap_and_cache()
    assert k.swap.nr_free == free0 - 3 * NR
    assert p.status()["VmSwap"] == 6144
    assert_reads(p, a, np.zeros(NR, dtype=np.int64))
    p.munmap(a + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE)
    assert k.swap.nr_free == free0 - 2 * NR
    assert p.status()["VmSwap"] == 4096
    # Swapped back in (the slots may stay with the swap cache) and out again: the same slot count.
    assert_reads(p, a + 2 * HPAGE_PMD_SIZE, toks[2 * NR:])
    p.madvise(a + 2 * HPAGE_PMD_SIZE, 2 * HPAGE_PMD_SIZE, MADV_PAGEOUT)
    assert k.swap.nr_free == free0 - 2 * NR
    p.exit()
    assert k.swap.nr_free == free0


def test_madv_free_drops_swap_entries():
    """madvise_free_pte_range(): free_swap_and_cache_nr() and clear the entry: reads see zeros."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    free0 = k.swap.nr_free                         # every usable slot
    p = k.spawn()
    toks = page_tokens(2 * NR, 100)
    a = thp_region(p, 2 * HPAGE_PMD_SIZE, toks)
    p.madvise(a, 2 * HPAGE_PMD_SIZE, MADV_PAGEOUT)
    assert k.swap.nr_free == free0 - 2 * NR
    p.madvise(a, HPAGE_PMD_SIZE, MADV_FREE)
    assert k.swap.nr_free == free0 - NR
    assert p.status()["VmSwap"] == 2048
    assert not swapped(p, a, NR).any()
    assert swapped(p, a + HPAGE_PMD_SIZE, NR).all()
    assert_reads(p, a, np.zeros(NR, dtype=np.int64))
    assert_reads(p, a + HPAGE_PMD_SIZE, toks[NR:])


# ==================================================================================================
# Reclaim
# ==================================================================================================
def test_writing_more_than_ram_with_swap_completes_and_reads_back():
    k = Kernel(ram=16 << 20, swap=32 << 20, check=True)
    p = k.spawn()
    n = (24 << 20) // PAGE_SIZE                    # 24 MiB of data in 16 MiB of RAM
    a = p.mmap(n * PAGE_SIZE)
    toks = page_tokens(n, 1)
    batch = 256
    for first in range(0, n, batch):
        p.write_many(page_addrs(a, batch, first), toks[first: first + batch])
        if first >= k.ram // PAGE_SIZE:            # memory is full by now: kswapd keeps it balanced
            assert k.wmark_min <= k.mem.nr_free <= k.wmark_high + 2 * batch, \
                (k.mem.nr_free, k.wmark_min, k.wmark_low, k.wmark_high)
    v = k.vmstat_snapshot()
    assert v["pgsteal_anon"] > 0 and v["pswpout"] > 0
    assert v["pswpout"] <= v["pgsteal_anon"]
    assert p.status()["VmSwap"] > 0
    assert p.status()["VmSwap"] + p.status()["RssAnon"] == n * 4
    v0 = k.vmstat_snapshot()
    assert_reads(p, a, toks)
    d = vmstat_delta(k, v0)
    assert d["pswpin"] > 0 and d["pgmajfault"] > 0
    assert k.wmark_min <= k.mem.nr_free


def test_lazyfree_pages_are_discarded_without_swap_and_redirtied_ones_survive():
    k = Kernel(ram=16 << 20, check=True)          # no swap
    p = k.spawn()
    toks = page_tokens(256, 5)
    a = small_region(p, 256, toks)
    p.madvise(a, 256 * PAGE_SIZE, MADV_FREE)
    assert p.smaps_fields(a)["LazyFree"] == 1024
    redirty = np.arange(0, 256, 8)
    p.write_many(a + redirty * PAGE_SIZE, toks[redirty] + 1000)
    assert p.smaps_fields(a)["LazyFree"] == 1024 - 4 * len(redirty)
    # Memory pressure from another process.
    q = k.spawn()
    n = k.mem.nr_free + 64
    b = q.mmap(n * PAGE_SIZE)
    qt = page_tokens(n, 1)
    for first in range(0, n, 256):
        m = min(256, n - first)
        q.write_many(page_addrs(b, m, first), qt[first: first + m])
    v = k.vmstat_snapshot()
    assert v["pglazyfreed"] == 256 - len(redirty)
    assert v["pswpout"] == 0
    expected = np.zeros(256, dtype=np.int64)
    expected[redirty] = toks[redirty] + 1000
    assert_reads(p, a, expected)                   # discarded pages read as zeros
    assert p.smaps_fields(a)["LazyFree"] == 0
    assert p.status()["RssAnon"] == 4 * len(redirty)
    assert_reads(q, b, qt)


def test_madv_cold_pages_are_reclaimed_first():
    k = Kernel(ram=16 << 20, swap=16 << 20, check=True)
    p = k.spawn()
    toks = page_tokens(512, 5)
    a = small_region(p, 512, toks)
    cold = np.arange(100, 164)
    p.madvise(a + 100 * PAGE_SIZE, 64 * PAGE_SIZE, MADV_COLD)
    v0 = k.vmstat_snapshot()
    assert k.reclaim(len(cold)) >= len(cold)
    d = vmstat_delta(k, v0)
    assert d["pswpout"] == len(cold)
    np.testing.assert_array_equal(np.flatnonzero(swapped(p, a, 512)), cold)
    assert p.smaps_fields(a)["Swap"] == 4 * len(cold)
    assert_reads(p, a, toks)


def test_fork_maps_the_thp_old_in_the_child_and_reclaim_sees_it_unreferenced():
    """copy_huge_pmd() ends with pmd_mkold() on the child's PMD (the child has not accessed the
    THP) and only write-protects the parent's, which stays young.  smaps shows it (Referenced:
    the whole THP in the parent, nothing in the child), and once the parent is gone reclaim's
    folio_referenced() finds no young mapping: the THP is swapped out at the first look,
    without the second chance a young folio gets."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    c = p.fork()

    def pmd_flags(q) -> int:
        pt = q.mm.pt
        s = pt.slot_of[a // HPAGE_PMD_SIZE]
        assert pt.pmd_kind[s] == PMD_LEAF
        return int(pt.pmd_flags[s])

    assert pmd_flags(p) & _PAGE_ACCESSED, "the parent's PMD keeps its young bit"
    assert not pmd_flags(c) & _PAGE_ACCESSED, "copy_huge_pmd() must map the child's PMD old"
    assert not (pmd_flags(p) | pmd_flags(c)) & _PAGE_RW
    assert p.smaps_fields(a)["Referenced"] == 2048
    assert c.smaps_fields(a)["Referenced"] == 0
    p.exit()
    v0 = k.vmstat_snapshot()
    k.reclaim(NR)
    d = vmstat_delta(k, v0)
    assert d["thp_swpout"] == 1 and d["pswpout"] == NR
    assert d["pgscan_anon"] == 1, "an old folio is reclaimed at the first look"
    assert c.status()["VmSwap"] == 2048 and c.status()["RssAnon"] == 0
    assert_reads(c, a, toks)


# ==================================================================================================
# The deferred split shrinker
# ==================================================================================================
def test_shrinker_splits_a_partially_mapped_thp_and_frees_the_unmapped_half(k, p):
    toks = page_tokens(2 * NR, 100)
    a = thp_region(p, 2 * HPAGE_PMD_SIZE, toks)
    v0 = k.vmstat_snapshot()
    p.munmap(a + MiB, MiB)                         # half of the first THP
    d = vmstat_delta(k, v0)
    assert d["thp_split_pmd"] == 1 and d["thp_deferred_split_page"] == 1
    assert d["thp_split_page"] == 0
    assert k.vmstat.mthp_stat(9, "nr_anon_partially_mapped") == 1
    v1 = k.vmstat_snapshot()
    free = k.mem.nr_free
    freed = k.reclaim(1)
    d = vmstat_delta(k, v1)
    assert d["thp_split_page"] == 1
    assert d["thp_underused_split_page"] == 0
    assert k.mem.nr_free - free == NR // 2 and freed >= NR // 2
    assert k.vmstat.mthp_stat(9, "nr_anon_partially_mapped") == 0
    assert_reads(p, a, toks[: NR // 2])
    assert p.smaps_fields(a + HPAGE_PMD_SIZE)["AnonHugePages"] == 2048   # the whole THP is untouched
    assert_reads(p, a + HPAGE_PMD_SIZE, toks[NR:])


@pytest.mark.parametrize("max_ptes_none,shrink_underused,splits", [
    (64, "1", True), (511, "1", False), (64, "0", False)],
    ids=["max_ptes_none=64", "max_ptes_none=511", "shrink_underused=0"])
def test_shrinker_splits_underused_thps(max_ptes_none, shrink_underused, splits, k):
    """thp_underused(): more than max_ptes_none zero-filled pages (never with 511); the split
    maps the shared zero page where the pages held zeros (RMP_USE_SHARED_ZEROPAGE)."""
    k.sysfs.write("khugepaged/max_ptes_none", str(max_ptes_none))
    k.sysfs.write("shrink_underused", shrink_underused)
    p = k.spawn()
    a = p.mmap(HPAGE_PMD_SIZE)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    written = np.array([0, 3, 100, 200, 511])
    p.write_many(a + written * PAGE_SIZE, written + 1)
    expected = np.zeros(NR, dtype=np.int64)
    expected[written] = written + 1
    assert p.smaps_fields(a)["AnonHugePages"] == 2048 and p.status()["RssAnon"] == 2048
    v0 = k.vmstat_snapshot()
    free = k.mem.nr_free
    k.reclaim(1)
    d = vmstat_delta(k, v0)
    s = p.smaps_fields(a)
    if splits:
        assert d["thp_underused_split_page"] == 1
        assert d["thp_split_page"] == 1
        assert s["AnonHugePages"] == 0
        assert s["Rss"] == 4 * len(written) and p.status()["RssAnon"] == 4 * len(written)
        assert k.mem.nr_free - free == NR - len(written)
        pfn = (p.pagemap(a, NR) & np.uint64(PM_PFRAME_MASK)).astype(np.int64)
        zeros = np.setdiff1d(np.arange(NR), written)
        assert len(np.unique(pfn[zeros])) == 1                    # all on the one zero page
        assert not np.isin(pfn[zeros], pfn[written]).any()
    else:
        assert d["thp_underused_split_page"] == 0 and d["thp_split_page"] == 0
        assert s["AnonHugePages"] == 2048 and p.status()["RssAnon"] == 2048
    assert_reads(p, a, expected)
    p.write(a + PAGE_SIZE, 1, 77)                  # a store to a zero-page entry allocates
    expected[1] = 77
    assert_reads(p, a, expected)
    assert p.status()["RssAnon"] == (4 * (len(written) + 1) if splits else 2048)


# ==================================================================================================
# Fragmentation and direct compaction
# ==================================================================================================
def test_thp_fault_falls_back_when_no_order9_block_can_be_formed():
    """Every pageblock holds an unmovable page: compaction cannot help, the fault falls back."""
    k = Kernel(ram=RAM, fragmentation=1.0, check=True)
    p = k.spawn()
    a = p.mmap(2 * HPAGE_PMD_SIZE)
    p.madvise(a, 2 * HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    toks = page_tokens(2 * NR, 3)
    v0 = k.vmstat_snapshot()
    p.write_many(page_addrs(a, 2 * NR), toks)
    d = vmstat_delta(k, v0)
    assert d["thp_fault_fallback"] == 2
    assert d["thp_fault_alloc"] == 0
    assert d["compact_success"] == 0
    assert k.vmstat.mthp_stat(9, "anon_fault_fallback") == 2
    assert p.smaps_fields(a)["AnonHugePages"] == 0 and p.status()["RssAnon"] == 4096
    assert_reads(p, a, toks)


def _fill_with_movable_pages(k: Kernel):
    """Fill memory with 4 KiB pages, then free every other one: plenty of free memory, but no
    free order-9 block.  One batched store over two interleaved VMAs puts their pages on
    alternate frames; unmapping one VMA leaves the other's pages in every pageblock."""
    f = k.spawn()
    n = (k.mem.nr_free - 64) // 2
    x = f.mmap(n * PAGE_SIZE)
    y = f.mmap(n * PAGE_SIZE)
    for v in (x, y):
        f.madvise(v, n * PAGE_SIZE, MADV_NOHUGEPAGE)
    addrs = np.empty(2 * n, dtype=np.int64)
    addrs[0::2] = page_addrs(x, n)
    addrs[1::2] = page_addrs(y, n)
    toks = page_tokens(n, 10)
    f.write_many(addrs, np.repeat(toks, 2))
    f.munmap(y, n * PAGE_SIZE)
    assert k.mem.nr_free >= 2 * NR
    assert not k.mem.has_free_order(9), "the setup left a free order-9 block"
    return f, x, toks


@pytest.mark.parametrize("enabled,defrag,advise", [
    ("always", "always", False), ("madvise", "madvise", True), ("always", "defer+madvise", True)])
def test_direct_compaction_migrates_movable_pages_for_a_thp_fault(enabled, defrag, advise):
    k = Kernel(ram=16 << 20, check=True)
    k.sysfs.write("enabled", enabled)
    k.sysfs.write("defrag", defrag)
    f, x, ftoks = _fill_with_movable_pages(k)
    before = pfns_of(f, x, len(ftoks))
    p = k.spawn()
    a = p.mmap(HPAGE_PMD_SIZE)
    if advise:
        p.madvise(a, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    toks = page_tokens(NR, 50_000)
    v0 = k.vmstat_snapshot()
    p.write_many(page_addrs(a, NR), toks)
    d = vmstat_delta(k, v0)
    assert d["compact_stall"] == 1
    assert d["compact_success"] == 1 and d["compact_fail"] == 0
    assert d["thp_fault_alloc"] == 1 and d["thp_fault_fallback"] == 0
    moved = int((pfns_of(f, x, len(ftoks)) != before).sum())
    assert moved > 0 and d["pgmigrate_success"] == moved
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert_reads(p, a, toks)
    assert_reads(f, x, ftoks)                      # the migrated pages kept their contents


@pytest.mark.parametrize("defrag", ["never", "defer"])
def test_thp_fault_without_direct_compaction_falls_back(defrag):
    k = Kernel(ram=16 << 20, check=True)
    k.sysfs.write("enabled", "always")
    k.sysfs.write("defrag", defrag)
    f, x, ftoks = _fill_with_movable_pages(k)
    p = k.spawn()
    a = p.mmap(HPAGE_PMD_SIZE)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    toks = page_tokens(NR, 50_000)
    v0 = k.vmstat_snapshot()
    p.write_many(page_addrs(a, NR), toks)
    d = vmstat_delta(k, v0)
    assert d["compact_stall"] == 0 and d["pgmigrate_success"] == 0
    assert d["thp_fault_fallback"] == 1 and d["thp_fault_alloc"] == 0
    assert p.smaps_fields(a)["AnonHugePages"] == 0
    assert_reads(p, a, toks)
    assert_reads(f, x, ftoks)


# ==================================================================================================
# Migration
# ==================================================================================================
def test_migrating_a_pmd_thp_keeps_it_pmd_mapped(k, p):
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    old = pfns_of(p, a, NR)
    v0 = k.vmstat_snapshot()
    k.migrate(int(old[17]))
    d = vmstat_delta(k, v0)
    assert d["thp_migration_success"] == 1
    assert d["thp_migration_split"] == 0 and d["thp_migration_fail"] == 0
    assert d["pgmigrate_success"] == NR and d["thp_split_pmd"] == 0
    new = pfns_of(p, a, NR)
    assert new[0] % NR == 0 and (np.diff(new) == 1).all()
    assert not np.isin(new, old).any()
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert_reads(p, a, toks)
    p.write(a, HPAGE_PMD_SIZE, 5)                  # still writable at PMD level: no fault splits it
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert_reads(p, a, np.full(NR, 5))


def test_migrating_a_thp_without_a_thp_target_splits_it_and_moves_4k_pages(k, p):
    """migrate_pages_batch(): -ENOMEM for the THP target -> nr_thp_failed++ and, once
    try_split_folio() succeeds, nr_thp_split++; the 4 KiB pages are then migrated."""
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    k.mem.fragment(1.0, np.random.default_rng(0))
    assert not k.mem.has_free_order(9)
    old = pfns_of(p, a, NR)
    v0 = k.vmstat_snapshot()
    k.migrate(int(old[0]))
    d = vmstat_delta(k, v0)
    assert d["thp_migration_split"] == 1
    assert d["thp_split_page"] == 1
    assert d["pgmigrate_success"] == NR
    assert d["thp_migration_success"] == 0
    assert p.smaps_fields(a)["AnonHugePages"] == 0 and p.status()["RssAnon"] == 2048
    assert_reads(p, a, toks)
    assert d["thp_migration_fail"] == 1, "the THP that could not move whole counts as failed too"
    # The split pages are migrated as one batch: every target is allocated before any source
    # is freed, so no page lands on a frame of the old THP.
    new = pfns_of(p, a, NR)
    assert not np.isin(new, old).any(), f"{int(np.isin(new, old).sum())} pages moved within the old THP"


def test_migrating_a_thp_shared_by_parent_and_child_updates_both_mappings(k, p):
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    c = p.fork()
    old = pfns_of(p, a, NR)
    np.testing.assert_array_equal(pfns_of(c, a, NR), old)
    v0 = k.vmstat_snapshot()
    k.migrate(int(old[3]))
    d = vmstat_delta(k, v0)
    assert d["thp_migration_success"] == 1 and d["pgmigrate_success"] == NR
    new = pfns_of(p, a, NR)
    np.testing.assert_array_equal(pfns_of(c, a, NR), new)
    assert not np.isin(new, old).any()
    for q in (p, c):
        assert q.smaps_fields(a)["AnonHugePages"] == 2048
        assert_reads(q, a, toks)
    # Still COW-shared: a store by the child does not reach the parent.
    c.write(a + 9 * PAGE_SIZE, 1, 999)
    ctoks = toks.copy()
    ctoks[9] = 999
    assert_reads(c, a, ctoks)
    assert_reads(p, a, toks)
    assert p.smaps_fields(a)["AnonHugePages"] == 2048


# ==================================================================================================
# Memory failure
# ==================================================================================================
def test_memory_failure_inside_a_thp_loses_only_that_page(k, p):
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    pfns = pfns_of(p, a, NR)
    bad = 7
    v0 = k.vmstat_snapshot()
    k.memory_failure(int(pfns[bad]))
    d = vmstat_delta(k, v0)
    assert d["thp_split_page"] == 1
    assert d["thp_split_pmd"] == 1
    assert p.smaps_fields(a)["AnonHugePages"] == 0
    assert p.status()["RssAnon"] == 2048 - 4
    with pytest.raises(HardwarePoison):
        p.read(a + bad * PAGE_SIZE, 1)
    with pytest.raises(HardwarePoison):
        p.write(a + bad * PAGE_SIZE + 100, 1, 5)
    good = np.setdiff1d(np.arange(NR), [bad])
    np.testing.assert_array_equal(p.read_many(a + good * PAGE_SIZE), toks[good])
    np.testing.assert_array_equal(pfns_of(p, a + bad * PAGE_SIZE + PAGE_SIZE, NR - bad - 1),
                                  pfns[bad + 1:])                   # the others stay where they were
    p.write(a + (bad + 1) * PAGE_SIZE, 1, 42)
    assert p.read(a + (bad + 1) * PAGE_SIZE, 1)[0] == 42


def test_pagemap_shows_a_poisoned_page_as_a_swap_entry(k, p):
    """try_to_unmap_one(TTU_HWPOISON) leaves a hwpoison swap entry; pte_to_pagemap_entry()
    reports every non-present, non-none PTE with PM_SWAP (is_pfn_swap_entry() includes hwpoison)."""
    a = thp_region(p, HPAGE_PMD_SIZE, page_tokens(NR, 100))
    pfns = pfns_of(p, a, NR)
    k.memory_failure(int(pfns[7]))
    pm = p.pagemap(a + 7 * PAGE_SIZE, 1)[0]
    assert not pm & np.uint64(PM_PRESENT)
    assert pm & np.uint64(PM_SWAP), f"pagemap entry {int(pm):#x} of the poisoned page"


def test_memory_failure_of_a_small_page():
    k = Kernel(ram=16 << 20, check=True)
    p = k.spawn()
    toks = page_tokens(16, 100)
    a = small_region(p, 16, toks)
    pfns = pfns_of(p, a, 16)
    k.memory_failure(int(pfns[4]))
    assert p.status()["RssAnon"] == 60
    with pytest.raises(HardwarePoison):
        p.read(a + 4 * PAGE_SIZE, 1)
    with pytest.raises(HardwarePoison):
        p.write(a + 4 * PAGE_SIZE, 1, 9)
    good = np.setdiff1d(np.arange(16), [4])
    np.testing.assert_array_equal(p.read_many(a + good * PAGE_SIZE), toks[good])
    p.munmap(a, 16 * PAGE_SIZE)
    # The poisoned frame is never handed out again: take every free frame.
    q = k.spawn()
    n = k.mem.nr_free
    qt = page_tokens(n, 1)
    b = small_region(q, n, qt)
    qpfns = pfns_of(q, b, n)
    assert int(pfns[4]) not in set(qpfns.tolist())
    assert np.isin(pfns[good], qpfns).all()        # its neighbours were
    assert_reads(q, b, qt)


# ==================================================================================================
# Collapse of partially swapped ranges
# ==================================================================================================
def test_madv_collapse_swaps_in_a_partially_swapped_range_first():
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    free0 = k.swap.nr_free                         # every usable slot
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    v0 = k.vmstat_snapshot()
    p.madvise(a + 10 * PAGE_SIZE, 100 * PAGE_SIZE, MADV_PAGEOUT)  # splits the THP, 100 pages out
    d = vmstat_delta(k, v0)
    assert d["thp_split_page"] == 1 and d["pswpout"] == 100
    assert p.smaps_fields(a)["Swap"] == 400
    v1 = k.vmstat_snapshot()
    p.madvise(a, HPAGE_PMD_SIZE, MADV_COLLAPSE)
    d = vmstat_delta(k, v1)
    assert d["thp_collapse_alloc"] == 1
    assert d["pswpin"] == 100                  # __collapse_huge_page_swapin()
    s = p.smaps_fields(a)
    assert s["AnonHugePages"] == 2048 and s["Swap"] == 0
    assert p.status()["RssAnon"] == 2048 and p.status()["VmSwap"] == 0
    assert k.swap.nr_free == free0
    assert_reads(p, a, toks)


@pytest.mark.parametrize("nr_swapped,collapses", [(100, False), (64, True), (32, True)])
def test_khugepaged_respects_max_ptes_swap(nr_swapped, collapses):
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    assert k.sysfs.max_ptes_swap == 64
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    p.madvise(a, nr_swapped * PAGE_SIZE, MADV_PAGEOUT)
    assert swapped(p, a, NR).sum() == nr_swapped
    # The rest is referenced (>= HPAGE_PMD_NR / 2 young PTEs are needed when swap PTEs exist).
    assert_reads(p, a + nr_swapped * PAGE_SIZE, toks[nr_swapped:])
    v0 = k.vmstat_snapshot()
    k.advance(25 * NSEC_PER_SEC)
    d = vmstat_delta(k, v0)
    if collapses:
        assert d["thp_collapse_alloc"] == 1 and d["thp_scan_exceed_swap_pte"] == 0
        assert d["pswpin"] == nr_swapped
        assert p.smaps_fields(a)["AnonHugePages"] == 2048 and p.status()["VmSwap"] == 0
    else:
        assert d["thp_scan_exceed_swap_pte"] >= 1 and d["thp_collapse_alloc"] == 0
        assert d["pswpin"] == 0
        assert p.smaps_fields(a)["AnonHugePages"] == 0 and p.status()["VmSwap"] == 4 * nr_swapped
    assert_reads(p, a, toks)


def test_khugepaged_counts_shared_ptes_again_after_its_swap_in():
    """__collapse_huge_page_isolate() re-checks max_ptes_shared after the swap-in: pages just
    swapped in from the swap cache are mapped by another process too."""
    k = Kernel(ram=RAM, swap=SWAP, check=True)
    k.sysfs.write("enabled", "always")
    k.sysfs.write("khugepaged/max_ptes_swap", "511")
    p = k.spawn()
    toks = page_tokens(NR, 100)
    a = thp_region(p, HPAGE_PMD_SIZE, toks)
    p.madvise(a, 200 * PAGE_SIZE, MADV_PAGEOUT)           # split; 200 pages go to swap
    c = p.fork()
    assert_reads(c, a, toks[:200])                      # cached, mapped by the child
    p.write(a + 200 * PAGE_SIZE, 212 * PAGE_SIZE, 5)    # 212 copies of the parent's own
    assert_reads(p, a + 412 * PAGE_SIZE, toks[412:])    # 100 stay shared, all young
    v0 = k.vmstat_snapshot()
    k.advance(25 * NSEC_PER_SEC)
    d = vmstat_delta(k, v0)
    assert d["thp_scan_exceed_share_pte"] >= 1 and d["pswpin"] == 0
    assert p.smaps_fields(a)["AnonHugePages"] == 0


def test_madv_collapse_whose_swap_in_runs_out_of_memory_fails_and_leaks_nothing():
    """A failed swap-in ends the collapse (SCAN_FAIL, EINVAL) and the new THP is freed."""
    k = Kernel(ram=16 << 20, swap=SWAP, check=True)
    p = k.spawn()
    big = p.mmap(14 << 20)
    p.write(big, 14 << 20, 1)
    a = p.mmap(HPAGE_PMD_SIZE)
    p.write(a, HPAGE_PMD_SIZE, 2)
    p.madvise(a, HPAGE_PMD_SIZE, MADV_PAGEOUT)
    p.write(big, 14 << 20, 3)
    with pytest.raises(KernelError, match="SCAN_FAIL"):
        p.madvise(a, HPAGE_PMD_SIZE, MADV_COLLAPSE)
    assert p.smaps_fields(a)["AnonHugePages"] == 0
    assert_reads(p, a, np.full(NR, 2))


def test_defrag_defer_wakes_kcompactd_instead_of_stalling(k):
    """defrag=defer: the fault falls back at once (no compact_stall) and wakes kcompactd,
    which builds a block in the background; a later fault gets its THP."""
    k.sysfs.write("defrag", "defer")
    filler = k.spawn()
    b = filler.mmap(2 << 20)
    filler.write(b, 2 << 20, 1)                    # movable 4 KiB pages in one pageblock
    k.mem.fragment(1.0, np.random.default_rng(1))  # every free pageblock broken
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    p.write(a, 8, 1)
    v = k.vmstat_snapshot()
    assert v["thp_fault_fallback"] == 1 and v["compact_stall"] == 0
    k.advance(2_000_000)
    v = k.vmstat_snapshot()
    assert v["compact_daemon_wake"] == 1 and v["compact_success"] == 1
    p.write(a + (2 << 20), 8, 2)
    assert k.vmstat_snapshot()["thp_fault_alloc"] == 1
    assert (filler.read(b, 2 << 20) == 1).all()
    # defrag=madvise outside MADV_HUGEPAGE: no compaction at all, now or later
    k2 = Kernel(ram=512 << 20, check=True)
    k2.sysfs.write("enabled", "always")
    k2.mem.fragment(1.0, np.random.default_rng(1))
    q = k2.spawn()
    c = q.mmap(2 << 20)
    q.write(c, 8, 1)
    k2.advance(2_000_000)
    v = k2.vmstat_snapshot()
    assert v["thp_fault_fallback"] == 1 and v["compact_stall"] == 0 and v["compact_daemon_wake"] == 0


def test_batched_deferred_split_equals_splitting_one_by_one():
    """The shrinker splits the queue's partially mapped folios together; the result must
    equal split_folio() on each in turn (counters, mapcounts, contents, free memory)."""
    from thpcow.kernel import huge_memory as hm

    def build():
        k = Kernel(ram=512 << 20, check=True)
        k.sysfs.write("hugepages-64kB/enabled", "always")
        p = k.spawn()
        a = p.mmap(8 << 20)
        p.madvise(a, 8 << 20, MADV_HUGEPAGE)
        p.write(a, 8 << 20, 1)
        b = p.mmap(1 << 20)
        p.write(b, 1 << 20, 2)                              # 16 mTHPs of 64 KiB
        c = p.fork()
        for i in range(4):
            p.munmap(a + i * (2 << 20) + (1 << 20), 1 << 20)   # half of each THP
        p.munmap(b, 1 << 19)                                # half the mTHPs, whole
        p.munmap(b + (1 << 19) + 8192, 4096)                # one page of one mTHP
        c.exit()
        return k, p, a, b

    k1, p1, a1, b1 = build()
    queued = list(k1.deferred)
    assert len(queued) >= 5
    hm.deferred_split_scan(k1)
    k2, p2, a2, b2 = build()
    for fid in list(k2.deferred):
        if k2.folios.flags[fid] & 0x40:                     # PG_PARTIALLY_MAPPED
            assert hm.split_folio(k2, fid) == 0
        else:
            from thpcow.kernel import rmap
            rmap.folio_unqueue_deferred_split(k2, fid)
    k1.check()
    k2.check()
    assert k1.vmstat_snapshot() == k2.vmstat_snapshot()
    assert (k1.vmstat.mthp == k2.vmstat.mthp).all()
    assert k1.mem.nr_free == k2.mem.nr_free
    assert p1.smaps_rollup() == p2.smaps_rollup()
    for (p, a, b) in ((p1, a1, b1), (p2, a2, b2)):
        assert (p.read(a, 1 << 20) == 1).all() and (p.read(b + (1 << 19), 4096) == 2).all()
