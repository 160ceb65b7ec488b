"""Model of mm/khugepaged.c: the collapse engine shared by khugepaged and MADV_COLLAPSE.

``collapse_scan_pmd()`` walks one 2 MiB block's PTEs in order, as
hpage_collapse_scan_pmd() does, against the limits of the caller
(:class:`CollapseControl`: khugepaged enforces ``max_ptes_none``,
``max_ptes_swap`` and ``max_ptes_shared``, each counted per PTE of the block,
and the referenced test, which asks for half the block young when it has swap
entries; MADV_COLLAPSE does not): the first PTE at which a limit or a check
fails decides the result.  ``collapse_huge_page()`` allocates a THP, faults
the swapped-out pages back in (``__collapse_huge_page_swapin()``), copies the
pages (empty and zero-page entries become zero-filled pages), drops this mm's
mappings of the old pages and installs the new THP at PMD level, exclusive to
this mm: other mms that shared the old pages keep them.
``madvise_collapse()`` is the synchronous MADV_COLLAPSE.

Which kernel's khugepaged (:class:`KhugepagedRules`, ``Kernel(khugepaged_rules=...)``):
Linux 6.18 by default.  Two later changes are options, both from the series
"mm: khugepaged: ..." by Vernon Yang, in mm-stable from March 2026 for the 7.1
merge window (I could not confirm the mainline hashes: the mm-stable ones
changed with each rebase; a19051983e95 and 94e014fc2e50 on 2026-03-26):

- ``refine_scan_progress`` ("mm: khugepaged: refine scan progress number"):
  an empty or PMD-mapped PMD costs 1 against ``pages_to_scan`` and a PTE table
  1 per PTE examined, instead of 6.18's HPAGE_PMD_NR for every PMD address;
- ``skip_lazyfree`` ("mm: khugepaged: skip lazy-free folios"): khugepaged
  leaves a block alone (SCAN_PAGE_LAZYFREE) when a PTE maps a clean lazyfree
  (MADV_FREE) page; 6.18 collapses such pages like any other.

Simplification: v6.18 collapses to PMD order only (mTHP collapse came later);
the source pages may be of any order (PTE-mapped THPs and mTHPs included).
"""

from __future__ import annotations

import enum
import errno as E
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .constants import ALIGN, HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PFN_PHYS
from .errors import KernelError, OutOfMemory
from .folio import PG_ANON, PG_REFERENCED, PG_SWAPBACKED
from .page_alloc import GFP_TRANSHUGE, GFP_TRANSHUGE_LIGHT, alloc_thp
from .mm import MM, PMD_LEAF, PMD_TABLE, VMA, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_SPECIAL, pmd_index
from . import huge_memory as hm
from . import pgtable, rmap

if TYPE_CHECKING:
    from .kernel import Kernel


# -- which kernel's khugepaged -----------------------------------------------------------------------
@dataclass(frozen=True)
class KhugepagedRules:
    """The khugepaged rules that changed after Linux 6.18 (see the module docstring).

    Made by :func:`khugepaged_rules` from a version name (``"6.18"``, the
    default, or ``"7.1"``, which has both later rules), optionally with
    overrides: ``"6.18:skip_lazyfree=1"``.
    """

    refine_scan_progress: bool = False
    skip_lazyfree: bool = False

    def __str__(self) -> str:
        for name, rules in KHUGEPAGED_VERSIONS.items():
            if rules == self:
                return name
        return "6.18:" + ",".join(f"{k}={int(v)}" for k, v in vars(self).items())


KHUGEPAGED_VERSIONS: dict[str, KhugepagedRules] = {
    "6.18": KhugepagedRules(),
    "7.1": KhugepagedRules(refine_scan_progress=True, skip_lazyfree=True),
}


