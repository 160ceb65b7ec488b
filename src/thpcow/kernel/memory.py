"""Model of mm/memory.c: the PTE-level fault paths, swap-in, fork's page-table copy and zapping.

Fault entry is :func:`handle_mm_fault`; it dispatches exactly as
``__handle_mm_fault()`` does: a PMD-order THP fault when the PMD is empty and
the order is allowed, ``do_huge_pmd_wp_page()`` for a write to a read-only PMD
leaf, and otherwise the PTE path (``do_anonymous_page()``, ``do_swap_page()``,
``do_wp_page()``).

Swap-in (:func:`do_swap_page`) reads the device at 4 KiB (pgmajfault,
pswpin); a folio read from a slot that other swap entries share stays in the
swap cache (:mod:`.swap_state`), where their faults find it.
Simplification: there is no readahead and no mTHP swap-in.

The write-protect fault, :func:`do_wp_page`, takes a batch of pages: the
scalar fault path hands it one, the batched store path (``Process.write_many``)
every read-only PTE of a round, so both decide through the same code.  The
batched path must leave the same state as storing one page at a time; tests
check that on random programs under every kernel build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .constants import (
    ALIGN_DOWN, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SIZE, PFN_PHYS, PHYS_PFN, VM_EXEC, VM_MAYBE_GUARD, VM_READ,
    VM_WRITE,
)
from .errors import OutOfMemory
from .folio import PG_ANON
from .mm import (
    MM, PMD_LEAF, PMD_NONE, PMD_TABLE, PTE_MARKER_GUARD, PTE_NEW_ANON, PTE_NONE, PTE_ZERO, VMA, _PAGE_ACCESSED, _PAGE_DIRTY,
    _PAGE_PRESENT, _PAGE_RW, _PAGE_SPECIAL, _PAGE_SWP_EXCLUSIVE, _PAGE_HWPOISON, pmd_index, pte_index, swp_offset,
)
from .page_alloc import PG_ANON_EXCLUSIVE, ZERO_PFN
from .swap import folio_add_lru
from .swap_state import add_to_swap_cache
from .swapfile import free_swap_and_cache
from . import pgtable, rmap

if TYPE_CHECKING:
    from .kernel import Kernel

VM_FAULT_OK = 0
VM_FAULT_FALLBACK = 0x0800

# enum fault_flag
FAULT_FLAG_WRITE = 1 << 0
FAULT_FLAG_UNSHARE = 1 << 10


@dataclass
class VmFault:
    """Model of struct vm_fault: what the fault handlers are told about one fault."""

    mm: MM
    vma: VMA
    address: int
    flags: int = 0               # FAULT_FLAG_*
    pmd: int | None = None       # the PMD slot (vmf->pmd); None: not set
    orig_pmd: int = 0            # the PMD entry's flags when the fault began


# -- fault entry ------------------------------------------------------------------
def handle_mm_fault(k: Kernel, mm: MM, vma: VMA, addr: int, write: bool) -> int:
    """Model of handle_mm_fault(): count pgfault once, then __handle_mm_fault()."""
    k.vmstat.count_vm_event("pgfault")
    k.balance(need=HPAGE_PMD_NR)          # reclaim before any state is read (see Kernel.balance)
    return __handle_mm_fault(k, mm, vma, addr, write)


def __handle_mm_fault(k: Kernel, mm: MM, vma: VMA, addr: int, write: bool) -> int:
    """Model of __handle_mm_fault(): choose the PMD or the PTE path."""
    from . import huge_memory as hm

    pt = mm.pt
    s = pt.slot(pmd_index(addr))
    kind = pt.pmd_kind[s]
    vmf = VmFault(mm, vma, addr, FAULT_FLAG_WRITE if write else 0, pmd=s, orig_pmd=int(pt.pmd_flags[s]))
    if kind == PMD_NONE and hm.thp_vma_allowable_order(k, mm, vma, HPAGE_PMD_ORDER, hm.TVA_PAGEFAULT):
        ret = hm.do_huge_pmd_anonymous_page(k, vmf)
        if ret != VM_FAULT_FALLBACK:
            return ret
    elif kind == PMD_LEAF:
        if write and not pt.pmd_flags[s] & _PAGE_RW:
            ret = hm.do_huge_pmd_wp_page(k, vmf)
            if ret != VM_FAULT_FALLBACK:
                return ret
        else:
            # huge_pmd_set_accessed()
            pgtable.pmdp_set_access_flags(k, mm, s, _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0))
            return VM_FAULT_OK
    return handle_pte_fault(k, mm, vma, addr, s, write)


def pte_alloc(k: Kernel, mm: MM, s: int) -> int:
    """Model of pte_alloc(): give an empty PMD a PTE table; returns its row."""
    pt = mm.pt
    if pt.pmd_kind[s] == PMD_TABLE:
        return int(pt.pmd_row[s])
    row = pt.alloc_row()
    pgtable.pmd_populate(k, mm, s, row)
    mm.nr_ptes += 1
    return row


def pte_free(k: Kernel, mm: MM, s: int) -> None:
    """Model of free_pte_range()/pte_free(): drop the (empty) PTE table under PMD slot ``s``."""
    pgtable.free_pte_table(k, mm, s)
    mm.nr_ptes -= 1


def handle_pte_fault(k: Kernel, mm: MM, vma: VMA, addr: int, s: int, write: bool) -> int:
    """Model of handle_pte_fault()."""
    pt = mm.pt
    row = pte_alloc(k, mm, s)
    i = pte_index(addr)
    val = pt.pte_pfn[row, i]
    if val == PTE_NONE:
        if pt.pte_flags[row, i] & _PAGE_HWPOISON:
            from .errors import HardwarePoison
            raise HardwarePoison(addr)
        if pt.pte_flags[row, i] & PTE_MARKER_GUARD:      # handle_pte_marker(): VM_FAULT_SIGSEGV
            from .errors import SegmentationFault
            raise SegmentationFault(addr, "a guard region (MADV_GUARD_INSTALL)")
        return do_anonymous_page(k, mm, vma, addr, row, write)
    if val < 0:
        return do_swap_page(k, mm, vma, addr, row, write)
    if write and not pt.pte_flags[row, i] & _PAGE_RW:
        return do_wp_page_at(k, mm, addr, row)
    pgtable.ptep_set_access_flags(k, mm, row, i, _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0))
    return VM_FAULT_OK


# -- anonymous faults --------------------------------------------------------------
def anon_vma_prepare_pages(k: Kernel, mm: MM, vpns: np.ndarray) -> None:
    """anon_vma_prepare() for every VMA of ``mm`` that holds one of the pages ``vpns`` (a batch of faults)."""
    for v in mm.vmas_in(PFN_PHYS(int(vpns.min())), PFN_PHYS(int(vpns.max()) + 1)):
        if not v.anon_vma and ((vpns >= PHYS_PFN(v.start)) & (vpns < PHYS_PFN(v.end))).any():
            anon_vma_prepare(k, v, mm)


def anon_vma_prepare(k: Kernel, vma: VMA, mm: MM | None = None) -> None:
    """Model of anon_vma_prepare(): a VMA gets its anon_vma on first anon fault.

    __anon_vma_prepare() first tries find_mergeable_anon_vma(): the next VMA's
    anon_vma, then the previous one's, when that neighbour is
    anon_vma_compatible() (adjacent, flags equal but for read/write/exec,
    page offsets continuous) and its anon_vma_chain is singular (not a fork
    child's copy).  Sharing it is what lets the two merge later, once their
    protections agree.  ``mm`` None: no neighbour is looked at.
    """
    if vma.anon_vma:
        return
    reused = find_mergeable_anon_vma(mm, vma) if mm is not None else 0
    vma.anon_vma = reused or k.new_anon_vma_id()


def _anon_vma_compatible(a: VMA, b: VMA) -> bool:
    """Model of anon_vma_compatible(): ``a`` ends where ``b`` starts, the flags agree but for
    VM_READ/VM_WRITE/VM_EXEC and those merging ignores (VM_IGNORE_MERGE: the sticky
    VM_MAYBE_GUARD), and the page offsets follow on."""
    return a.end == b.start and not ((a.flags ^ b.flags) & ~(VM_READ | VM_WRITE | VM_EXEC | VM_MAYBE_GUARD)) \
        and b.pgoff == a.pgoff + PHYS_PFN(b.start - a.start)


def find_mergeable_anon_vma(mm: MM, vma: VMA) -> int:
    """Model of find_mergeable_anon_vma()/reusable_anon_vma(): a neighbour's anon_vma id to reuse, or 0."""
    if vma not in mm.vmas:
        return 0
    i = mm.vmas.index(vma)
    nxt = mm.vmas[i + 1] if i + 1 < len(mm.vmas) else None
    prev = mm.vmas[i - 1] if i > 0 else None
    for old, a, b in ((nxt, vma, nxt), (prev, prev, vma)):          # the next VMA first
        if old is not None and old.anon_vma and not old.uncowed_parents and _anon_vma_compatible(a, b):
            return old.anon_vma
    return 0


def alloc_anon_folio(k: Kernel, mm: MM, vma: VMA, addr: int, row: int) -> tuple[int, int]:
    """Model of alloc_anon_folio(): the largest allowed mTHP order that fits, else 4 KiB.

    Candidate orders are the enabled anon orders below PMD order whose naturally
    aligned block lies inside the VMA; the highest one whose PTEs are all none
    is tried first, then the lower ones; each failed allocation counts
    ``anon_fault_fallback`` for its order.  Returns (folio id, order), or
    (-1, 0) if not even a 4 KiB page could be had.
    """
    from . import huge_memory as hm

    orders = hm.thp_vma_allowable_orders(k, mm, vma, hm.TVA_PAGEFAULT, (1 << HPAGE_PMD_ORDER) - 1)
    orders = hm.thp_vma_suitable_orders(vma, addr, orders)
    pt = mm.pt
    candidates = [o for o in range(HPAGE_PMD_ORDER - 1, 1, -1) if orders & (1 << o)]
    while candidates:
        o = candidates[0]
        first = ALIGN_DOWN(pte_index(addr), 1 << o)
        if pgtable.pte_none_mask(pt.pte_pfn[row, first: first + (1 << o)],
                                 pt.pte_flags[row, first: first + (1 << o)]).all():     # pte_range_none()
            break
        candidates.pop(0)
    for o in candidates:
        pfn = k.mem.alloc(o)
        if pfn >= 0:
            k.vmstat.count_mthp_stat(o, "anon_fault_alloc")
            return k.new_folio(pfn, o), o
        k.vmstat.count_mthp_stat(o, "anon_fault_fallback")
    pfn = k.alloc_page()
    if pfn < 0:
        return -1, 0
    return k.new_folio(pfn, 0), 0


def do_anonymous_page(k: Kernel, mm: MM, vma: VMA, addr: int, row: int, write: bool) -> int:
    """Model of do_anonymous_page(): the zero page on read, a new folio on write."""
    i = pte_index(addr)
    if not write:
        pgtable.set_pte_at(k, mm, row, i, ZERO_PFN, PTE_ZERO)
        return VM_FAULT_OK
    anon_vma_prepare(k, vma, mm)
    fid, order = alloc_anon_folio(k, mm, vma, addr, row)
    if fid < 0:
        raise OutOfMemory(addr)
    nr = 1 << order
    first = ALIGN_DOWN(i, nr)
    head = int(k.folios.head[fid])
    k.mem.content[head: head + nr] = 0                # __GFP_ZERO
    k.vmstat.count_vm_event("sim_zero_bytes", nr * PAGE_SIZE)
    k.folios.refcount[fid] = nr
    rmap.folio_add_new_anon_rmap(k, fid, mm, pmd=False)
    pgtable.set_ptes(k, mm, row, first, np.arange(head, head + nr),
                     PTE_NEW_ANON if vma.flags & VM_WRITE else PTE_NEW_ANON & ~_PAGE_RW)
    k.mem.vpn[head: head + nr] = ALIGN_DOWN(PHYS_PFN(addr), nr) + np.arange(nr)
    mm.rss_anon += nr
    return VM_FAULT_OK


# -- swap-in ------------------------------------------------------------------------------------
def do_swap_page(k: Kernel, mm: MM, vma: VMA, addr: int, row: int, write: bool) -> int:
    """Model of do_swap_page() for a 4 KiB swap-in.

    If another process sharing the slot swapped it in already, its folio is
    still in the swap cache and is mapped again: a minor fault, no read.
    Otherwise the slot is read into a new order-0 folio (pgmajfault, pswpin),
    which enters the swap cache when other swap entries still point at the
    slot, so that they map the same folio.  Then the swap reference is
    dropped (free_swap_and_cache(): after the last one the folio leaves the
    cache).  The page is mapped exclusive, and
    writable in a VM_WRITE mapping even on a read fault, when the swap entry
    was exclusive, or on a write fault when nobody else holds the folio or
    its slot (should_try_to_free_swap() frees the swap first); otherwise it
    is mapped read-only and a write goes on to do_wp_page().
    Simplification: the device is not SWP_SYNCHRONOUS_IO, but a slot nobody
    else references does not keep its folio in the swap cache (the kernel
    keeps it until reclaim or a write).
    """
    pt = mm.pt
    f = k.folios
    i = pte_index(addr)
    slot = swp_offset(int(pt.pte_pfn[row, i]))
    exclusive_entry = bool(pt.pte_flags[row, i] & _PAGE_SWP_EXCLUSIVE)
    last = int(k.swap.swap_map[slot]) == 1              # this is the slot's last swap entry
    fid = int(k.swap.cache[slot])
    if fid >= 0:                                        # swap cache hit
        pfn = int(f.head[fid])
        exclusive = exclusive_entry or (write and last and int(k.mem.mapcount[pfn]) == 0)
        f.refcount[fid] += 1
        rmap.folio_add_anon_rmap_ptes(k, fid, pfn, 1, mm, exclusive)
    else:
        pfn = k.alloc_page()
        if pfn < 0:
            raise OutOfMemory(addr)
        fid = k.new_folio(pfn, 0)
        k.mem.content[pfn] = k.swap.content[slot]
        k.vmstat.count_vm_event("pgmajfault")
        k.vmstat.count_vm_event("pswpin")
        exclusive = exclusive_entry or (write and last)
        f.refcount[fid] = 1
        rmap.folio_add_new_anon_rmap(k, fid, mm, pmd=False)
        if not exclusive:
            k.mem.pflags[pfn] &= np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)
        folio_add_lru(k, fid)
        add_to_swap_cache(k, fid, slot)
    free_swap_and_cache(k, slot)          # the last entry takes the folio out of the cache, dirty
    mm.rss_swap -= 1
    mm.rss_anon += 1
    flags = _PAGE_PRESENT | _PAGE_ACCESSED
    if exclusive and vma.flags & VM_WRITE:
        flags |= _PAGE_RW | (_PAGE_DIRTY if write else 0)
    pgtable.set_pte_at(k, mm, row, i, pfn, flags)
    k.mem.vpn[pfn] = PHYS_PFN(addr)
    if write and not flags & _PAGE_RW:
        return do_wp_page_at(k, mm, addr, row)
    return VM_FAULT_OK


