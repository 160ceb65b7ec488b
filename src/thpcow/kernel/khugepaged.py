"""Model of mm/khugepaged.c: the collapse engine shared by khugepaged and MADV_COLLAPSE.

``collapse_scan_pmd()`` checks one 2 MiB block's PTEs against the limits of
the caller (:class:`CollapseControl`: khugepaged enforces ``max_ptes_none``,
``max_ptes_swap``, ``max_ptes_shared`` and the referenced test, which asks
for half the block young when it has swap entries; MADV_COLLAPSE does not),
and ``collapse_huge_page()`` allocates a THP, faults the swapped-out pages
back in (``__collapse_huge_page_swapin()``), copies the pages (empty and
zero-page entries become zero-filled pages), drops this mm's mappings of the
old pages and installs the new THP at PMD level, exclusive to this mm: other
mms that shared the old pages keep them.  ``madvise_collapse()`` is the
synchronous MADV_COLLAPSE.

Simplification: v6.18 collapses to PMD order only (mTHP collapse came later).
"""

from __future__ import annotations

import enum
import errno as E
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .constants import ALIGN, HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PFN_PHYS
from .errors import KernelError, OutOfMemory
from .folio import PG_REFERENCED, PG_SWAPBACKED
from .page_alloc import GFP_TRANSHUGE, GFP_TRANSHUGE_LIGHT, alloc_thp
from .mm import MM, PMD_LEAF, PMD_TABLE, VMA, _PAGE_ACCESSED, _PAGE_SPECIAL, pmd_index
from . import huge_memory as hm
from . import pgtable, rmap

if TYPE_CHECKING:
    from .kernel import Kernel


class ScanResult(enum.Enum):
    """Model of enum scan_result (the values thpcow can produce)."""

    SCAN_FAIL = enum.auto()
    SCAN_SUCCEED = enum.auto()
    SCAN_PMD_NULL = enum.auto()
    SCAN_PMD_MAPPED = enum.auto()
    SCAN_EXCEED_NONE_PTE = enum.auto()
    SCAN_EXCEED_SWAP_PTE = enum.auto()
    SCAN_EXCEED_SHARED_PTE = enum.auto()
    SCAN_PAGE_LAZYFREE = enum.auto()
    SCAN_LACK_REFERENCED_PAGE = enum.auto()
    SCAN_PAGE_COUNT = enum.auto()
    SCAN_VMA_CHECK = enum.auto()
    SCAN_ALLOC_HUGE_PAGE_FAIL = enum.auto()


# Results after which MADV_COLLAPSE goes on with the next block.
_CONTINUE = {ScanResult.SCAN_PMD_NULL, ScanResult.SCAN_LACK_REFERENCED_PAGE, ScanResult.SCAN_PAGE_COUNT}


def madvise_collapse_errno(r: ScanResult) -> int:
    """Model of madvise_collapse_errno(): one errno per scan result."""
    if r == ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL:
        return E.ENOMEM
    if r == ScanResult.SCAN_EXCEED_NONE_PTE:
        return E.EBUSY
    if r == ScanResult.SCAN_PAGE_COUNT:
        return E.EAGAIN
    return E.EINVAL


@dataclass
class CollapseControl:
    """Model of struct collapse_control: who collapses, and with which limits."""

    is_khugepaged: bool

    def max_ptes_none(self, k: Kernel) -> int:
        return k.sysfs.max_ptes_none if self.is_khugepaged else HPAGE_PMD_NR

    def max_ptes_swap(self, k: Kernel) -> int:
        return k.sysfs.max_ptes_swap if self.is_khugepaged else HPAGE_PMD_NR

    def max_ptes_shared(self, k: Kernel) -> int:
        return k.sysfs.max_ptes_shared if self.is_khugepaged else HPAGE_PMD_NR


def _nr_maybe_shared(k: Kernel, pfns: np.ndarray) -> int:
    """How many of these mapped pages folio_maybe_mapped_shared() calls shared."""
    return int(np.count_nonzero(k.folios.maybe_mapped_shared_many(k.mem.folio[pfns], k.mem.mapcount[pfns])))