def khugepaged_rules(spec: "KhugepagedRules | str | dict | None") -> KhugepagedRules:
    """``Kernel(khugepaged_rules=...)``: None (6.18), a version, ``"version:rule=0|1,..."``,
    a dict of rules over 6.18, or a :class:`KhugepagedRules`."""
    if spec is None:
        return KHUGEPAGED_VERSIONS["6.18"]
    if isinstance(spec, KhugepagedRules):
        return spec
    if isinstance(spec, dict):
        base, overrides = "6.18", {k: str(v) for k, v in spec.items()}
    else:
        from .builds import split_spec
        base, overrides = split_spec(str(spec), "khugepaged_rules")
    if base not in KHUGEPAGED_VERSIONS:
        raise ValueError(f"khugepaged_rules: unknown version {base!r}; known: {', '.join(KHUGEPAGED_VERSIONS)}")
    values = dict(vars(KHUGEPAGED_VERSIONS[base]))
    for key, text in overrides.items():
        if key not in values:
            raise ValueError(f"khugepaged_rules: unknown rule {key!r}; known: {', '.join(values)}")
        if text.lower() in ("1", "true", "yes", "on"):
            values[key] = True
        elif text.lower() in ("0", "false", "no", "off"):
            values[key] = False
        else:
            raise ValueError(f"khugepaged_rules: {key}={text!r} is not 0/1")
    return KhugepagedRules(**values)


class ScanResult(enum.Enum):
    """Model of enum scan_result (the values thpcow can produce)."""

    SCAN_FAIL = enum.auto()
    SCAN_SUCCEED = enum.auto()
    SCAN_PMD_NULL = enum.auto()
    SCAN_PMD_NONE = enum.auto()
    SCAN_PMD_MAPPED = enum.auto()
    SCAN_EXCEED_NONE_PTE = enum.auto()
    SCAN_EXCEED_SWAP_PTE = enum.auto()
    SCAN_EXCEED_SHARED_PTE = enum.auto()
    SCAN_PAGE_LAZYFREE = enum.auto()
    SCAN_LACK_REFERENCED_PAGE = enum.auto()
    SCAN_PAGE_COUNT = enum.auto()
    SCAN_VMA_CHECK = enum.auto()
    SCAN_ALLOC_HUGE_PAGE_FAIL = enum.auto()


# Results after which MADV_COLLAPSE goes on with the next block (6.18's list).  An empty PMD
# entry in an existing PMD table (SCAN_PMD_NONE) is not one of them: it ends the VMA's walk;
# only a block with no PMD table at all (SCAN_PMD_NULL) is passed over.
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
    """Model of struct collapse_control: who collapses, and with which limits.

    ``progress`` counts what the scans examined the way the later kernel's
    ``cc->progress`` does (1 per empty or PMD-mapped PMD, 1 per PTE looked at);
    khugepaged charges it to its budget under ``refine_scan_progress`` only.
    """

    is_khugepaged: bool
    progress: int = field(default=0, compare=False)

    def max_ptes_none(self, k: Kernel) -> int:
        return k.sysfs.max_ptes_none if self.is_khugepaged else HPAGE_PMD_NR

    def max_ptes_swap(self, k: Kernel) -> int:
        return k.sysfs.max_ptes_swap if self.is_khugepaged else HPAGE_PMD_NR

    def max_ptes_shared(self, k: Kernel) -> int:
        return k.sysfs.max_ptes_shared if self.is_khugepaged else HPAGE_PMD_NR


def _nr_maybe_shared(k: Kernel, pfns: np.ndarray) -> int:
    """How many of these mapped pages folio_maybe_mapped_shared() calls shared."""
    return int(np.count_nonzero(k.folios.maybe_mapped_shared_many(k.mem.folio[pfns], k.mem.mapcount[pfns])))


_NO_FAILURE = HPAGE_PMD_NR


def _first_over(mask: np.ndarray, limit: int) -> int:
    """The index of the PTE at which the running count of ``mask`` first exceeds ``limit``."""
    if limit >= HPAGE_PMD_NR:
        return _NO_FAILURE
    over = np.flatnonzero(np.cumsum(mask) > limit)
    return int(over[0]) if len(over) else _NO_FAILURE