# -- write-protect faults -------------------------------------------------------------
def wp_can_reuse_anon_folio(k: Kernel, fids):
    """Model of wp_can_reuse_anon_folio() (and __wp_can_reuse_large_anon_folio()), per folio id.

    A small folio is reused when its only reference is this mapping.  A large
    folio is reused when it has more than one mapping, all of them in this mm
    (the MM_IDS_SHARED bit is clear) and every reference is a mapping; a large
    folio with a single mapped page is copied instead so it can be freed.
    ``fids`` is an array (the answer is a bool array) or one id (a bool).
    """
    f = k.folios
    ids = np.asarray(fids, dtype=np.int64)
    order = f.order[ids]
    small = (order == 0) & (f.refcount[ids] == 1)
    large = (order > 0) & (f.large[ids] > 1) & ~(f.flags[ids] & rmap.PG_MM_IDS_SHARED).astype(bool) \
        & (f.large[ids] == f.refcount[ids])
    out = small | large
    if "cow-reuses-shared" in k.bugs:                 # injected bug (bugs.py): a shared small folio is reused
        out = out | (order == 0)
    return bool(out) if out.ndim == 0 else out


def do_wp_page(k: Kernel, mm: MM, rows: np.ndarray, cols: np.ndarray, vpns: np.ndarray) -> bool:
    """Model of do_wp_page() for private anonymous memory: write faults on read-only PTEs of one mm.

    The scalar fault path hands one page; the batched store path hands every
    such page of a round at once.  Each page is reused (wp_page_reuse())
    when it is AnonExclusive or wp_can_reuse_anon_folio() allows it, and
    otherwise copied to a new 4 KiB page (wp_page_copy(); the zero page is
    copied from zero).  Deciding
    a batch up front is exact: a COW by mm A never changes how A's other
    pages are decided, because A maps each anonymous page at most once and
    A's copies only remove A's own mappings.  A build with ``pte_hook``
    judges each copy itself and is handed one page at a time.

    Preconditions: every (row, col) is a distinct present, read-only PTE of
    ``mm`` in a writable VMA.  Returns False, having changed nothing, when
    the copies cannot all be allocated.  pgfault is counted by the caller.
    """
    pt = mm.pt
    pfns = pt.pte_pfn[rows, cols]
    special = (pt.pte_flags[rows, cols] & _PAGE_SPECIAL).astype(bool)
    anon = np.where(special, 0, pfns)
    reuse = ~special & ((k.mem.pflags[anon] & PG_ANON_EXCLUSIVE).astype(bool)
                        | wp_can_reuse_anon_folio(k, k.mem.folio[anon]))
    if k.build.pte_hook and not special[0] and not reuse[0]:
        if len(rows) != 1:
            raise ValueError("do_wp_page: a build with pte_hook takes one page at a time")
        addr = PFN_PHYS(int(vpns[0]))
        ret = k.build.pte_wp_copy(k, mm, mm.find_vma(addr), addr, int(rows[0]), int(k.mem.folio[pfns[0]]))
        if ret is not None:
            return True
    copy = ~reuse
    n = int(np.count_nonzero(copy))
    new = k.alloc_pages_bulk(n) if n else None
    if n and new is None:
        return False
    r_idx = np.flatnonzero(reuse)
    if len(r_idx):
        wp_page_reuse(k, mm, rows[r_idx], cols[r_idx], pfns[r_idx])
    if n:
        wp_page_copy(k, mm, rows[copy], cols[copy], vpns[copy], pfns[copy], special[copy], new)
    return True