def collapse_scan_pmd(k: Kernel, mm: MM, vma: VMA, haddr: int, cc: CollapseControl) -> ScanResult:
    """Model of collapse_scan_pmd() for anonymous memory (PMD order)."""
    pt = mm.pt
    s = pt.slot_of.get(pmd_index(haddr))
    if s is None or pt.pmd_kind[s] == 0:
        return ScanResult.SCAN_PMD_NULL
    if pt.pmd_kind[s] == PMD_LEAF:
        return ScanResult.SCAN_PMD_MAPPED
    row = int(pt.pmd_row[s])
    pfns = pt.pte_pfn[row]
    flags = pt.pte_flags[row]
    none_or_zero = (pfns == -1) | (flags & _PAGE_SPECIAL).astype(bool)
    if int(none_or_zero.sum()) > cc.max_ptes_none(k):
        k.vmstat.count_vm_event("thp_scan_exceed_none_pte")
        return ScanResult.SCAN_EXCEED_NONE_PTE
    swp = pfns <= -2
    nr_swap = int(np.count_nonzero(swp))
    if nr_swap > cc.max_ptes_swap(k):
        k.vmstat.count_vm_event("thp_scan_exceed_swap_pte")
        return ScanResult.SCAN_EXCEED_SWAP_PTE
    present = ~none_or_zero & ~swp
    p = pfns[present]
    fids = k.mem.folio[p]
    f = k.folios
    if cc.is_khugepaged and (~(f.flags[fids] & PG_SWAPBACKED).astype(bool)).any():
        return ScanResult.SCAN_PAGE_LAZYFREE
    if _nr_maybe_shared(k, p) > cc.max_ptes_shared(k):
        k.vmstat.count_vm_event("thp_scan_exceed_share_pte")
        return ScanResult.SCAN_EXCEED_SHARED_PTE
    uf = np.unique(fids)
    if (f.refcount[uf] != f.expected_ref_count(uf, k.mem.mapcount[f.head[uf]])).any():   # is_refcount_suitable()
        return ScanResult.SCAN_PAGE_COUNT
    if cc.is_khugepaged:
        # A page counts as referenced when its PTE is young or its folio has PG_referenced
        # (folio_test_young() is idle-page tracking's, never set here; no secondary MMUs).
        # Optimization: the folio flags are looked at only when the young PTEs are not enough.
        young = (flags[present] & _PAGE_ACCESSED).astype(bool)
        referenced = int(np.count_nonzero(young))
        if not referenced or (nr_swap and referenced < HPAGE_PMD_NR // 2):
            referenced = int(np.count_nonzero(young | (f.flags[fids] & PG_REFERENCED).astype(bool)))
        if not referenced or (nr_swap and referenced < HPAGE_PMD_NR // 2):
            return ScanResult.SCAN_LACK_REFERENCED_PAGE
    return ScanResult.SCAN_SUCCEED


def collapse_huge_page(k: Kernel, mm: MM, vma: VMA, haddr: int, cc: CollapseControl) -> ScanResult:
    """Model of collapse_huge_page(): allocate, copy, unmap the old pages, map a THP.

    Counts thp_collapse_alloc or thp_collapse_alloc_failed; MM_ANONPAGES grows
    by the number of entries that were empty or the zero page; the old page
    table becomes the new PMD's deposit (nr_ptes unchanged).
    """
    # alloc_hugepage_khugepaged_gfpmask(); MADV_COLLAPSE always may stall
    direct = k.sysfs.khugepaged_defrag if cc.is_khugepaged else True
    pfn = alloc_thp(k, GFP_TRANSHUGE if direct else GFP_TRANSHUGE_LIGHT)
    if pfn < 0:
        k.vmstat.count_vm_event("thp_collapse_alloc_failed")
        return ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL
    k.vmstat.count_vm_event("thp_collapse_alloc")
    k.vmstat.count_vm_event("sim_collapse_bytes", HPAGE_PMD_SIZE)
    new = k.new_folio(pfn, HPAGE_PMD_ORDER)
    if not hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER,
                                      hm.TVA_KHUGEPAGED if cc.is_khugepaged else hm.TVA_FORCED_COLLAPSE):
        rmap.free_folio(k, new)
        return ScanResult.SCAN_VMA_CHECK
    pt = mm.pt
    s = pt.slot_of[pmd_index(haddr)]
    row = int(pt.pmd_row[s])
    # __collapse_huge_page_swapin(): fault the swapped pages back in first.  A fault that
    # fails ends the collapse (SCAN_FAIL); the pages already swapped in stay.
    from .memory import do_swap_page
    for i in np.flatnonzero(pt.pte_pfn[row] <= -2).tolist():
        try:
            do_swap_page(k, mm, vma, haddr + PFN_PHYS(i), row, write=False)
        except OutOfMemory:
            rmap.free_folio(k, new)
            return ScanResult.SCAN_FAIL
    pfns = pt.pte_pfn[row].copy()
    flags = pt.pte_flags[row].copy()
    normal = (pfns >= 0) & ~(flags & _PAGE_SPECIAL).astype(bool)
    # __collapse_huge_page_isolate() counts maybe-shared pages again: a page swapped in just now
    # may be mapped by another process too (a swap cache hit).
    if cc.is_khugepaged and _nr_maybe_shared(k, pfns[normal]) > cc.max_ptes_shared(k):
        k.vmstat.count_vm_event("thp_scan_exceed_share_pte")
        rmap.free_folio(k, new)
        return ScanResult.SCAN_EXCEED_SHARED_PTE
    from .memory import copy_user_large_folio
    copy_user_large_folio(k, np.arange(pfn, pfn + HPAGE_PMD_NR), np.where(normal, pfns, -1))   # none/zero: cleared
    # pmdp_collapse_flush(), then unmap the old pages from this mm
    # (__collapse_huge_page_copy_succeeded(): each PTE is cleared, then its page unmapped).
    pgtable.pmdp_collapse_flush(k, mm, s)
    pgtable.clear_ptes(k, mm, row, 0, HPAGE_PMD_NR)
    idx = np.flatnonzero(normal)
    from .memory import VmFault, unmap_pages
    unmap_pages(k, mm, pfns[idx])                 # MM_ANONPAGES -= len(idx)
    pt.free_row(row)                              # the old table becomes the deposit
    # series thp_cow v1 4/5 builds this vm_fault without .pmd (a NULL pointer
    # that set_pmd_at() oopses on); the series as meant sets it.
    vmf = VmFault(mm, vma, haddr, 0, pmd=None if k.build.series == "v1" else s)
    hm.map_anon_folio_pmd_nopf(k, new, vmf, False)
    mm.rss_anon += HPAGE_PMD_NR                   # MM_ANONPAGES grows by the empty/zero entries
    if cc.is_khugepaged:
        k.khugepaged_counters["pages_collapsed"] += 1
    return ScanResult.SCAN_SUCCEED


def collapse_single_pmd(k: Kernel, mm: MM, vma: VMA, haddr: int, cc: CollapseControl) -> ScanResult:
    result = collapse_scan_pmd(k, mm, vma, haddr, cc)
    if result == ScanResult.SCAN_SUCCEED:
        result = collapse_huge_page(k, mm, vma, haddr, cc)
    return result


def madvise_collapse(k: Kernel, mm: MM, start: int, end: int) -> None:
    """Model of madvise_collapse(): synchronous collapse of every aligned 2 MiB block.

    Ignores the sysfs THP masks but honours VM_NOHUGEPAGE and PR_SET_THP_DISABLE
    (EINVAL), uses direct reclaim/compaction whatever ``defrag`` says, and
    applies no max_ptes_* limits.  Succeeds when every block ends up
    PMD-mapped, otherwise fails with the errno of the last failure.
    """
    cc = CollapseControl(is_khugepaged=False)
    for vma in mm.vmas_in(start, end):
        if not hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, hm.TVA_FORCED_COLLAPSE):
            raise KernelError(E.EINVAL, "madvise(MADV_COLLAPSE)",
                              f"addr={vma.start:#x}: the mapping is not eligible for THP")
    hstart = ALIGN(start, HPAGE_PMD_SIZE)
    hend = end & HPAGE_PMD_MASK
    thps = 0
    last_fail = ScanResult.SCAN_FAIL
    for haddr in range(hstart, hend, HPAGE_PMD_SIZE):
        vma = mm.find_vma(haddr)
        if vma is None or vma.end < haddr + HPAGE_PMD_SIZE:
            last_fail = ScanResult.SCAN_VMA_CHECK
            break
        result = collapse_single_pmd(k, mm, vma, haddr, cc)
        if result in (ScanResult.SCAN_SUCCEED, ScanResult.SCAN_PMD_MAPPED):
            thps += 1
            continue
        last_fail = result
        if result not in _CONTINUE:
            break
    # The kernel compares thps with (hend - hstart) >> HPAGE_PMD_SHIFT in unsigned arithmetic:
    # a range inside one block whose rounded start lies past its rounded end never matches
    # (EINVAL from last_fail = SCAN_FAIL), while hstart == hend (no whole block) succeeds.
    want = (hend - hstart) // HPAGE_PMD_SIZE if hend >= hstart else -1
    if thps != want:
        err = madvise_collapse_errno(last_fail)
        raise KernelError(err, "madvise(MADV_COLLAPSE)",
                          f"addr={start:#x} length={end - start:#x}: {last_fail.name}")


