"""Conformance: the anonymous-memory COW scenarios of the kernel selftest cow.c, on the simulator.

The kernel's tools/testing/selftests/mm/cow.c runs a table of *test bodies*
against a table of *backings* (the kind of memory under test), for every THP
size.  This file does the same on :mod:`thpcow.kernel`:

- ``ANON_BACKINGS`` × ``ANON_BODIES``: base page, PMD-mapped THP, PTE-mapped
  THP, single PTE of a THP, partially mremap()'ed THP, partially shared THP,
  each also for every mTHP size 16K..1M, and the swapped-out variants cow.c
  has (base page, PMD-mapped THP, PTE-mapped THP and single PTE of a THP,
  each size, paged out with MADV_PAGEOUT before the body), against basic COW
  in either direction, the mprotect() optimisation variant, random
  interleaved writes and reuse after the child exits (upstream build);
- cow.c's two "Basic COW after fork()" bodies on the swapped-out backings
  under every other kernel build (``COW_BUILDS``);
- ``COLLAPSE_CASES``: cow.c's anon-THP collapse tests (MADV_COLLAPSE of a
  PTE-mapped THP before fork(), or after fork() with all of it, its lower
  half or its upper half shared), under every kernel build; the series as
  posted (thp-cow-v1) oopses in every PMD collapse, so there the oops is
  asserted instead;
- ``NON_ANON_BACKINGS`` × ``NON_ANON_BODIES``: the shared zero page and the
  huge zero page against the basic (fork-less) COW test;
- the reuse boundary of __wp_can_reuse_large_anon_folio(): a large folio with
  two mapped pages left in one mm is reused, not copied;
- the worked trace of kernel-semantics.md §12.5 with its exact numbers.

Every test runs with ``check=True`` (the invariant checker runs after each
system call and access), keeps a plain reference model of what every process
must read (a dict page -> token per process), and ends by comparing each live
process's memory with it.  Where cow.c SKIPs because the machine did not give
it what it asked for (no THP populated, MADV_PAGEOUT swapped nothing,
MADV_COLLAPSE failed), the simulated kernel is set up to give it (THP on, a
swap device), so here that is a failure.

Of cow.c's 110 cases on anonymous memory with THPs (its two "Basic COW after
fork()" bodies × 52 backings, the 4 collapse tests and "Basic COW" on the two
zero pages) all are ported.  What cow.c has that is not, and why:

- vmsplice() (4 bodies, CVE-2020-29374 itself), io_uring fixed buffers
  (2 bodies) and R/O longterm GUP / GUP-fast pins (6 anonymous bodies, 2
  non-anonymous ones): no page pins, pipes or io_uring are modelled, so a
  pinned page, and the unsharing a R/O pin must trigger, cannot be expressed;
- hugetlb backings (anonymous MAP_HUGETLB, memfd hugetlb): hugetlbfs is not
  modelled;
- memfd and tmpfile backings (private mappings of page-cache pages): only
  private anonymous memory and the zero pages are modelled, no page cache.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import pytest

from thpcow.kernel import (
    MADV_COLLAPSE, MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_PAGEOUT,
    MREMAP_FIXED, MREMAP_MAYMOVE, PROT_NONE, PROT_READ, PROT_WRITE, Kernel, KernelOops, Process,
    SegmentationFault,
)
from thpcow.kernel import access, task_mmu
from thpcow.kernel.builds import BUILDS, get_build
from thpcow.kernel.constants import HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE, order_to_kb
from thpcow.kernel.folio import PG_HUGE_ZERO, PG_MM_IDS_SHARED, PG_PARTIALLY_MAPPED
from thpcow.kernel.mm import PMD_LEAF, _PAGE_RW, _PAGE_SWP_EXCLUSIVE
from thpcow.kernel.page_alloc import PG_ANON_EXCLUSIVE, ZERO_PFN

from conftest import THP_RAM, VmstatDelta, vmstat_delta

SMALL_RAM = 256 << 20      # THP off by default (< 512 MiB), as the kernel's hugepage_init()

FILL = 1                   # cow.c: memset(mem, 1, size)
PARENT_TOKEN = 0xFF        # cow.c: the parent's memset(mem, 0xff, size)
CHILD_TOKEN = 0xC1

PMD_KB = order_to_kb(HPAGE_PMD_ORDER)
MTHP_ORDERS = tuple(range(2, HPAGE_PMD_ORDER))          # 16K .. 1M
SWAP = 8 << 20             # cow.c's swapped-out runs need swap enabled: 2047 slots, three free clusters


# =============================================================================================
# Reference model and views
# =============================================================================================
class Mem(NamedTuple):
    """What a backing hands to a test body: cow.c's (mem, size), plus the process.

    ``extra`` lists other ranges of the same process whose contents the backing
    established, as (addr, size, token); they are checked too (the upper half
    of a partially mremap()'ed THP lives on at another address).  ``swapped``:
    the backing paged the range out (MADV_PAGEOUT), so nothing of it is resident.
    """

    proc: Process
    addr: int
    size: int
    extra: tuple[tuple[int, int, int], ...] = ()
    swapped: bool = False          # every page of the range is a swap entry when the body starts


class Model:
    """Plain reference model: per live process, page number -> token it must read."""

    def __init__(self) -> None:
        self.procs: dict[int, Process] = {}
        self.pages: dict[int, dict[int, int]] = {}

    def track(self, p: Process, addr: int, size: int, token: int) -> None:
        self.procs[p.pid] = p
        d = self.pages.setdefault(p.pid, {})
        for vp in range(addr >> PAGE_SHIFT, (addr + size) >> PAGE_SHIFT):
            d[vp] = token

    def write(self, p: Process, addr: int, size: int, token: int) -> None:
        p.write(addr, size, token=token)
        d = self.pages[p.pid]
        for vp in range(addr >> PAGE_SHIFT, ((addr + size - 1) >> PAGE_SHIFT) + 1):
            assert vp in d, f"test bug: write outside the tracked range at {vp << PAGE_SHIFT:#x}"
            d[vp] = token

    def write_many(self, p: Process, addrs: list[int], tokens: list[int], scalar: bool = False) -> None:
        """Scattered one-page stores in program order (batched or one-by-one reference path)."""
        (p.write_many_scalar if scalar else p.write_many)(addrs, tokens)
        d = self.pages[p.pid]
        for a, t in zip(addrs, tokens):
            assert a >> PAGE_SHIFT in d, f"test bug: write outside the tracked range at {a:#x}"
            d[a >> PAGE_SHIFT] = t

    def fork(self, p: Process) -> Process:
        c = p.fork()
        self.procs[c.pid] = c
        self.pages[c.pid] = dict(self.pages[p.pid])       # the child sees a copy
        return c

    def untrack(self, p: Process, addr: int, size: int) -> None:
        """``p`` has no memory at [addr, addr+size) (a MADV_DONTFORK range in a child)."""
        d = self.pages[p.pid]
        for vp in range(addr >> PAGE_SHIFT, (addr + size) >> PAGE_SHIFT):
            del d[vp]

    def exit(self, p: Process) -> None:
        p.exit()
        del self.procs[p.pid]
        del self.pages[p.pid]

    def verify(self, only: Process | None = None) -> None:
        """Every live process (or ``only`` that one) reads exactly what the model says, page by page."""
        for pid, p in self.procs.items():
            if only is not None and pid != only.pid:
                continue
            d = self.pages[pid]
            vps = np.array(sorted(d), dtype=np.int64)
            # contiguous runs -> one read each
            brk = np.flatnonzero(np.diff(vps) != 1) + 1
            for run in np.split(vps, brk):
                addr = int(run[0]) << PAGE_SHIFT
                got = np.asarray(p.read(addr, len(run) << PAGE_SHIFT))
                want = np.array([d[int(v)] for v in run], dtype=np.int64)
                if not np.array_equal(got, want):
                    bad = int(np.flatnonzero(got != want)[0])
                    pytest.fail(f"pid {pid}: page {(int(run[bad]) << PAGE_SHIFT):#x} reads token "
                                f"{int(got[bad]):#x}, the reference model says {int(want[bad]):#x} "
                                f"({int(np.count_nonzero(got != want))} of {len(run)} pages differ)")


def model_for(m: Mem) -> Model:
    """The reference model of a backing's memory, checked at once unless it is swapped out.

    Reading a swapped-out range would swap it back in before the body runs
    (cow.c's bodies do not touch the memory before fork()); its contents are
    checked by the body's own reads instead.
    """
    model = Model()
    model.track(m.proc, m.addr, m.size, FILL)
    for addr, size, token in m.extra:
        model.track(m.proc, addr, size, token)
    if not m.swapped:
        model.verify()
    return model


@dataclass
class View:
    """Page-table view of [addr, addr+size) of one process, one entry per 4 KiB page."""

    leaf: np.ndarray        # mapped by a PMD leaf
    pfn: np.ndarray         # frame read through the entry (-1: none)
    writable: np.ndarray    # entry is writable
    ae: np.ndarray          # PageAnonExclusive (of the head page for a PMD leaf)
    fid: np.ndarray         # folio id (-1: none)
    order: np.ndarray       # folio order


def view(p: Process, addr: int, size: int) -> View:
    k = p.kernel
    vp = np.arange(addr >> PAGE_SHIFT, (addr + size) >> PAGE_SHIFT, dtype=np.int64)
    sc, kind, _rows, _cols, _pfn, flags = access.entry_state(p.mm, vp)
    pfn = access.resolve_pfns(k, p.mm, vp)
    leaf = kind == PMD_LEAF
    pmd_flags = p.mm.pt.pmd_flags[sc]
    writable = np.where(leaf, pmd_flags & _PAGE_RW, flags & _PAGE_RW).astype(bool)
    fid = np.where(pfn >= 0, k.mem.folio[np.maximum(pfn, 0)], -1).astype(np.int64)
    leaf_fid = np.where(leaf, p.mm.pt.pmd_folio[sc], -1)
    fid = np.where(leaf, leaf_fid, fid)
    has = fid >= 0
    head = np.where(has, k.folios.head[np.maximum(fid, 0)], 0)
    ae_pfn = np.where(leaf, head, np.maximum(pfn, 0))
    ae = has & (k.mem.pflags[ae_pfn] & PG_ANON_EXCLUSIVE).astype(bool)
    order = np.where(has, k.folios.order[np.maximum(fid, 0)], -1)
    return View(leaf, pfn, writable, ae, fid, order)


def mthp_snapshot(k: Kernel, item: str) -> list[int]:
    return [k.vmstat.mthp_stat(o, item) for o in range(HPAGE_PMD_ORDER + 1)]


def populated(p: Process, addr: int) -> bool:
    """cow.c's pagemap_is_populated(): present (or swapped) in /proc/self/pagemap."""
    return bool(int(p.pagemap(addr, 1)[0]) & (task_mmu.PM_PRESENT | task_mmu.PM_SWAP))


def swapped(p: Process, addr: int, size: int) -> np.ndarray:
    """cow.c's pagemap_is_swapped() per page of [addr, addr+size): a swap entry, nothing present."""
    pm = p.pagemap(addr, size // PAGE_SIZE)
    sw = (pm & np.uint64(task_mmu.PM_SWAP)) != 0
    assert not ((pm & np.uint64(task_mmu.PM_PRESENT)) != 0)[sw].any()
    return sw


def swap_slots(p: Process, addr: int, size: int) -> np.ndarray:
    """The swap offsets pagemap reports for the pages of [addr, addr+size) (all swap entries)."""
    pm = p.pagemap(addr, size // PAGE_SIZE)
    assert ((pm & np.uint64(task_mmu.PM_SWAP)) != 0).all()
    return ((pm & np.uint64(task_mmu.PM_PFRAME_MASK)) >> np.uint64(task_mmu.MAX_SWAPFILES_SHIFT)).astype(np.int64)


# =============================================================================================
# Backings (cow.c's run_with_*): each sets up memory in a fresh kernel and returns Mem
# =============================================================================================
# The build a backing boots when it is given none (test_cow_semantics_under_every_build sets it).
BACKING_BUILD: list[str | None] = [None]


def thp_kernel(order: int, swap: int = 0, build: str | None = None) -> Kernel:
    """cow.c's per-size settings: PMD size 'never', the size under test 'always'."""
    k = Kernel(ram=THP_RAM, swap=swap, check=True, build=build if build is not None else BACKING_BUILD[0])
    k.sysfs.write(f"hugepages-{PMD_KB}kB/enabled", "never")
    k.sysfs.write(f"hugepages-{order_to_kb(order)}kB/enabled", "always")
    return k


def base_page(swapout: bool = False, build: str | None = None) -> Mem:
    """mmap one page, MADV_NOHUGEPAGE, populate it: one AnonExclusive order-0 page.

    ``swapout`` (cow.c 'with swapped out base page'): then MADV_PAGEOUT it.
    ``build``: the kernel build (default: upstream), for every backing below too.
    """
    k = Kernel(ram=SMALL_RAM, swap=SWAP if swapout else 0, check=True,
               build=build if build is not None else BACKING_BUILD[0])
    p = k.spawn()
    mem = p.mmap(PAGE_SIZE)
    p.madvise(mem, PAGE_SIZE, MADV_NOHUGEPAGE)
    p.write(mem, PAGE_SIZE, token=FILL)
    v = view(p, mem, PAGE_SIZE)
    assert v.order.tolist() == [0] and v.ae.all() and v.writable.all()
    assert k.folios.refcount[v.fid[0]] == 1
    m = Mem(p, mem, PAGE_SIZE)
    if swapout:
        d = swap_out(m)
        assert d["thp_swpout"] == 0 and d["thp_split_page"] == 0
        m = m._replace(swapped=True)
    return m


def swap_out(m: Mem) -> VmstatDelta:
    """cow.c's swap-out step: MADV_PAGEOUT the range; pagemap must then show every page swapped.

    cow.c SKIPs when MADV_PAGEOUT swapped nothing ("is swap enabled?"); the
    simulated kernel has a swap device with free clusters, so here that is a
    failure.  Every page was AnonExclusive and mapped by this process alone, so
    madvise_cold_or_pageout_pte_range() takes it and reclaim writes it out:
    each swap PTE keeps the exclusive marker (try_to_unmap_one() sets
    pte_swp_mkexclusive() for an AnonExclusive page), each slot has exactly
    one reference, the folio is freed (nothing resident, not in the swap
    cache: the simulated device completes its writes at once, as zram does,
    so shrink_folio_list() frees the folio in the same pass) and the mm's
    anon RSS moves to its swap count.  Returns the vmstat
    delta of the MADV_PAGEOUT; the returned Mem is marked ``swapped``.
    """
    p, k = m.proc, m.proc.kernel
    npages = m.size // PAGE_SIZE
    assert view(p, m.addr, m.size).ae.all()
    rss, free = p.mm.rss_anon, k.swap.nr_free
    before = k.vmstat_snapshot()
    p.madvise(m.addr, m.size, MADV_PAGEOUT)
    d = vmstat_delta(k, before)
    assert swapped(p, m.addr, m.size).all(), "MADV_PAGEOUT did not swap the range out"
    slots = swap_slots(p, m.addr, m.size)
    assert len(set(slots.tolist())) == npages and free - k.swap.nr_free == npages
    assert (k.swap.swap_map[slots] == 1).all() and not k.swap.in_cache[slots].any()
    vp = np.arange(m.addr >> PAGE_SHIFT, (m.addr + m.size) >> PAGE_SHIFT, dtype=np.int64)
    _sc, _kind, _rows, _cols, _pfn, flags = access.entry_state(p.mm, vp)
    assert (flags & _PAGE_SWP_EXCLUSIVE).all(), "an AnonExclusive page must leave an exclusive swap entry"
    assert p.mm.rss_swap == npages and rss - p.mm.rss_anon == npages
    assert d["pswpout"] == npages and d["pswpin"] == 0
    return d


def _populate_thp(order: int, swap: int = 0, build: str | None = None) -> tuple[Kernel, Process, int, int, int]:
    """cow.c do_run_with_thp() prologue: mmap 2*size, align, MADV_HUGEPAGE, touch, memset.

    Returns (kernel, process, mmap start, aligned mem, size).  Asserts a THP of
    exactly ``order`` was faulted in (cow.c SKIPs when the last subpage is not
    populated after touching the first byte; here that is a failure).
    """
    k = thp_kernel(order, swap, build)
    p = k.spawn()
    size = PAGE_SIZE << order
    mmap_mem = p.mmap(2 * size)
    mem = (mmap_mem + size) & ~(size - 1)
    p.madvise(mem, size, MADV_HUGEPAGE)
    before = k.vmstat_snapshot()
    p.write(mem, 1, token=FILL)
    assert populated(p, mem + size - PAGE_SIZE), f"no {order_to_kb(order)} kB THP populated"
    p.write(mem, size, token=FILL)
    v = view(p, mem, size)
    assert (v.order == order).all() and len(set(v.fid.tolist())) == 1
    assert v.ae.all() and v.writable.all()
    assert k.vmstat.mthp_stat(order, "anon_fault_alloc") == 1
    if order == HPAGE_PMD_ORDER:
        assert v.leaf.all()
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 1
        assert k.folios.refcount[v.fid[0]] == 1
        assert p.smaps_fields(mem)["AnonHugePages"] == PMD_KB
    else:
        assert not v.leaf.any()
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 0          # mTHP: per-size stats only
        assert k.folios.refcount[v.fid[0]] == 1 << order
    return k, p, mmap_mem, mem, size


def thp(order: int = HPAGE_PMD_ORDER, swapout: bool = False, build: str | None = None) -> Mem:
    """THP_RUN_PMD: a PMD-mapped, AnonExclusive THP (for mTHP: the PTE-mapped mTHP as faulted).

    ``swapout`` (THP_RUN_PMD_SWAPOUT): MADV_PAGEOUT takes the THP whole (the
    PMD covers the range and nobody else maps it), reclaim finds a free swap
    cluster for it and writes it as one THP (thp_swpout, no
    thp_swpout_fallback, no folio split); try_to_unmap() splits the PMD into
    512 swap PTEs (thp_split_pmd +1).
    """
    k, p, _mm, mem, size = _populate_thp(order, SWAP if swapout else 0, build)
    m = Mem(p, mem, size)
    if swapout:
        d = swap_out(m)
        assert (d["thp_swpout"], d["thp_split_pmd"], d["thp_swpout_fallback"], d["thp_split_page"]) == (1, 1, 0, 0)
        assert k.vmstat.mthp_stat(order, "swpout") == 1
        assert swap_slots(p, mem, size)[0] % (size // PAGE_SIZE) == 0, "not one aligned swap cluster"
        m = m._replace(swapped=True)
    return m


def pte_mapped_thp(order: int = HPAGE_PMD_ORDER, swapout: bool = False, build: str | None = None) -> Mem:
    """THP_RUN_PTE: mprotect(page 1, PROT_READ) then back to RW.

    For a PMD THP the VMA split splits the PMD (thp_split_pmd +1); the VMA
    merges back; all 512 PTEs stay AnonExclusive, so mprotect() maps them
    writable again and rewriting the range takes no fault.  For an mTHP it is
    a no-op on the page tables.

    ``swapout`` (THP_RUN_PTE_SWAPOUT): MADV_PAGEOUT finds every page of the
    large folio mapped in the range (no split), reclaim gets 2^order
    naturally aligned contiguous slots for it and writes it whole (mTHP
    swpout of that order; thp_swpout only for the PMD order).
    """
    k, p, _mm, mem, size = _populate_thp(order, SWAP if swapout else 0, build)
    nvmas = len(p.vmas())
    before = k.vmstat_snapshot()
    p.mprotect(mem + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    p.mprotect(mem + PAGE_SIZE, PAGE_SIZE, PROT_READ | PROT_WRITE)
    assert vmstat_delta(k, before)["thp_split_pmd"] == (1 if order == HPAGE_PMD_ORDER else 0)
    assert vmstat_delta(k, before)["thp_split_page"] == 0
    vma = p.mm.find_vma(mem)
    assert (vma.start, vma.end) == (mem, mem + size), "the VMA did not merge back"
    assert len(p.vmas()) == nvmas
    v = view(p, mem, size)
    assert not v.leaf.any() and (v.order == order).all() and len(set(v.fid.tolist())) == 1
    assert v.ae.all(), "PTE-mapping the THP lost AnonExclusive"
    assert v.writable.all(), "mprotect(RW) did not map the AnonExclusive pages writable"
    before = k.vmstat_snapshot()
    p.write(mem, size, token=FILL)
    assert vmstat_delta(k, before)["pgfault"] == 0, "rewriting AnonExclusive writable PTEs faulted"
    m = Mem(p, mem, size)
    if swapout:
        d = swap_out(m)
        pmd = order == HPAGE_PMD_ORDER
        assert (d["thp_swpout"], d["thp_split_pmd"], d["thp_swpout_fallback"], d["thp_split_page"]) == \
            (1 if pmd else 0, 0, 0, 0)
        assert k.vmstat.mthp_stat(order, "swpout") == 1 and k.vmstat.mthp_stat(order, "split") == 0
        slots = swap_slots(p, mem, size)
        assert slots[0] % (size // PAGE_SIZE) == 0 and (np.diff(slots) == 1).all(), \
            "a large folio swaps out to naturally aligned contiguous slots"
        m = m._replace(swapped=True)
    return m


def single_pte_thp(order: int = HPAGE_PMD_ORDER, swapout: bool = False, build: str | None = None) -> Mem:
    """THP_RUN_SINGLE_PTE: MADV_DONTNEED [mem+4K, mem+size): one PTE of the THP is left.

    The folio is partially mapped with no PMD mapping: it goes on the deferred
    split queue (thp_deferred_split_page +1 for the PMD size, split_deferred +1).

    ``swapout`` (THP_RUN_SINGLE_PTE_SWAPOUT): MADV_PAGEOUT of the one page
    covers less than the folio, so madvise_cold_or_pageout_pte_range() splits
    the folio first (split_folio(): thp_split_page for the PMD order, mTHP
    split of the order; the folio leaves the deferred split queue) and pages
    out the order-0 page that is left mapped.
    """
    k, p, _mm, mem, size = _populate_thp(order, SWAP if swapout else 0, build)
    before = k.vmstat_snapshot()
    deferred = mthp_snapshot(k, "split_deferred")
    p.madvise(mem + PAGE_SIZE, size - PAGE_SIZE, MADV_DONTNEED)
    pmd = order == HPAGE_PMD_ORDER
    assert vmstat_delta(k, before)["thp_split_pmd"] == (1 if pmd else 0)
    assert vmstat_delta(k, before)["thp_deferred_split_page"] == (1 if pmd else 0)
    assert mthp_snapshot(k, "split_deferred")[order] - deferred[order] == 1
    assert k.vmstat.mthp_stat(order, "nr_anon_partially_mapped") == 1
    v = view(p, mem, PAGE_SIZE)
    assert not v.leaf.any() and v.order.tolist() == [order] and v.ae.all()
    fid = int(v.fid[0])
    assert k.folios.flags[fid] & PG_PARTIALLY_MAPPED and fid in k.deferred
    assert k.folios.refcount[fid] == 1 and k.folios.large[fid] == 1
    m = Mem(p, mem, PAGE_SIZE)
    if swapout:
        d = swap_out(m)
        pmd = order == HPAGE_PMD_ORDER
        assert (d["thp_split_page"], d["thp_swpout"], d["thp_swpout_fallback"]) == (1 if pmd else 0, 0, 0)
        assert k.vmstat.mthp_stat(order, "split") == 1 and k.vmstat.mthp_stat(order, "swpout") == 0
        assert k.vmstat.mthp_stat(order, "nr_anon") == 0, "the split must have freed the unmapped rest"
        assert k.vmstat.mthp_stat(order, "nr_anon_partially_mapped") == 0 and not k.deferred
        assert p.mm.rss_anon == 0
        m = m._replace(swapped=True)
    return m


def partial_mremap_thp(order: int = HPAGE_PMD_ORDER) -> Mem:
    """THP_RUN_PARTIAL_MREMAP: mremap() the upper half to a fresh PROT_NONE-reserved area.

    The PMD is split (thp_split_pmd +1) and the test uses the lower half; the
    upper half of the same folio is mapped at the new address.
    """
    k, p, _mm, mem, size = _populate_thp(order)
    half = size // 2
    before = k.vmstat_snapshot()
    reserved = p.mmap(half, prot=PROT_NONE)
    got = p.mremap(mem + half, half, half, MREMAP_MAYMOVE | MREMAP_FIXED, reserved)
    assert got == reserved
    assert vmstat_delta(k, before)["thp_split_pmd"] == (1 if order == HPAGE_PMD_ORDER else 0)
    lo, hi = view(p, mem, half), view(p, reserved, half)
    assert not lo.leaf.any() and not hi.leaf.any()
    assert set(lo.fid.tolist()) == set(hi.fid.tolist()) and len(set(lo.fid.tolist())) == 1
    assert lo.ae.all() and hi.ae.all() and lo.writable.all()
    return Mem(p, mem, half, extra=((reserved, half, FILL),))


def partial_shared_thp(order: int = HPAGE_PMD_ORDER) -> Mem:
    """THP_RUN_PARTIAL_SHARED: MADV_DONTFORK [4K, size), fork, the child exits, MADV_DOFORK.

    Only page 0 was ever shared: it lost AnonExclusive (and stays mapped R/O);
    the other pages are still AnonExclusive.
    """
    k, p, _mm, mem, size = _populate_thp(order)
    before = k.vmstat_snapshot()
    p.madvise(mem + PAGE_SIZE, size - PAGE_SIZE, MADV_DONTFORK)
    child = p.fork()
    child.exit()
    p.madvise(mem + PAGE_SIZE, size - PAGE_SIZE, MADV_DOFORK)
    assert vmstat_delta(k, before)["thp_split_pmd"] == (1 if order == HPAGE_PMD_ORDER else 0)
    vma = p.mm.find_vma(mem)
    assert (vma.start, vma.end) == (mem, mem + size), "MADV_DOFORK did not merge the VMA back"
    v = view(p, mem, size)
    assert not v.leaf.any() and len(set(v.fid.tolist())) == 1
    assert not v.ae[0] and not v.writable[0], "page 0 was shared with a child: must have lost AnonExclusive"
    assert v.ae[1:].all(), "pages never shared must stay AnonExclusive"
    return Mem(p, mem, size)


@dataclass(frozen=True)
class Backing:
    id: str
    setup: Callable[..., Mem]
    pmd_mapped: bool          # the range is mapped by a PMD leaf when the body starts
    after_exit: str           # write after the sharer exited: "pmd-reuse", "pte-reuse", "copy" or "swap-in"
    doc: str


def _mthp_backings() -> list[Backing]:
    out = []
    for o in MTHP_ORDERS:
        kb = order_to_kb(o)
        out += [
            Backing(f"mthp-{kb}kB", lambda o=o: pte_mapped_thp(o), False, "pte-reuse",
                    "cow.c 'with PTE-mapped THP' for an mTHP (the mprotect() trick is a no-op): "
                    "PTE-mapped large folio; guards large-folio COW reuse (mm: COW reuse for PTE-mapped THP)"),
            Backing(f"single-pte-mthp-{kb}kB", lambda o=o: single_pte_thp(o), False, "copy",
                    "cow.c 'with single PTE of THP' for an mTHP: a large folio with one mapped page "
                    "is copied, not reused, so it can be freed"),
            Backing(f"partial-mremap-mthp-{kb}kB", lambda o=o: partial_mremap_thp(o), False, "pte-reuse",
                    "cow.c 'with partially mremap()'ed THP' for an mTHP: one folio mapped at two "
                    "addresses of one mm"),
            Backing(f"partial-shared-mthp-{kb}kB", lambda o=o: partial_shared_thp(o), False, "pte-reuse",
                    "cow.c 'with partially shared THP' for an mTHP: mixed AnonExclusive pages in one folio"),
        ]
    return out


def _swapped_backings() -> list[Backing]:
    """cow.c's swapped-out runs: the backing as above, then MADV_PAGEOUT of the range.

    fork() then shares swap entries, not pages (copy_nonpresent_pte():
    swap_duplicate(), and the exclusive marker is cleared on both sides); each
    process swaps in 4 KiB pages, through the swap cache while the other
    still references the slot, so a write must copy.  After the sharer is gone
    a write fault on the last swap entry maps the page writable at once
    (do_swap_page()): no copy and no separate reuse.  ``setup`` takes the
    kernel build (test_swapped_cow_under_every_build).
    """
    out = [
        Backing("swapped-base-page", lambda build=None: base_page(swapout=True, build=build), False, "swap-in",
                "cow.c 'with swapped out base page': small-folio COW after swap-in through the swap cache"),
        Backing(f"swapped-pmd-thp-{PMD_KB}kB", lambda build=None: thp(swapout=True, build=build), False, "swap-in",
                "cow.c 'with swapped-out THP': a PMD THP swapped out whole to one cluster"),
        Backing(f"swapped-pte-mapped-thp-{PMD_KB}kB", lambda build=None: pte_mapped_thp(swapout=True, build=build),
                False, "swap-in",
                "cow.c 'with swapped-out, PTE-mapped THP'"),
        Backing(f"swapped-single-pte-thp-{PMD_KB}kB", lambda build=None: single_pte_thp(swapout=True, build=build),
                False, "swap-in",
                "cow.c 'with single PTE of swapped-out THP': the folio is split before the page-out"),
    ]
    for o in MTHP_ORDERS:
        kb = order_to_kb(o)
        out += [
            Backing(f"swapped-mthp-{kb}kB", lambda build=None, o=o: pte_mapped_thp(o, True, build), False, "swap-in",
                    "cow.c 'with swapped-out, PTE-mapped THP' for an mTHP: swapped out whole to aligned slots"),
            Backing(f"swapped-single-pte-mthp-{kb}kB", lambda build=None, o=o: single_pte_thp(o, True, build), False,
                    "swap-in", "cow.c 'with single PTE of swapped-out THP' for an mTHP"),
        ]
    return out


ANON_BACKINGS: list[Backing] = [
    # The original COW problem: a private page shared by fork() must be copied
    # before either side writes it (and the mm must not leak writes between
    # parent and child -- the class of bug behind CVE-2020-29374).
    Backing("base-page", base_page, False, "pte-reuse",
            "cow.c 'with base page': small-folio COW via do_wp_page()/wp_page_copy()"),
    # PMD-mapped THP: since v5.8 (3917c80280c9, "thp: Change CoW semantics for
    # anon-THP") a write to a shared PMD splits the PMD and copies 4 KiB.
    Backing(f"pmd-thp-{PMD_KB}kB", thp, True, "pmd-reuse",
            "cow.c 'with THP': do_huge_pmd_wp_page() split fallback and refcount==1 PMD reuse"),
    # PTE-mapped THP: per-page AnonExclusive must survive the PMD split
    # (__split_huge_pmd_locked() copies the head's bit to all 512 PTEs).
    Backing(f"pte-mapped-thp-{PMD_KB}kB", pte_mapped_thp, False, "pte-reuse",
            "cow.c 'with PTE-mapped THP': AnonExclusive kept across the PMD split, mprotect() "
            "re-maps writable only AnonExclusive PTEs"),
    # A THP with one PTE left: partially mapped, deferred split; a COW must
    # copy (not reuse) the last page so the big folio can be freed.
    Backing(f"single-pte-thp-{PMD_KB}kB", single_pte_thp, False, "copy",
            "cow.c 'with single PTE of THP': partially mapped folio on the deferred split queue"),
    # One THP mapped at two addresses of one mm (mremap of half): COW and reuse
    # must account the mapping at the other address (it is in the same mm).
    Backing(f"partial-mremap-thp-{PMD_KB}kB", partial_mremap_thp, False, "pte-reuse",
            "cow.c 'with partially mremap()'ed THP': mapcount/refcount over two VMAs of one mm"),
    # Partially shared THP: only page 0 was ever shared; stale exclusivity of
    # page 0 or lost exclusivity of the others would show up here.
    Backing(f"partial-shared-thp-{PMD_KB}kB", partial_shared_thp, False, "pte-reuse",
            "cow.c 'with partially shared THP': MADV_DONTFORK/DOFORK, mixed AnonExclusive pages"),
    *_mthp_backings(),
    # Swapped out before the body (MADV_PAGEOUT): COW of shared swap entries.
    *_swapped_backings(),
]


# =============================================================================================
# Anon test bodies (cow.c's anon_test_cases that need no GUP pin)
# =============================================================================================
def _assert_cow_counters(k: Kernel, before: dict[str, int], backing: Backing, npages: int,
                         deferred_before: list[int], swapins: int = 0) -> None:
    """The writer copied every page of the shared range, 4 KiB at a time (upstream policy).

    ``swapins``: pages the writer had to read from the swap device (its swap
    entry and the other process's both still pointed at the slot); the other
    swapped-out pages were found in the swap cache (minor faults).  The
    simulated device has no swap readahead, so each read is its own major
    fault.
    """
    assert vmstat_delta(k, before)["pswpin"] == swapins, "each slot must be read once, by its first user"
    assert vmstat_delta(k, before)["pgmajfault"] == swapins
    assert vmstat_delta(k, before)["sim_cow_pages"] == npages, "every shared page must be copied once"
    assert vmstat_delta(k, before)["pgreuse"] == 0, "a page shared with a live child must not be reused"
    assert vmstat_delta(k, before)["pgfault"] == npages, "one write fault per page (the PMD split is in the first)"
    assert vmstat_delta(k, before)["thp_split_pmd"] == (1 if backing.pmd_mapped else 0)
    assert vmstat_delta(k, before)["thp_fault_alloc"] == 0, "upstream never copies a THP whole on COW"
    assert vmstat_delta(k, before)["thp_split_page"] == 0, "a COW splits PMDs, never folios"
    assert vmstat_delta(k, before)["thp_deferred_split_page"] == 0, \
        "pages still mapped by the other process: no new partially mapped folio"
    assert mthp_snapshot(k, "split_deferred") == deferred_before


def _cow_write(model: Model, backing: Backing, m: Mem, writer: Process, other: Process, token: int) -> None:
    """``writer`` stores ``token`` over the whole range while ``other`` shares it.

    Afterwards the writer maps private, writable, AnonExclusive order-0 copies,
    and ``other`` still maps exactly the frames it mapped before, read-only.
    For a swapped-out range the writer first swaps each page in (read-only,
    not exclusive: the other process's entry still uses the slot, so
    do_swap_page() cannot free the swap) and do_wp_page() copies it; what the
    other process has not swapped in yet stays a swap entry whose slot keeps
    the swapped-in folio in the swap cache.
    """
    k = writer.kernel
    npages = m.size // PAGE_SIZE
    ov0 = view(other, m.addr, m.size)
    swapins = 0
    if m.swapped:
        assert swapped(writer, m.addr, m.size).all(), "test bug: the writer swapped pages in before its write"
        other_swapped = swapped(other, m.addr, m.size)
        swapins = int(np.count_nonzero(other_swapped))
    before, deferred = k.vmstat_snapshot(), mthp_snapshot(k, "split_deferred")
    model.write(writer, m.addr, m.size, token)
    _assert_cow_counters(k, before, backing, npages, deferred, swapins)
    wv, ov = view(writer, m.addr, m.size), view(other, m.addr, m.size)
    assert wv.writable.all() and wv.ae.all() and not wv.leaf.any()
    assert (wv.order == 0).all(), "upstream COW copies 4 KiB pages"
    assert not np.intersect1d(wv.pfn, ov.pfn).size, "writer and other process still share a frame"
    assert np.array_equal(ov.pfn, ov0.pfn) and np.array_equal(ov.leaf, ov0.leaf), \
        "the COW must not touch the other process's mappings"
    assert not ov.writable.any()
    if swapins:
        slots = swap_slots(other, m.addr, m.size)
        assert (k.swap.swap_map[slots] == 1).all(), "the writer's swap references must be gone"
        assert k.swap.in_cache[slots].all(), "the swapped-in folios must stay in the swap cache for the other"


def body_child_writes(backing: Backing, m: Mem) -> None:
    """Basic COW after fork(), child side: the child writes, the parent keeps the old data.

    Guards the original fork/COW leak (a write through a shared page becoming
    visible in the other process) in the child->parent direction, as cow.c's
    vmsplice-in-parent tests check it without the pin.
    """
    p = m.proc
    model = model_for(m)
    child = model.fork(p)
    _cow_write(model, backing, m, child, p, CHILD_TOKEN)
    model.verify()


def _child_backs_up(model: Model, m: Mem, child: Process) -> None:
    """cow.c's child_memcmp_fn() first copies the range (its backup) before the parent writes.

    Right after fork() that read takes no fault (fork() copied every PTE and
    PMD of the anonymous VMA); a swapped-out range is swapped in by the child
    (one major fault and one read per page: the simulated swap has no
    readahead), mapped read-only and not
    exclusive, and each folio stays in the swap cache because the parent's
    swap entry still uses its slot.
    """
    k = m.proc.kernel
    before = k.vmstat_snapshot()
    model.verify(only=child)
    d = vmstat_delta(k, before)
    npages = m.size // PAGE_SIZE
    if not m.swapped:
        assert d["pgfault"] == 0, "reading memory fork() mapped must not fault"
        return
    assert (d["pgfault"], d["pgmajfault"], d["pswpin"]) == (npages, npages, npages)
    cv = view(child, m.addr, m.size)
    assert (cv.pfn >= 0).all() and (cv.order == 0).all()
    assert not cv.writable.any() and not cv.ae.any(), "a page whose slot the parent still uses is not exclusive"
    slots = swap_slots(m.proc, m.addr, m.size)
    assert (k.swap.swap_map[slots] == 1).all() and k.swap.in_cache[slots].all()
    assert np.array_equal(k.swap.cache[slots], cv.fid)


def body_parent_writes(backing: Backing, m: Mem) -> None:
    """cow.c "Basic COW after fork()": the parent writes 0xff, the child must still read the old data.

    As in cow.c the child reads the range (its backup) before the parent writes.
    """
    p = m.proc
    model = model_for(m)
    child = model.fork(p)
    _child_backs_up(model, m, child)
    _cow_write(model, backing, m, p, child, PARENT_TOKEN)
    model.verify()


def body_parent_writes_mprotect(backing: Backing, m: Mem) -> None:
    """cow.c "Basic COW after fork() with mprotect() optimization".

    The parent does mprotect(PROT_READ) then mprotect(PROT_READ|PROT_WRITE)
    before writing.  mprotect() may map a page writable at once only when it
    is AnonExclusive (can_change_pte_writable()); after fork() nothing is, so
    every entry must stay read-only and the write must still COW.  As in cow.c
    the child reads the range (its backup) first; a swapped-out range stays
    swapped out in the parent (mprotect() changes no swap entry into a page).
    """
    p = m.proc
    model = model_for(m)
    child = model.fork(p)
    _child_backs_up(model, m, child)
    p.mprotect(m.addr, m.size, PROT_READ)
    p.mprotect(m.addr, m.size, PROT_READ | PROT_WRITE)
    v = view(p, m.addr, m.size)
    assert not v.writable.any(), \
        f"mprotect(RW) mapped {int(np.count_nonzero(v.writable))} shared pages writable without COW"
    assert not v.ae.any()
    if m.swapped:
        assert swapped(p, m.addr, m.size).all()
    _cow_write(model, backing, m, p, child, PARENT_TOKEN)
    model.verify()


RANDOM_STEPS = 40


def body_random_interleaved(backing: Backing, m: Mem) -> None:
    """Parent and child write random runs of pages in a random (seeded) order.

    Each step is a contiguous store (``write``), or scattered one-page stores
    through the batched path (``write_many``) or the scalar reference path
    (``write_many_scalar``), repeated pages included.  After every step both
    processes must equal the reference model.  Guards
    the reuse decisions (AnonExclusive, refcount, large mapcount, MM_IDS_SHARED)
    as they change page by page: a wrong reuse leaks a write into the other
    process, a wrong copy shows up in the invariant checker.
    """
    p, k = m.proc, m.proc.kernel
    rng = np.random.default_rng(zlib.crc32(backing.id.encode()))
    model = model_for(m)
    child = model.fork(p)
    before = k.vmstat_snapshot()
    npages = m.size // PAGE_SIZE
    for step in range(RANDOM_STEPS):
        who = (p, child)[int(rng.integers(2))]
        kind = int(rng.integers(3))
        if kind == 0:
            first = int(rng.integers(npages))
            n = int(rng.integers(1, min(8, npages - first) + 1))
            model.write(who, m.addr + first * PAGE_SIZE, n * PAGE_SIZE, 0x100 + step)
        else:
            n = int(rng.integers(1, 9))
            pages = rng.integers(npages, size=n)
            addrs = [m.addr + int(pg) * PAGE_SIZE + int(rng.integers(PAGE_SIZE)) for pg in pages]
            tokens = [0x10000 * (step + 1) + i for i in range(n)]
            model.write_many(who, addrs, tokens, scalar=kind == 2)
        model.verify()
    assert vmstat_delta(k, before)["thp_split_page"] == 0
    assert vmstat_delta(k, before)["thp_fault_alloc"] == 0


def body_reuse_after_child_exit(backing: Backing, m: Mem) -> None:
    """Fork, the child exits at once, then the parent writes: the parent's pages are its own again.

    A PMD THP is reused through do_huge_pmd_wp_page()'s refcount == 1 path
    (fork cleared the head's AnonExclusive, so not the AE fast path; §13
    pitfall 3): no split, no copy, no pgreuse (PMD reuse is not counted).
    Small folios and PTE-mapped large folios are reused page by page
    (pgreuse +1 each); a large folio with a single mapped page is copied
    instead so that it can be freed (__wp_can_reuse_large_anon_folio()).
    A swapped-out range: see _reuse_swapped_after_child_exit().
    """
    p, k = m.proc, m.proc.kernel
    model = model_for(m)
    child = model.fork(p)
    model.exit(child)
    npages = m.size // PAGE_SIZE
    if m.swapped:
        assert backing.after_exit == "swap-in"
        _reuse_swapped_after_child_exit(model, m)
        return
    v0 = view(p, m.addr, m.size)
    fid = int(v0.fid[0])
    assert not v0.ae.any() and not v0.writable.any(), "fork() must have cleared AnonExclusive"
    if backing.after_exit == "pmd-reuse":
        assert k.folios.refcount[fid] == 1, "the child's exit must drop its THP reference"
    elif k.folios.order[fid] == 0:
        assert k.folios.refcount[fid] == 1, "the child's exit must drop its page reference"
    else:
        assert k.folios.refcount[fid] == k.folios.large[fid], "only mappings may hold references"
    before, deferred = k.vmstat_snapshot(), mthp_snapshot(k, "split_deferred")
    model.write(p, m.addr, m.size, PARENT_TOKEN)
    v1 = view(p, m.addr, m.size)
    assert v1.writable.all() and v1.ae.all()
    assert vmstat_delta(k, before)["thp_split_pmd"] == 0
    assert vmstat_delta(k, before)["thp_fault_alloc"] == 0
    assert vmstat_delta(k, before)["thp_split_page"] == 0
    assert mthp_snapshot(k, "split_deferred") == deferred
    if backing.after_exit == "pmd-reuse":
        assert v1.leaf.all() and (v1.fid == fid).all(), "the PMD must be reused in place, not split"
        assert vmstat_delta(k, before)["sim_cow_pages"] == 0
        assert vmstat_delta(k, before)["pgreuse"] == 0
        assert vmstat_delta(k, before)["pgfault"] == 1, "one fault reuses the whole PMD"
    elif backing.after_exit == "pte-reuse":
        assert np.array_equal(v1.pfn, v0.pfn), "exclusive pages must be reused, not copied"
        assert vmstat_delta(k, before)["sim_cow_pages"] == 0
        assert vmstat_delta(k, before)["pgreuse"] == npages
        assert vmstat_delta(k, before)["pgfault"] == npages, "a large-folio reuse makes only the faulting PTE writable"
    else:
        assert backing.after_exit == "copy"
        assert not np.intersect1d(v1.pfn, v0.pfn).size, "the single mapped page must be copied"
        assert vmstat_delta(k, before)["sim_cow_pages"] == npages
        assert vmstat_delta(k, before)["pgreuse"] == 0
        order = int(v0.order[0])
        assert vmstat_delta(k, before)["pgfault"] == npages
        assert (v1.order == 0).all()
        assert k.vmstat.mthp_stat(order, "nr_anon") == 0, "the old large folio must be freed"
        assert k.vmstat.mthp_stat(order, "nr_anon_partially_mapped") == 0
        assert not k.deferred, "the freed folio must leave the deferred split queue"
    model.verify()


def _reuse_swapped_after_child_exit(model: Model, m: Mem) -> None:
    """The parent writes its swapped-out range after the child that shared the slots exited.

    fork() cleared the exclusive marker of the parent's swap entries and the
    child's exit dropped its swap references, so every slot has one reference
    again.  The write fault reads the page in (do_swap_page()), drops the
    last swap reference, frees the slot (should_try_to_free_swap() on a write
    fault) and, the folio now having no other reference, maps it writable and
    exclusive in the same fault: no copy and no wp_page_reuse() (pgreuse
    stays 0); the swap space is given back.  (One major fault per page: the
    simulated swap has no readahead.)
    """
    p, k = m.proc, m.proc.kernel
    npages = m.size // PAGE_SIZE
    assert swapped(p, m.addr, m.size).all()
    slots = swap_slots(p, m.addr, m.size)
    assert (k.swap.swap_map[slots] == 1).all(), "the child's exit must drop its swap references"
    vp = np.arange(m.addr >> PAGE_SHIFT, (m.addr + m.size) >> PAGE_SHIFT, dtype=np.int64)
    flags = access.entry_state(p.mm, vp)[5]
    assert not (flags & _PAGE_SWP_EXCLUSIVE).any(), "fork() must clear the exclusive marker of shared swap entries"
    free, rss = k.swap.nr_free, p.mm.rss_anon
    before = k.vmstat_snapshot()
    model.write(p, m.addr, m.size, PARENT_TOKEN)
    d = vmstat_delta(k, before)
    assert (d["pgfault"], d["pswpin"], d["pgmajfault"]) == (npages, npages, npages)
    assert d["sim_cow_pages"] == 0, "a page whose last swap reference the writer held must not be copied"
    assert d["pgreuse"] == 0 and d["thp_fault_alloc"] == 0 and d["thp_split_page"] == 0
    v = view(p, m.addr, m.size)
    assert (v.pfn >= 0).all() and (v.order == 0).all() and v.writable.all() and v.ae.all()
    assert k.swap.nr_free - free == npages and not k.swap.in_cache[slots].any(), "the slots must be freed"
    assert p.mm.rss_swap == 0 and p.mm.rss_anon - rss == npages
    model.verify()


@dataclass(frozen=True)
class Body:
    id: str
    run: Callable[[Backing, Mem], None]


ANON_BODIES: list[Body] = [
    # Basic COW after fork(), both directions (the CVE-2020-29374 era "COW
    # leaks between parent and child"): without a COW break one process
    # observes the other's writes.
    Body("child-writes", body_child_writes),
    Body("parent-writes", body_parent_writes),
    # mprotect() must not map shared pages writable (can_change_pte_writable()
    # / can_change_pmd_writable() rely on AnonExclusive).
    Body("parent-writes-after-mprotect", body_parent_writes_mprotect),
    # Interleaved writes against a plain reference model.
    Body("random-interleaved-writes", body_random_interleaved),
    # Reuse once the sharer is gone: PMD refcount==1 reuse, PTE wp_can_reuse_anon_folio().
    Body("reuse-after-child-exit", body_reuse_after_child_exit),
    # cow.c's anon_thp_test_cases (MADV_COLLAPSE before/after fork()) have
    # their own setup: COLLAPSE_CASES, test_anon_thp_collapse().
]


@pytest.mark.parametrize("body", ANON_BODIES, ids=lambda b: b.id)
@pytest.mark.parametrize("backing", ANON_BACKINGS, ids=lambda b: b.id)
def test_anon_cow(backing: Backing, body: Body) -> None:
    m = backing.setup()
    body.run(backing, m)


# Every kernel build (builds.BUILDS), with parameters that make its own decisions show up in
# a 2 MiB range (as test_random_programs.BUILD_SPECS); test_every_build_is_covered() keeps it whole.
COW_BUILDS = ("upstream", "thp-cow-v1", "thp-cow-meant", "pre-5.8", "mthp-cow:order=4", "mthp-cow:order=9",
              "directed-khugepaged", "reservation:pool_mib=8", "cow-density:threshold=8")


def test_every_build_is_covered() -> None:
    assert {get_build(spec).name for spec in COW_BUILDS} == set(BUILDS)


SWAPPED_BACKINGS = [b for b in ANON_BACKINGS if b.after_exit == "swap-in"]
COW_C_BODIES = [b for b in ANON_BODIES if b.id in ("parent-writes", "parent-writes-after-mprotect")]


@pytest.mark.parametrize("body", COW_C_BODIES, ids=lambda b: b.id)
@pytest.mark.parametrize("backing", SWAPPED_BACKINGS, ids=lambda b: b.id)
@pytest.mark.parametrize("build", [b for b in COW_BUILDS if b != "upstream"])
def test_swapped_cow_under_every_build(build: str, backing: Backing, body: Body) -> None:
    """cow.c's two 'Basic COW after fork()' bodies on every swapped-out backing, under every other build.

    Swapped-in pages are order-0 folios, and no build decides anything for
    them (the builds judge PMD-mapped THPs and large folios), so every build
    must behave as upstream here, counters included: each page is swapped in
    and copied 4 KiB at a time.
    """
    m = backing.setup(build=build)
    assert repr(m.proc.kernel.build) == repr(get_build(build))
    body.run(backing, m)


UNSWAPPED_BACKINGS = [b for b in ANON_BACKINGS if b.after_exit != "swap-in"]


@pytest.mark.parametrize("backing", UNSWAPPED_BACKINGS, ids=lambda b: b.id)
@pytest.mark.parametrize("build", [b for b in COW_BUILDS if b != "upstream"])
def test_cow_semantics_under_every_build(build: str, backing: Backing, monkeypatch) -> None:
    """cow.c's 'Basic COW after fork()' on every backing that is not swapped out, under every
    other build.  How much a build copies differs (a whole THP, an mTHP block, 4 KiB), so the
    counters are not upstream's; what must hold under all of them is COW itself: after fork
    neither process ever reads the other's writes, in either direction, while both live and
    after one exits, and the invariant checker stays quiet after every call."""
    monkeypatch.setattr(sys.modules[__name__], "BACKING_BUILD", [build])
    m = backing.setup()
    assert repr(m.proc.kernel.build) == repr(get_build(build))
    model = model_for(m)
    p = m.proc
    child = model.fork(p)
    half = max(PAGE_SIZE, m.size // 2)
    model.write(child, m.addr, m.size, CHILD_TOKEN)
    model.verify()
    model.write(p, m.addr, half, PARENT_TOKEN)
    model.verify()
    model.write_many(child, [m.addr + i * PAGE_SIZE for i in range(0, m.size // PAGE_SIZE, 3)],
                     [CHILD_TOKEN + 1 + i for i in range(len(range(0, m.size // PAGE_SIZE, 3)))])
    model.verify()
    model.exit(child)
    model.write(p, m.addr, m.size, PARENT_TOKEN + 1)
    model.verify()


@pytest.mark.parametrize("store", ["write", "write_many", "write_many_scalar"])
@pytest.mark.parametrize("order", [2, HPAGE_PMD_ORDER], ids=lambda o: f"{order_to_kb(o)}kB")
def test_large_folio_with_two_mapped_pages_left_is_reused(order: int, store: str) -> None:
    """__wp_can_reuse_large_anon_folio(): a large folio with exactly two mapped pages, both in
    this mm (FOLIO_MM_IDS_SHARED clear) and every reference a mapping, is reused by a write
    fault (pgreuse, no copy); only a large mapcount <= 1 is copied so that the folio can go.

    The state: a THP of ``order`` (a 16 kB mTHP, or a PMD THP that MADV_DONTNEED splits into
    PTEs) keeps two mapped pages; fork() write-protects them and clears AnonExclusive, and the
    child's exit gives the parent every reference back.  Both pages are then stored to through
    one contiguous store, the batched path or the one-page-at-a-time reference path.
    """
    k, p, _mmap_mem, mem, size = _populate_thp(order)
    p.madvise(mem + 2 * PAGE_SIZE, size - 2 * PAGE_SIZE, MADV_DONTNEED)
    model = Model()
    model.track(p, mem, 2 * PAGE_SIZE, FILL)
    model.exit(model.fork(p))
    v0 = view(p, mem, 2 * PAGE_SIZE)
    fid = int(v0.fid[0])
    assert (v0.fid == fid).all() and (v0.order == order).all() and not v0.leaf.any()
    assert not v0.ae.any() and not v0.writable.any(), "fork() must have left both pages shared"
    assert (k.folios.large[fid], k.folios.refcount[fid]) == (2, 2), "two mappings, no other reference"
    assert not k.folios.flags[fid] & PG_MM_IDS_SHARED, "after the child's exit only this mm maps it"
    before = k.vmstat_snapshot()
    if store == "write":
        model.write(p, mem, 2 * PAGE_SIZE, PARENT_TOKEN)
    else:
        model.write_many(p, [mem + PAGE_SIZE + 8, mem + 100], [PARENT_TOKEN, PARENT_TOKEN + 1],
                         scalar=store == "write_many_scalar")
    d = vmstat_delta(k, before)
    assert d["sim_cow_pages"] == 0, "a large folio with two mappings in this mm must be reused, not copied"
    assert d["pgreuse"] == 2 and d["pgfault"] == 2, "one reuse fault per page"
    v1 = view(p, mem, 2 * PAGE_SIZE)
    assert np.array_equal(v1.pfn, v0.pfn) and (v1.fid == fid).all()
    assert v1.writable.all() and v1.ae.all()
    assert (k.folios.large[fid], k.folios.refcount[fid]) == (2, 2)
    model.verify()


# =============================================================================================
# Anon THP collapse (cow.c's anon_thp_test_cases), under every kernel build
# =============================================================================================
@dataclass(frozen=True)
class CollapseCase:
    id: str
    before_fork: bool         # MADV_COLLAPSE before fork() (nothing shared yet) or after it
    dontfork: str | None      # the half the parent MADV_DONTFORKs before fork(): "lower", "upper" or None
    doc: str


COLLAPSE_CASES = [
    CollapseCase("collapse-before-fork", True, None,
                 "cow.c 'Basic COW after fork() when collapsing before fork()'"),
    CollapseCase("collapse-after-fork-fully-shared", False, None,
                 "cow.c '... when collapsing after fork() (fully shared)'"),
    CollapseCase("collapse-after-fork-lower-shared", False, "upper",
                 "cow.c '... when collapsing after fork() (lower shared)': the upper half is not forked"),
    CollapseCase("collapse-after-fork-upper-shared", False, "lower",
                 "cow.c '... when collapsing after fork() (upper shared)': the lower half is not forked"),
]


def _collapse(k: Kernel, p: Process, mem: int, size: int) -> None:
    """MADV_COLLAPSE of the PTE-mapped THP at mem: one new THP, PMD-mapped, exclusive and writable.

    collapse_huge_page() copies the pages into a new THP and drops only this
    mm's mappings of the old ones; the new PMD is made writable and the folio
    AnonExclusive (a fresh copy is exclusive whoever else maps the old pages).
    """
    old = view(p, mem, size)
    before = k.vmstat_snapshot()
    p.madvise(mem, size, MADV_COLLAPSE)
    d = vmstat_delta(k, before)
    assert d["thp_collapse_alloc"] == 1 and d["thp_collapse_alloc_failed"] == 0
    v = view(p, mem, size)
    assert v.leaf.all() and (v.order == HPAGE_PMD_ORDER).all() and len(set(v.fid.tolist())) == 1
    assert v.writable.all() and v.ae.all(), "the collapsed THP must be exclusive and writable"
    assert not np.intersect1d(v.pfn, old.pfn).size, "an anonymous collapse copies into a new THP"


def _assert_collapse_oopses(k: Kernel, p: Process, mem: int, size: int) -> None:
    """The 2026 series as posted (v1): collapse_huge_page() hands map_anon_folio_pmd_nopf() a
    vm_fault without .pmd; with page_table_check (check=True) the PMD store oopses in
    __page_table_check_pmds_set() (tests/test_series_oops.py), and the kernel is dead."""
    with pytest.raises(KernelOops) as ei:
        p.madvise(mem, size, MADV_COLLAPSE)
    e = ei.value
    assert e.function == "__page_table_check_pmds_set" and "collapse_huge_page" in e.stack
    assert k.oops is e


@pytest.mark.parametrize("case", COLLAPSE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("build", COW_BUILDS)
def test_anon_thp_collapse(build: str, case: CollapseCase) -> None:
    """cow.c's do_test_anon_thp_collapse(): COW around an in-place MADV_COLLAPSE of an anon THP.

    A PMD THP is PTE-mapped (mprotect() of one page R/O and back) and filled.
    Either it is collapsed before fork() (the child then shares the new THP),
    or fork() shares all of it, or only its lower or upper half (the parent
    MADV_DONTFORKs the other half, so the child has no mapping there), and
    after fork() the parent MADV_DOFORKs the whole range again (the VMAs merge,
    which the collapse needs) and collapses it while the child still maps
    the old pages.  As in cow.c the child backs up its part first, the parent
    then writes 0xff over the whole range and the child must still read its
    backup; beyond cow.c the child then writes its part and the parent must
    keep its 0xff.

    Collapsing after fork() copies the shared pages into a THP of the
    parent's own (khugepaged enforces max_ptes_shared, MADV_COLLAPSE does
    not): the parent's write takes no fault, the child's mappings are left as
    they were, and the old folio, then mapped by the child alone, is reused
    by the child's writes (__wp_can_reuse_large_anon_folio(): every
    reference is a mapping of one mm) rather than copied; with only half of
    it still mapped it waits on the deferred split queue.  Collapsing before
    fork() gives an exclusive PMD THP that fork() then shares like any other:
    the parent's write COWs it (how is the build's decision; upstream splits
    the PMD and copies 4 KiB per page) and the child's write reuses the PMD
    once the parent's writes took every page off it.

    Under thp-cow-v1 (the series as posted) the collapse oopses instead.
    """
    k, p, _mmap_mem, mem, size = _populate_thp(HPAGE_PMD_ORDER, build=build)
    half = size // 2
    p.mprotect(mem + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    p.mprotect(mem + PAGE_SIZE, PAGE_SIZE, PROT_READ | PROT_WRITE)
    v0 = view(p, mem, size)
    assert not v0.leaf.any() and v0.ae.all() and v0.writable.all() and len(set(v0.fid.tolist())) == 1
    old_fid = int(v0.fid[0])
    oopses = k.build.series == "v1"
    model = Model()
    model.track(p, mem, size, FILL)
    if case.before_fork:
        if oopses:
            _assert_collapse_oopses(k, p, mem, size)
            return
        _collapse(k, p, mem, size)
        assert not k.folios.used[old_fid], "the old THP, mapped by nobody now, must be freed"
    unshared = {"lower": (mem, half), "upper": (mem + half, half), None: None}[case.dontfork]
    if unshared:
        p.madvise(*unshared, MADV_DONTFORK)
    child = model.fork(p)
    shared_lo, shared_size = mem, size
    if unshared:
        model.untrack(child, *unshared)
        with pytest.raises(SegmentationFault):
            child.read(unshared[0])
        shared_lo = mem + half if case.dontfork == "lower" else mem
        shared_size = half
    before = k.vmstat_snapshot()
    model.verify(only=child)                  # cow.c: the child backs up its part first
    assert vmstat_delta(k, before)["pgfault"] == 0
    cv0 = view(child, shared_lo, shared_size)
    assert not cv0.writable.any() and not cv0.ae.any()
    if not case.before_fork:
        if unshared:
            p.madvise(mem, size, MADV_DOFORK)
            vma = p.mm.find_vma(mem)
            assert (vma.start, vma.end) == (mem, mem + size), "MADV_DOFORK did not merge the VMAs back"
        if oopses:
            _assert_collapse_oopses(k, p, mem, size)
            return
        _collapse(k, p, mem, size)
        cv = view(child, shared_lo, shared_size)
        assert np.array_equal(cv.pfn, cv0.pfn) and (cv.fid == old_fid).all(), \
            "the parent's collapse must leave the child's mappings alone"
        f = k.folios
        assert f.used[old_fid] and f.large[old_fid] == shared_size // PAGE_SIZE
        assert f.refcount[old_fid] == f.large[old_fid], "only the child's mappings may hold the old THP"
        # (every anon PMD THP is on the deferred split queue since its fault, for the underused
        # shrinker; being partially mapped is what the flag says)
        assert bool(f.flags[old_fid] & PG_PARTIALLY_MAPPED) == bool(unshared), \
            "the old THP is partially mapped exactly when only half of it was shared"
        assert old_fid in k.deferred
    model.verify(only=child)

    # The parent writes 0xff over the whole range; the child must still read its backup.
    pv0 = view(p, mem, size)
    before = k.vmstat_snapshot()
    model.write(p, mem, size, PARENT_TOKEN)
    d = vmstat_delta(k, before)
    pv = view(p, mem, size)
    cv = view(child, shared_lo, shared_size)
    assert pv.writable.all() and pv.ae.all()
    assert not np.intersect1d(pv.pfn, cv.pfn).size, "parent and child still share a frame"
    assert np.array_equal(cv.pfn, cv0.pfn), "the parent's write must not touch the child's mappings"
    if case.before_fork:
        assert cv.leaf.all(), "the child keeps its PMD mapping of the collapsed THP"
        if build == "upstream":
            assert (d["pgfault"], d["thp_split_pmd"], d["sim_cow_pages"], d["thp_fault_alloc"]) == \
                (size // PAGE_SIZE, 1, size // PAGE_SIZE, 0)
    else:
        assert d["pgfault"] == 0 and d["sim_cow_pages"] == 0, "the collapsed THP is the parent's own"
        assert np.array_equal(pv.pfn, pv0.pfn) and pv.leaf.all()
    model.verify(only=child)

    # The child writes its part; the parent must keep its 0xff.
    npages = shared_size // PAGE_SIZE
    before = k.vmstat_snapshot()
    model.write(child, shared_lo, shared_size, CHILD_TOKEN)
    d = vmstat_delta(k, before)
    cv = view(child, shared_lo, shared_size)
    assert cv.writable.all() and cv.ae.all() and np.array_equal(cv.pfn, cv0.pfn), \
        "the child maps the old pages alone: they must be reused, not copied"
    assert d["sim_cow_pages"] == 0 and d["thp_split_pmd"] == 0
    if case.before_fork:
        assert cv.leaf.all() and d["pgfault"] == 1, "one fault reuses the child's whole PMD"
    else:
        assert d["pgfault"] == npages and d["pgreuse"] == npages
    assert np.array_equal(view(p, mem, size).pfn, pv.pfn)
    model.verify()


# =============================================================================================
# Non-anon backings and bodies (cow.c's non_anon_test_cases without GUP)
# =============================================================================================
@dataclass
class NonAnon:
    proc: Process
    mem: int          # private writable mapping
    smem: int         # the other (read-only) mapping of the same page
    size: int
    huge: bool


def zeropage() -> NonAnon:
    """cow.c 'with shared zeropage': RW and RO private mappings, read-populated."""
    k = Kernel(ram=SMALL_RAM, check=True)
    p = k.spawn()
    mem = p.mmap(PAGE_SIZE)
    smem = p.mmap(PAGE_SIZE, prot=PROT_READ)
    for a in (mem, smem):
        assert p.read(a, 1).tolist() == [0] and populated(p, a)
        assert view(p, a, PAGE_SIZE).pfn.tolist() == [ZERO_PFN]
    assert p.mm.rss_anon == 0
    return NonAnon(p, mem, smem, PAGE_SIZE, huge=False)


def huge_zeropage() -> NonAnon:
    """cow.c 'with huge zeropage': two aligned 2 MiB areas, MADV_HUGEPAGE, read-populated."""
    k = Kernel(ram=THP_RAM, check=True)
    p = k.spawn()
    mmap_mem = p.mmap(2 * HPAGE_PMD_SIZE)
    mmap_smem = p.mmap(2 * HPAGE_PMD_SIZE, prot=PROT_READ)
    mem = (mmap_mem + HPAGE_PMD_SIZE) & ~(HPAGE_PMD_SIZE - 1)
    smem = (mmap_smem + HPAGE_PMD_SIZE) & ~(HPAGE_PMD_SIZE - 1)
    p.madvise(mem, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    p.madvise(smem, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    for a in (mem, smem):
        assert p.read(a, 1).tolist() == [0]
        assert populated(p, a + PAGE_SIZE), "did not get the huge zero page populated"
        s = p.mm.pt.slot_of[a >> (PAGE_SHIFT + 9)]
        assert p.mm.pt.pmd_kind[s] == PMD_LEAF and k.folios.flags[p.mm.pt.pmd_folio[s]] & PG_HUGE_ZERO
    assert k.vmstat_snapshot()["thp_zero_page_alloc"] == 1
    assert p.mm.rss_anon == 0
    return NonAnon(p, mem, smem, HPAGE_PMD_SIZE, huge=True)


def body_basic_cow(na: NonAnon) -> None:
    """cow.c non-anon "Basic COW": writing the private mapping must not change the other one.

    A write to the shared zero page allocates a fresh page (wp_page_copy() from
    the zero page, MM_ANONPAGES +1); a write to the huge zero PMD allocates a
    fresh THP (do_huge_zero_wp_pmd(): thp_fault_alloc +1, no PMD split).
    """
    p, k = na.proc, na.proc.kernel
    model = Model()
    model.track(p, na.mem, na.size, 0)
    model.track(p, na.smem, na.size, 0)
    model.verify()
    before = k.vmstat_snapshot()
    rss = p.mm.rss_anon
    model.write(p, na.mem, na.size, PARENT_TOKEN)
    npages = na.size // PAGE_SIZE
    assert p.mm.rss_anon - rss == npages, "the private write must allocate new memory"
    v = view(p, na.mem, na.size)
    assert (v.pfn != ZERO_PFN).all() and v.writable.all() and v.ae.all()
    sv = view(p, na.smem, na.size)
    if na.huge:
        assert v.leaf.all() and (v.order == HPAGE_PMD_ORDER).all()
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 1
        assert vmstat_delta(k, before)["thp_split_pmd"] == 0
        assert sv.leaf.all() and k.folios.flags[int(p.mm.pt.pmd_folio[p.mm.pt.slot_of[na.smem >> 21]])] & PG_HUGE_ZERO
    else:
        assert sv.pfn.tolist() == [ZERO_PFN]
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 0
    model.verify()


NON_ANON_BACKINGS = [pytest.param(zeropage, id="shared-zeropage"),
                     pytest.param(huge_zeropage, id="huge-zeropage")]
NON_ANON_BODIES = [pytest.param(body_basic_cow, id="basic-cow")]


@pytest.mark.parametrize("body", NON_ANON_BODIES)
@pytest.mark.parametrize("setup", NON_ANON_BACKINGS)
def test_non_anon_cow(setup: Callable[[], NonAnon], body: Callable[[NonAnon], None]) -> None:
    body(setup())


# =============================================================================================
# kernel-semantics.md §12.5: the worked trace, exact numbers
# =============================================================================================
def test_worked_trace_12_5(k: Kernel, p: Process) -> None:
    """§12.5 (baseline kernel, CONFIG_PAGE_MAPCOUNT): fault a THP, fork, the child writes X+4K, exit.

    Guards the v5.8 COW semantics for anon THP (split the PMD, copy 4 KiB),
    per-page Pss/kpagecount accounting of a PMD-mapped THP, and the PMD
    refcount==1 reuse once the child is gone.
    """
    area = p.mmap(4 << 20)                              # enabled=madvise, PMD=inherit
    X = (area + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
    p.madvise(X, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    p.write(X, HPAGE_PMD_SIZE, token=FILL)
    s = k.vmstat_snapshot()
    assert (s["thp_fault_alloc"], s["thp_split_pmd"]) == (1, 0)
    assert k.vmstat.mthp_stat(HPAGE_PMD_ORDER, "anon_fault_alloc") == 1
    f = p.smaps_fields(X)
    assert (f["Rss"], f["Pss"], f["Private_Dirty"], f["AnonHugePages"]) == (2048, 2048, 2048, 2048)
    assert int(p.pagemap(X, 1)[0]) & task_mmu.PM_MMAP_EXCLUSIVE
    meminfo = k.meminfo_anon_huge_kb()

    model = Model()
    model.track(p, X, HPAGE_PMD_SIZE, FILL)
    c = model.fork(p)
    fid = int(p.mm.pt.pmd_folio[p.mm.pt.slot_of[X >> 21]])
    head = int(k.folios.head[fid])
    for proc in (p, c):
        f = proc.smaps_fields(X)
        assert (f["Rss"], f["Pss"], f["Shared_Dirty"], f["AnonHugePages"]) == (2048, 1024, 2048, 2048)
        assert not int(proc.pagemap(X, 1)[0]) & task_mmu.PM_MMAP_EXCLUSIVE
    assert (task_mmu.kpagecount(k, np.arange(head, head + 512)) == 2).all()
    assert k.meminfo_anon_huge_kb() == meminfo, "meminfo AnonHugePages counts the folio once"

    before = k.vmstat_snapshot()
    model.write(c, X + PAGE_SIZE, 1, CHILD_TOKEN)
    assert vmstat_delta(k, before)["pgfault"] == 1
    assert k.vmstat_snapshot()["thp_split_pmd"] == 1
    moved = {n for n in ("thp_fault_alloc", "thp_fault_fallback", "thp_split_page", "thp_split_page_failed",
                         "thp_deferred_split_page", "thp_zero_page_alloc") if vmstat_delta(k, before)[n]}
    assert not moved, f"no other THP counter may move: {moved}"
    f = c.smaps_fields(X)
    assert (f["Rss"], f["AnonHugePages"], f["Pss"], f["Shared_Dirty"], f["Private_Dirty"]) == (2048, 0, 1026, 2044, 4)
    pm = c.pagemap(X, 2).astype(np.int64)
    assert int(pm[1]) & task_mmu.PM_MMAP_EXCLUSIVE, "the child's new page is exclusive"
    assert not int(pm[0]) & task_mmu.PM_MMAP_EXCLUSIVE, "the THP pages are maybe-shared"
    f = p.smaps_fields(X)
    assert (f["Rss"], f["AnonHugePages"], f["Pss"], f["Private_Dirty"]) == (2048, 2048, 1026, 4)
    kc = task_mmu.kpagecount(k, np.arange(head, head + 512))
    assert int(np.count_nonzero(kc == 2)) == 511 and int(np.count_nonzero(kc == 1)) == 1 and kc[1] == 1
    assert (k.folios.refcount[fid], k.folios.entire[fid], k.folios.large[fid]) == (512, 1, 512)
    assert not k.folios.flags[fid] & PG_PARTIALLY_MAPPED, "no deferred split while the parent PMD-maps it"
    model.verify()

    model.exit(c)
    assert k.folios.refcount[fid] == 1
    before = k.vmstat_snapshot()
    model.write(p, X + 8 * PAGE_SIZE, 1, PARENT_TOKEN)
    assert vmstat_delta(k, before)["thp_split_pmd"] == 0, "the parent's write after the child exit must not split"
    assert vmstat_delta(k, before)["sim_cow_pages"] == 0
    s = p.mm.pt.slot_of[X >> 21]
    assert p.mm.pt.pmd_kind[s] == PMD_LEAF and int(p.mm.pt.pmd_folio[s]) == fid
    assert p.mm.pt.pmd_flags[s] & _PAGE_RW and k.mem.pflags[head] & PG_ANON_EXCLUSIVE
    model.verify()