def do_wp_page_at(k: Kernel, mm: MM, addr: int, row: int) -> int:
    """do_wp_page() for the one page at ``addr`` (its PTE table ``row``): the scalar fault path."""
    ok = do_wp_page(k, mm, np.array([row], dtype=np.int64), np.array([pte_index(addr)], dtype=np.int64),
                    np.array([PHYS_PFN(addr)], dtype=np.int64))
    if not ok:
        raise OutOfMemory(addr)
    return VM_FAULT_OK


def wp_page_reuse(k: Kernel, mm: MM, rows: np.ndarray, cols: np.ndarray, pfns: np.ndarray) -> None:
    """Model of wp_page_reuse(): the pages become AnonExclusive (folio_move_anon_rmap()); the PTEs young, dirty, writable."""
    k.mem.pflags[pfns] |= PG_ANON_EXCLUSIVE
    pgtable.ptep_set_access_flags(k, mm, rows, cols, _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED)
    k.vmstat.count_vm_event("pgreuse", len(pfns))


def wp_page_copy(k: Kernel, mm: MM, rows: np.ndarray, cols: np.ndarray, vpns: np.ndarray, old_pfn: np.ndarray,
                 zero: np.ndarray, new: np.ndarray) -> None:
    """Model of wp_page_copy(): copy each page into a new 4 KiB page (zero-fill a zero-page one).

    ``new`` holds the frames, one per page.  Each new page is mapped young,
    dirty, writable and AnonExclusive; an old anon page loses this mapping
    and the reference it held.  RSS only grows for zero-page copies.
    """
    f = k.folios
    mem = k.mem
    if zero.any():                                   # vmf_anon_prepare(): the zero page had none
        anon_vma_prepare_pages(k, mm, vpns[zero])
    anon = ~zero
    new_anon_folios_bulk(k, new, np.where(anon, mem.content[np.where(anon, old_pfn, 0)], 0))
    pgtable.set_ptes_scatter(k, mm, rows, cols, new, PTE_NEW_ANON)
    mem.vpn[new] = vpns
    mm.rss_anon += int(np.count_nonzero(zero))
    if not anon.any():
        return
    old_pfn = old_pfn[anon]
    old_fid = mem.folio[old_pfn].astype(np.int64)
    n = len(old_pfn)
    k.flush_tlb_pages(mm, vpns[anon])                # ptep_clear_flush()
    k.vmstat.count_vm_event("sim_cow_pages", n)
    k.vmstat.count_vm_event("sim_cow_bytes", n * PAGE_SIZE)
    # A large folio left partially mapped after its first lost page is queued
    # now, before anything else changes (it may be freed below, which
    # unqueues it again, as in the kernel).
    large_old = f.order[old_fid] > 0
    first_gone = large_old & (mem.mapcount[old_pfn] == 1)
    if first_gone.any():
        for fid in np.unique(old_fid[first_gone]).tolist():
            if f.entire[fid] or f.flags[fid] & rmap.PG_PARTIALLY_MAPPED:
                continue
            if rmap._pte_mapped_pages(k, fid) >= 2:
                rmap._queue_partially_mapped(k, fid)
    # Old pages: one mapping and one reference less (folio_remove_rmap_pte(), folio_put()).
    mem.mapcount[old_pfn] -= 1
    gone = mem.mapcount[old_pfn] == 0
    small = f.order[old_fid] == 0
    k.vmstat.mod_node_page_state("nr_anon_pages", -int(np.count_nonzero(gone & small)))
    uf, counts = np.unique(old_fid, return_counts=True)
    f.refcount[uf] -= counts.astype(np.int32)
    large_sel = f.order[uf] > 0
    if large_sel.any():
        f.sub_large_mapcount_many(uf[large_sel], counts[large_sel], mm.mm_id)
        lg = gone & ~small
        if lg.any():
            gf, gc = np.unique(old_fid[lg], return_counts=True)
            unmapped = f.entire[gf] == 0
            k.vmstat.mod_node_page_state("nr_anon_pages", -int(gc[unmapped].sum()))
    dead = uf[f.refcount[uf] == 0]
    rmap.free_small_folios(k, dead[f.order[dead] == 0])
    for fid in dead[f.order[dead] > 0].tolist():
        rmap.free_folio(k, fid)