# -- registration ---------------------------------------------------------------------------------------
def hugepage_pmd_enabled(k: Kernel) -> bool:
    """Model of hugepage_pmd_enabled(): PMD-order THP is possible somewhere."""
    return bool(k.sysfs.anon_orders(True) & (1 << HPAGE_PMD_ORDER))


def __khugepaged_enter(k: Kernel, mm: MM) -> None:
    """Model of __khugepaged_enter(): put the mm on khugepaged's list once."""
    if not mm.khugepaged:
        mm.khugepaged = True
        k.khugepaged_mms[mm.pid] = None


def khugepaged_enter_vma(k: Kernel, mm: MM, vma: VMA) -> None:
    """Model of khugepaged_enter_vma(): register when the VMA could be collapsed."""
    if mm.khugepaged or not hugepage_pmd_enabled(k):
        return
    if hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, hm.TVA_KHUGEPAGED):
        __khugepaged_enter(k, mm)


def khugepaged_fork(k: Kernel, child: MM, parent: MM) -> None:
    """Model of khugepaged_fork(): a child of a registered mm is registered too."""
    if parent.khugepaged:
        __khugepaged_enter(k, child)


# -- the khugepaged daemon ------------------------------------------------------------------------------
class Khugepaged:
    """Model of the khugepaged kthread: a scan cursor over the registered mms.

    Each wakeup is one ``khugepaged_do_scan()`` pass with a budget of
    ``pages_to_scan`` progress units: +1 per mm visited, +1 per ineligible VMA,
    +1 per PMD that is empty or already huge, +512 per PTE table examined.
    The cursor (mm, address) persists between passes; wrapping past the last
    mm counts ``full_scans``.  A failed THP allocation sleeps
    ``alloc_sleep_millisecs`` and retries; a second failure ends the pass.
    Between passes it sleeps ``scan_sleep_millisecs``.  It runs only while PMD
    THP is enabled somewhere (``hugepage_pmd_enabled()``).

    Simplification: a pass takes no simulated time.
    """

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.cursor_pid: int | None = None
        self.cursor_addr = 0
        self.running = False
        self.generation = 0
        self.hint: dict[tuple[int, int], None] = {}     # directed scanning (a policy's hints)
        self.passes = 0

    # -- start / stop (start_stop_khugepaged) -------------------------------------------
    def start_stop(self) -> None:
        from .clock import NSEC_PER_MSEC
        if hugepage_pmd_enabled(self.k):
            if not self.running:
                self.running = True
                self.generation += 1
                gen = self.generation
                self.k.clock.schedule(self.k.clock.now + self.k.sysfs.scan_sleep_millisecs * NSEC_PER_MSEC,
                                      lambda: self.wakeup(gen))
        else:
            self.running = False

    def kick(self) -> None:
        """wake_up_interruptible(&khugepaged_wait): scan now, then sleep the new interval."""
        if self.running:
            self.generation += 1
            gen = self.generation
            self.k.clock.schedule(self.k.clock.now, lambda: self.wakeup(gen))

    def wakeup(self, gen: int | None = None) -> None:
        from .clock import NSEC_PER_MSEC
        if not self.running or (gen is not None and gen != self.generation):
            return                                   # a stale timer: a kick replaced it
        sleep_ms = self.do_scan()
        gen = self.generation
        self.k.clock.schedule(self.k.clock.now + sleep_ms * NSEC_PER_MSEC, lambda: self.wakeup(gen))

    # -- one pass --------------------------------------------------------------------------------
    def do_scan(self) -> int:
        """Model of khugepaged_do_scan(): one pass; returns the milliseconds to sleep after it."""
        k = self.k
        self.passes += 1
        budget = k.sysfs.pages_to_scan
        alloc_failures = 0
        cc = CollapseControl(is_khugepaged=True)
        progress, failed = self._scan_hints(cc, budget)
        if failed:
            return k.sysfs.alloc_sleep_millisecs
        while progress < budget:
            mms = [pid for pid in k.khugepaged_mms if pid in k.procs]
            for pid in list(k.khugepaged_mms):
                if pid not in k.procs:
                    del k.khugepaged_mms[pid]
            if not mms:
                break
            if self.cursor_pid not in k.khugepaged_mms:
                self.cursor_pid, self.cursor_addr = mms[0], 0
            mm = k.procs[self.cursor_pid].mm
            progress += 1
            result, progress = self._scan_mm(mm, cc, progress, budget)
            if result == ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL:
                alloc_failures += 1
                if alloc_failures >= 2:
                    break
                return k.sysfs.alloc_sleep_millisecs
            if result is None:                       # this mm is done: next mm
                i = mms.index(self.cursor_pid)
                if i + 1 < len(mms):
                    self.cursor_pid, self.cursor_addr = mms[i + 1], 0
                else:
                    self.cursor_pid, self.cursor_addr = mms[0], 0
                    k.khugepaged_counters["full_scans"] += 1
                    break                            # at most one wrap per pass
        return k.sysfs.scan_sleep_millisecs

    def _scan_hints(self, cc: CollapseControl, budget: int) -> tuple[int, bool]:
        """Directed scanning (not in 6.18): PMDs a COW split just left behind come first.

        Each hint costs a PTE table's worth of progress; it is dropped once the
        block is huge again or cannot be scanned, kept while the limits refuse
        it (e.g. pages still shared with a child).  Returns (progress, whether a
        THP allocation failed).
        """
        k = self.k
        progress = 0
        for key in list(self.hint):
            if progress >= budget:
                break
            pid, haddr = key
            proc = k.procs.get(pid)
            vma = proc.mm.find_vma(haddr) if proc else None
            if vma is None or vma.end < haddr + HPAGE_PMD_SIZE or \
                    not hm.thp_vma_allowable_order(k, proc.mm, vma, HPAGE_PMD_ORDER, hm.TVA_KHUGEPAGED):
                del self.hint[key]
                continue
            progress += HPAGE_PMD_NR
            result = collapse_single_pmd(k, proc.mm, vma, haddr, cc)
            if result == ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL:
                return progress, True
            if result in (ScanResult.SCAN_SUCCEED, ScanResult.SCAN_PMD_MAPPED, ScanResult.SCAN_PMD_NULL):
                del self.hint[key]
        return progress, False

    def _scan_mm(self, mm: MM, cc: CollapseControl, progress: int, budget: int):
        """Model of khugepaged_scan_mm_slot(): scan from the cursor until the budget is spent.

        Returns (last result or None when the mm was scanned to its end, progress).
        """
        k = self.k
        for vma in list(mm.vmas):
            if vma.end <= self.cursor_addr:
                continue
            if not hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, hm.TVA_KHUGEPAGED):
                progress += 1
                self.cursor_addr = vma.end
                if progress >= budget:
                    return ScanResult.SCAN_VMA_CHECK, progress
                continue
            hstart = max(ALIGN(vma.start, HPAGE_PMD_SIZE), self.cursor_addr & HPAGE_PMD_MASK)
            hend = vma.end & HPAGE_PMD_MASK
            for haddr in range(hstart, hend, HPAGE_PMD_SIZE):
                if progress >= budget:
                    return ScanResult.SCAN_SUCCEED, progress
                self.cursor_addr = haddr + HPAGE_PMD_SIZE
                pt = mm.pt
                s = pt.slot_of.get(pmd_index(haddr))
                if s is None or pt.pmd_kind[s] != PMD_TABLE:
                    progress += 1
                    continue
                progress += HPAGE_PMD_NR
                result = collapse_single_pmd(k, mm, vma, haddr, cc)
                if result == ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL:
                    self.cursor_addr = haddr           # retry this block after the sleep
                    return result, progress
            self.cursor_addr = vma.end
        return None, progress