def collapse_scan_pmd(k: Kernel, mm: MM, vma: VMA, haddr: int, cc: CollapseControl) -> ScanResult:
    """Model of hpage_collapse_scan_pmd() for anonymous memory (PMD order).

    The kernel walks the 512 PTEs in order and stops at the first that fails
    (the model finds that PTE with running counts):

    - a swap entry or a PTE marker (a guard region: is_swap_pte()) counts
      towards ``max_ptes_swap`` (khugepaged only):
      exceeding it is SCAN_EXCEED_SWAP_PTE, ``thp_scan_exceed_swap_pte``;
    - an empty or zero-page entry counts towards ``max_ptes_none``:
      SCAN_EXCEED_NONE_PTE, ``thp_scan_exceed_none_pte``;
    - a present page: (with ``skip_lazyfree``, khugepaged only: a clean PTE of
      a lazyfree folio is SCAN_PAGE_LAZYFREE) a page whose folio is maybe
      mapped shared counts towards ``max_ptes_shared``:
      SCAN_EXCEED_SHARED_PTE, ``thp_scan_exceed_share_pte``; then a folio
      with references beyond its mappings and swap cache is SCAN_PAGE_COUNT.

    Every limit counts PTEs, so a PTE-mapped THP or mTHP counts once per PTE
    mapping it.  With no failure, khugepaged wants one young PTE, and half the
    block young when it has swap entries (SCAN_LACK_REFERENCED_PAGE).
    ``cc.progress`` grows by 1 for an empty or PMD-mapped PMD, else by the
    PTEs examined (up to and including the failing one).
    """
    pt = mm.pt
    s = pt.slot_of.get(pmd_index(haddr))
    if s is None or pt.pmd_kind[s] == 0:
        cc.progress += 1
        # find_pmd_or_thp_or_none(): no PMD table (mm_find_pmd() finds none) or a pmd_none entry
        return ScanResult.SCAN_PMD_NONE if pt.has_pmd_table(haddr) else ScanResult.SCAN_PMD_NULL
    if pt.pmd_kind[s] == PMD_LEAF:
        cc.progress += 1
        return ScanResult.SCAN_PMD_MAPPED
    row = int(pt.pmd_row[s])
    pfns = pt.pte_pfn[row]
    flags = pt.pte_flags[row]
    # is_swap_pte(): a swap entry or a PTE marker (a guard marker counts as "unmapped" too)
    swp = (pfns <= -2) | ((pfns == -1) & ~pgtable.pte_none_mask(pfns, flags))
    none_or_zero = pgtable.pte_none_mask(pfns, flags) | ((pfns >= 0) & (flags & _PAGE_SPECIAL).astype(bool))
    present = ~none_or_zero & ~swp
    idx = np.flatnonzero(present)
    p = pfns[idx]
    fids = k.mem.folio[p]
    f = k.folios
    # (index of the failing PTE, rank among the checks of one present PTE, result, vmstat event)
    failures = [
        (_first_over(swp, cc.max_ptes_swap(k)), 0, ScanResult.SCAN_EXCEED_SWAP_PTE, "thp_scan_exceed_swap_pte"),
        (_first_over(none_or_zero, cc.max_ptes_none(k)), 0, ScanResult.SCAN_EXCEED_NONE_PTE,
         "thp_scan_exceed_none_pte"),
    ]
    if len(idx):
        if cc.is_khugepaged and k.khugepaged.rules.skip_lazyfree:
            # folio_test_lazyfree() && !pte_dirty(): "mm: khugepaged: skip lazy-free folios" (7.1)
            lazy = ((f.flags[fids] & (PG_ANON | PG_SWAPBACKED)) == PG_ANON) & ~(flags[idx] & _PAGE_DIRTY).astype(bool)
            if lazy.any():
                failures.append((int(idx[np.argmax(lazy)]), 1, ScanResult.SCAN_PAGE_LAZYFREE, None))
        shared = k.folios.maybe_mapped_shared_many(fids, k.mem.mapcount[p])
        i = _first_over(shared, cc.max_ptes_shared(k))
        if i < len(idx):
            failures.append((int(idx[i]), 2, ScanResult.SCAN_EXCEED_SHARED_PTE, "thp_scan_exceed_share_pte"))
        bad = f.refcount[fids] != f.expected_ref_count(fids, k.mem.mapcount[f.head[fids]])   # is_refcount_suitable()
        if bad.any():
            failures.append((int(idx[np.argmax(bad)]), 3, ScanResult.SCAN_PAGE_COUNT, None))
    at, _, result, event = min(failures, key=lambda x: (x[0], x[1]))
    if at < _NO_FAILURE:
        cc.progress += at + 1
        if event:
            k.vmstat.count_vm_event(event)
        return result
    cc.progress += HPAGE_PMD_NR
    nr_swap = int(np.count_nonzero(swp))
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
    # A PTE marker (a guard region) faults VM_FAULT_SIGSEGV there (handle_pte_marker()): SCAN_FAIL.
    from .memory import do_swap_page
    marker = (pt.pte_pfn[row] == -1) & ~pgtable.pte_none_mask(pt.pte_pfn[row], pt.pte_flags[row])
    for i in np.flatnonzero((pt.pte_pfn[row] <= -2) | marker).tolist():
        if marker[i]:
            rmap.free_folio(k, new)
            return ScanResult.SCAN_FAIL
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