# -- zap (munmap, MADV_DONTNEED, exit) ---------------------------------------------------
def folio_runs(k: Kernel, pfns: np.ndarray):
    """Split mapped pages into runs of consecutive pages of one folio (folio_pte_batch())."""
    fids = k.mem.folio[pfns]
    brk = np.flatnonzero((np.diff(fids) != 0) | (np.diff(pfns) != 1)) + 1
    starts = np.concatenate(([0], brk)).tolist()
    ends = np.concatenate((brk, [len(pfns)])).tolist()
    return [(int(fids[a]), a, b) for a, b in zip(starts, ends)]


def unmap_pages(k: Kernel, mm: MM, pfns: np.ndarray) -> None:
    """Drop this mm's PTE mappings of ``pfns`` (rmap, reference, rss), a folio run at a time.

    The PTEs' dirty bits are not moved to the folios: for anon folios
    zap_present_folio_ptes() drops them ("we don't need up-to-date
    accessed/dirty bits"); only file folios are marked dirty.
    """
    if not len(pfns):
        return
    for fid, a, b in folio_runs(k, pfns):
        rmap.folio_remove_rmap_ptes(k, fid, int(pfns[a]), b - a, mm)
        mm.rss_anon -= b - a
        rmap.folio_put(k, fid, b - a)


def zap_pte_range(k: Kernel, mm: MM, row: int, lo: int, hi: int, drop_markers: bool = True) -> None:
    """Model of zap_pte_range() over PTE indexes [lo, hi) of one table.

    The entries are cleared first, then pages of the same folio are unmapped
    as one batch (zap_present_ptes()).  Guard markers are cleared only with
    ``drop_markers`` (zap_nonpresent_ptes(): ZAP_FLAG_DROP_MARKER, set by
    munmap and exit, not by MADV_DONTNEED or a guard install's zap).
    """
    pt = mm.pt
    if not drop_markers:
        keep = pgtable.pte_guard_mask(pt.pte_pfn[row, lo:hi], pt.pte_flags[row, lo:hi])
        if keep.any():
            for a, b in _runs(~keep):
                zap_pte_range(k, mm, row, lo + a, lo + b)
            return
    pfns, flags = pgtable.get_and_clear_full_ptes(k, mm, row, lo, hi)
    normal = (pfns >= 0) & ~(flags & _PAGE_SPECIAL).astype(bool)
    idx = np.flatnonzero(normal)
    unmap_pages(k, mm, pfns[idx])
    swp = pfns <= -2
    if swp.any():                                  # zap_nonpresent_ptes(): free_swap_and_cache()
        for slot in swp_offset(pfns[swp]).tolist():
            free_swap_and_cache(k, int(slot))
        mm.rss_swap -= int(np.count_nonzero(swp))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [a, b) runs of True in ``mask``."""
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def zap_range(k: Kernel, mm: MM, vma: VMA, start: int, end: int, drop_markers: bool = True) -> None:
    """Model of unmap_page_range()/zap_pmd_range() for [start, end) inside one VMA.

    A PMD leaf wholly inside the range is zapped whole (zap_huge_pmd()); one
    that is only partly inside is split first (split_huge_pmd()).  Guard
    markers go only with ``drop_markers`` (zap_pte_range()).
    """
    from . import huge_memory as hm

    pt = mm.pt
    for s, base, lo, hi in pt.spans_in(start, end):
        kind = pt.pmd_kind[s]
        if kind == PMD_LEAF:
            if lo == base and hi == base + HPAGE_PMD_SIZE:
                hm.zap_huge_pmd(k, mm, s)
                continue
            hm.split_huge_pmd(k, mm, vma, s)
            kind = pt.pmd_kind[s]
        if kind == PMD_TABLE:
            zap_pte_range(k, mm, int(pt.pmd_row[s]), PHYS_PFN(lo - base), PHYS_PFN(hi - base), drop_markers)
    k.flush_tlb_range(mm, start, end)                 # tlb_finish_mmu()


# -- fork --------------------------------------------------------------------------------
def copy_pte_range(k: Kernel, dst: MM, src: MM, vma: VMA, s_src: int, lo: int, hi: int) -> None:
    """Model of copy_pte_range()/copy_present_ptes() for one table, PTEs [lo, hi).

    Anonymous pages become shared: writable PTEs are write-protected in the
    parent, the child's copies are read-only, AnonExclusive is cleared, and
    every page takes one more reference and mapcount.  The zero page is copied
    as it is.  Every present PTE the child gets is old (__copy_present_ptes()
    applies pte_mkold() to the zero page too); the parent's keep their young bit.
    """
    spt, dpt = src.pt, dst.pt
    srow = int(spt.pmd_row[s_src])
    d = dpt.slot(int(spt.pmd_index[s_src]))
    drow = pte_alloc(k, dst, d)
    pfns = spt.pte_pfn[srow, lo:hi].copy()
    marks = pgtable.pte_guard_mask(pfns, spt.pte_flags[srow, lo:hi])
    if marks.any():                                # copy_pte_marker(): guard markers are copied
        cols = lo + np.flatnonzero(marks)
        pgtable.set_ptes_scatter(k, dst, drow, cols, PTE_NONE, PTE_MARKER_GUARD)
    swp = pfns <= -2
    if swp.any():                                  # copy_nonpresent_pte(): swap_duplicate()
        cols = lo + np.flatnonzero(swp)
        pgtable.pte_update_flags(k, src, srow, cols, clear_bits=_PAGE_SWP_EXCLUSIVE)
        pgtable.set_ptes_scatter(k, dst, drow, cols, pfns[swp], spt.pte_flags[srow, cols])
        np.add.at(k.swap.swap_map, swp_offset(pfns[swp]), 1)
        dst.rss_swap += int(np.count_nonzero(swp))
    present = pfns >= 0
    if not present.any():
        return
    flags = spt.pte_flags[srow, lo:hi].copy()
    normal = present & ~(flags & _PAGE_SPECIAL).astype(bool)
    idx = np.flatnonzero(normal)
    # Parent: write-protect COW pages (before the child's copies are installed).
    pgtable.ptep_set_wrprotect(k, src, srow, lo + idx)
    child_flags = np.where(normal, flags & ~np.uint8(_PAGE_RW | _PAGE_ACCESSED), flags & ~np.uint8(_PAGE_ACCESSED))
    pi = np.flatnonzero(present)
    pgtable.set_ptes_scatter(k, dst, drow, lo + pi, pfns[pi], child_flags[pi])
    if not len(idx):
        return
    p = pfns[idx]
    fids = k.mem.folio[p]
    k.mem.pflags[p] &= np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)
    k.mem.mapcount[p] += 1
    np.add.at(k.folios.refcount, fids, 1)
    dst.rss_anon += len(p)
    large = k.folios.order[fids] > 0
    if large.any():
        lf, counts = np.unique(fids[large], return_counts=True)
        for fid, c in zip(lf.tolist(), counts.tolist()):
            k.folios.add_large_mapcount(fid, c, dst.mm_id)


def copy_page_range(k: Kernel, dst: MM, src: MM, vma: VMA) -> None:
    """Model of copy_page_range(): copy one VMA's page tables at fork."""
    from . import huge_memory as hm

    spt = src.pt
    for s, base, lo, hi in spt.spans_in(vma.start, vma.end):
        kind = spt.pmd_kind[s]
        if kind == PMD_LEAF:
            hm.copy_huge_pmd(k, dst, src, vma, s)
        elif kind == PMD_TABLE:
            copy_pte_range(k, dst, src, vma, s, PHYS_PFN(lo - base), PHYS_PFN(hi - base))