def madvise_collapse(k: Kernel, mm: MM, vma: VMA, start: int, end: int) -> None:
    """Model of madvise_collapse() (Linux 6.18) for [start, end), the part of the madvise range in ``vma``.

    madvise_walk_vmas() calls it once per VMA, with the range clipped to the
    VMA.  A VMA not eligible for a forced collapse is EINVAL
    (thp_vma_allowable_order(): VM_NOHUGEPAGE, PR_SET_THP_DISABLE, no
    anon_vma yet, no whole aligned 2 MiB block in the VMA); the sysfs THP
    masks and the max_ptes_* limits do not apply, and the allocation may
    always stall in reclaim/compaction whatever ``defrag`` says.  The range
    is rounded inward to whole 2 MiB blocks; each block is collapsed in turn.
    A block that is already PMD-mapped counts as done; after some failures
    (no PMD table at all for the block, an unexpected reference) the next
    block is tried; after any other (an empty PMD entry in an existing PMD
    table included) the VMA's walk ends.  The VMA succeeds when every block ends up
    PMD-mapped, else fails with the errno of the last failure
    (madvise_collapse_errno()).
    """
    call = "madvise(MADV_COLLAPSE)"
    if not hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, hm.TVA_FORCED_COLLAPSE):
        raise KernelError(E.EINVAL, call, f"addr={vma.start:#x}: the mapping is not eligible for THP")
    cc = CollapseControl(is_khugepaged=False)
    hstart = ALIGN(start, HPAGE_PMD_SIZE)
    hend = end & HPAGE_PMD_MASK
    thps = 0
    last_fail = ScanResult.SCAN_FAIL
    for haddr in range(hstart, hend, HPAGE_PMD_SIZE):
        result = collapse_single_pmd(k, mm, vma, haddr, cc)
        if result in (ScanResult.SCAN_SUCCEED, ScanResult.SCAN_PMD_MAPPED):
            thps += 1
            continue
        last_fail = result
        if result not in _CONTINUE:
            break
    # 6.18 compares thps with (hend - hstart) >> HPAGE_PMD_SHIFT in unsigned arithmetic and has
    # no early return for hstart >= hend: a range inside one block whose rounded start lies past
    # its rounded end never matches (EINVAL from last_fail = SCAN_FAIL), while hstart == hend
    # (no whole block) succeeds.
    want = (hend - hstart) // HPAGE_PMD_SIZE if hend >= hstart else -1
    if thps != want:
        err = madvise_collapse_errno(last_fail)
        raise KernelError(err, call, f"addr={start:#x} length={end - start:#x}: {last_fail.name}")


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
@dataclass
class _Pass:
    """One khugepaged_do_scan() pass: its budget, what it has spent and whether it slept yet."""

    pages: int                       # READ_ONCE(khugepaged_pages_to_scan) at the start
    progress: int = 0
    pass_through_head: int = 0
    wait: bool = True                # no khugepaged_alloc_sleep() yet in this pass