def copy_user_large_folio(k: Kernel, dst: np.ndarray, src: np.ndarray) -> None:
    """Model of copy_user_large_folio()/copy_user_highpage() for many pages: page dst[i] gets src[i].

    ``src[i]`` < 0 is a none or zero-page entry: the page is cleared (as
    __collapse_huge_page_copy() does).  With the checker on, every page of
    the copy is compared with its source afterwards (check.check_copy()).
    """
    data = np.where(src >= 0, k.mem.content[np.maximum(src, 0)], 0)
    if "copy-first-page-only" in k.bugs:               # injected bug (bugs.py)
        data[1:] = k.mem.content[dst[1:]]
    k.mem.content[dst] = data
    if k.check_enabled:
        from .check import check_copy
        check_copy(k, dst, src)


def new_anon_folios_bulk(k: Kernel, new: np.ndarray, content) -> np.ndarray:
    """Optimization: folio_prealloc() + folio_add_new_anon_rmap() for many order-0 pages at once.

    Each frame of ``new`` becomes a mapped-once, AnonExclusive anon folio on
    the LRU holding ``content``; the caller installs the PTEs.  Returns the ids.
    """
    f = k.folios
    fids = f.alloc_bulk(new)
    k.mem.folio[new] = fids
    k.mem.content[new] = content
    k.mem.mapcount[new] = 1
    k.mem.pflags[new] = PG_ANON_EXCLUSIVE
    f.refcount[fids] = 1
    f.flags[fids] = PG_ANON | rmap.PG_SWAPBACKED | rmap.PG_LRU
    folio_add_lru(k, fids)
    k.vmstat.mod_node_page_state("nr_anon_pages", len(new))
    return fids


# -- batched write faults (Optimization) ------------------------------------------------------
def do_anonymous_page_batch(k: Kernel, mm: MM, rows: np.ndarray, cols: np.ndarray, vpns: np.ndarray) -> bool:
    """Optimization: do_anonymous_page() write faults for many empty PTEs at once.

    Preconditions: every (row, col) is a distinct empty PTE of ``mm`` in a
    writable VMA where alloc_anon_folio() can only pick order 0.  Each page
    gets a zeroed, exclusive order-0 folio, as the scalar path would give it.
    Returns False, having changed nothing, when memory runs short.
    """
    n = len(rows)
    new = k.alloc_pages_bulk(n)
    if new is None:
        return False
    anon_vma_prepare_pages(k, mm, vpns)
    new_anon_folios_bulk(k, new, 0)
    k.vmstat.count_vm_event("sim_zero_bytes", n * PAGE_SIZE)     # clear_user_highpage() each
    pgtable.set_ptes_scatter(k, mm, rows, cols, new, PTE_NEW_ANON)
    k.mem.vpn[new] = vpns
    mm.rss_anon += n
    k.vmstat.count_vm_event("pgfault", n)
    return True