class Khugepaged:
    """Model of the khugepaged kthread: a scan cursor over the registered mms.

    Each wakeup is one ``khugepaged_do_scan()`` pass with a budget of
    ``pages_to_scan`` progress units, spent as 6.18's
    ``khugepaged_scan_mm_slot()`` spends them: +1 each time it takes up an
    mm (again after each collapse attempt, which drops the mmap lock and
    ends that call), +1 per VMA khugepaged may not collapse (or whose last
    whole PMD lies behind the cursor), and +HPAGE_PMD_NR for every PMD address it
    scans, whatever the PMD holds (none, a PMD-mapped THP or a PTE table):
    with the default 4096 that is 8 PMD addresses a pass.  The budget is
    checked after each PMD address only, so a pass may pass it.  With
    ``rules.refine_scan_progress`` (the later kernel) a PMD address costs 1
    when it holds no table and 1 per PTE examined otherwise.

    The cursor (mm, address) persists between passes and is already past a
    block when its collapse is tried.  An mm scanned to its end hands over to
    the next one on the list; after the last the cursor returns to the list
    head and ``full_scans`` grows; a pass goes through the head at most
    twice, i.e. it may wrap once if it began in the middle of the list.  A
    failed THP allocation sleeps ``alloc_sleep_millisecs`` inside the pass,
    which then goes on (a store to a ``*_sleep_millisecs`` file wakes it
    early); a second failure ends the pass.  Between passes it sleeps
    ``scan_sleep_millisecs``.  It runs only while PMD THP is enabled
    somewhere (``hugepage_pmd_enabled()``); stopping it drops the cursor.

    Simplifications: a pass takes no simulated time; the first pass comes
    ``scan_sleep_millisecs`` after the thread starts, and registering the
    first mm does not wake it early (Linux scans at once when the thread
    starts, and when an mm joins an empty list).
    """

    def __init__(self, k: Kernel, rules: "KhugepagedRules | str | dict | None" = None) -> None:
        self.k = k
        self.rules = khugepaged_rules(rules)
        self.cursor_pid: int | None = None              # khugepaged_scan.mm_slot (None: at the head)
        self.cursor_addr = 0                            # khugepaged_scan.address
        self.running = False
        self.generation = 0
        self.hint: dict[tuple[int, int], None] = {}     # directed scanning (a policy's hints)
        self.passes = 0
        self._paused: _Pass | None = None               # a pass asleep in khugepaged_alloc_sleep()

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
        elif self.running:
            # kthread_stop(): khugepaged() drops its cursor on the way out.
            self.running = False
            self._paused = None
            pid, self.cursor_pid, self.cursor_addr = self.cursor_pid, None, 0
            if pid is not None and pid not in self.k.procs:
                self.k.khugepaged_mms.pop(pid, None)    # collect_mm_slot()

    def kick(self) -> None:
        """wake_up_interruptible(&khugepaged_wait): scan now, then sleep the new interval."""
        if self.running:
            self.generation += 1
            gen = self.generation
            self.k.clock.schedule(self.k.clock.now, lambda: self.wakeup(gen))

    def exit_mm(self, pid: int) -> None:
        """Model of __khugepaged_exit(): the mm leaves the list, unless khugepaged's cursor is on
        it: then khugepaged collects it when it next takes it up."""
        if pid != self.cursor_pid:
            self.k.khugepaged_mms.pop(pid, None)

    def wakeup(self, gen: int | None = None) -> None:
        from .clock import NSEC_PER_MSEC
        if not self.running or (gen is not None and gen != self.generation):
            return                                   # a stale timer: a kick replaced it
        sleep_ms = self.do_scan()
        gen = self.generation
        self.k.clock.schedule(self.k.clock.now + sleep_ms * NSEC_PER_MSEC, lambda: self.wakeup(gen))

    def _has_work(self) -> bool:
        """Model of khugepaged_has_work()."""
        return bool(self.k.khugepaged_mms) and hugepage_pmd_enabled(self.k)

    # -- one pass --------------------------------------------------------------------------------
    def do_scan(self) -> int:
        """Model of khugepaged_do_scan(): one pass; returns the milliseconds to sleep after it.

        After a first failed THP allocation the pass is paused (it returns
        ``alloc_sleep_millisecs``) and the next wakeup continues it.
        """
        k = self.k
        cc = CollapseControl(is_khugepaged=True)
        st, self._paused = self._paused, None
        if st is None:
            self.passes += 1
            st = _Pass(pages=k.sysfs.pages_to_scan)
            st.progress, result = self._scan_hints(cc, st.pages)
            if result == ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL:
                st.wait = False
                self._paused = st
                return k.sysfs.alloc_sleep_millisecs
        while True:
            if self.cursor_pid is None:
                st.pass_through_head += 1
            if self._has_work() and st.pass_through_head < 2:
                result = self._scan_mm_slot(st, cc)
            else:
                st.progress = st.pages
            if st.progress >= st.pages:
                break
            if result == ScanResult.SCAN_ALLOC_HUGE_PAGE_FAIL:
                if not st.wait:
                    break
                st.wait = False
                self._paused = st                       # khugepaged_alloc_sleep(), then go on
                return k.sysfs.alloc_sleep_millisecs
        return k.sysfs.scan_sleep_millisecs

    def _scan_hints(self, cc: CollapseControl, budget: int) -> tuple[int, ScanResult]:
        """Directed scanning (not in 6.18): PMDs a COW split just left behind come first.

        Each hint costs a PTE table's worth of progress; it is dropped once the
        block is huge again or cannot be scanned, kept while the limits refuse
        it (e.g. pages still shared with a child).  Returns (progress, the
        last result: SCAN_ALLOC_HUGE_PAGE_FAIL when a THP allocation failed).
        """
        k = self.k
        progress = 0
        result = ScanResult.SCAN_SUCCEED
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
                return progress, result
            if result in (ScanResult.SCAN_SUCCEED, ScanResult.SCAN_PMD_MAPPED, ScanResult.SCAN_PMD_NULL,
                          ScanResult.SCAN_PMD_NONE):
                del self.hint[key]
        return progress, result

    def _scan_mm_slot(self, st: _Pass, cc: CollapseControl) -> ScanResult:
        """Model of khugepaged_scan_mm_slot(): scan the cursor's mm until the budget is spent,
        a collapse is tried, or the mm ends (then the cursor moves to the next mm).

        Adds what it spends to ``st.progress``; returns the last scan or collapse result.
        """
        k = self.k
        mms = k.khugepaged_mms
        if self.cursor_pid is None or self.cursor_pid not in mms:
            self.cursor_pid, self.cursor_addr = next(iter(mms)), 0
        pid = self.cursor_pid
        proc = k.procs.get(pid)
        mm = proc.mm if proc is not None else None
        result = ScanResult.SCAN_FAIL
        st.progress += 1
        if mm is not None and mm.thp_disable != 1:      # hpage_collapse_test_exit_or_disable()
            for vma in [v for v in mm.vmas if v.end > self.cursor_addr]:      # vma_iter_init(address)
                if not hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, hm.TVA_KHUGEPAGED):
                    st.progress += 1
                    continue
                hstart = ALIGN(vma.start, HPAGE_PMD_SIZE)
                hend = vma.end & HPAGE_PMD_MASK
                if self.cursor_addr > hend:
                    st.progress += 1
                    continue
                self.cursor_addr = max(self.cursor_addr, hstart)
                while self.cursor_addr < hend:
                    haddr = self.cursor_addr
                    before = cc.progress
                    result = collapse_scan_pmd(k, mm, vma, haddr, cc)
                    lock_dropped = result == ScanResult.SCAN_SUCCEED
                    if lock_dropped:                    # collapse_huge_page() drops the mmap lock
                        result = collapse_huge_page(k, mm, vma, haddr, cc)
                    self.cursor_addr = haddr + HPAGE_PMD_SIZE
                    st.progress += cc.progress - before if self.rules.refine_scan_progress else HPAGE_PMD_NR
                    if lock_dropped or st.progress >= st.pages:
                        return result                   # the mm keeps the cursor
        # The mm was scanned to its end (or has exited): on to the next mm, or back to the head.
        order = list(mms)
        i = order.index(pid)
        if i + 1 < len(order):
            self.cursor_pid, self.cursor_addr = order[i + 1], 0
        else:
            self.cursor_pid, self.cursor_addr = None, 0
            k.khugepaged_counters["full_scans"] += 1
        if mm is None:
            del mms[pid]                                # collect_mm_slot()
        return result
