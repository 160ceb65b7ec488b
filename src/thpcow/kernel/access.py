"""User memory accesses: the loads and stores of a simulated process.

A store takes the write-fault path for each page that is not mapped
writable, then lands in the page's content token; a load takes the read-fault
path for pages not present and returns their tokens.  Contents are tracked
per 4 KiB page: a store of any size replaces the token of every page it
touches.

``write_pages`` is the batched store path.  Pages that already are writable
are resolved with array operations; read-only PTEs of a round go through
:func:`memory.do_wp_page` together; read-only PMD leaves go through
``do_huge_pmd_wp_page()`` once per 2 MiB block, and empty entries take the
scalar fault path (one fault per 2 MiB block resolves a whole THP).  The
result equals storing the pages one by one, in order (``write_pages_scalar``),
up to which physical frames were picked; tests check both against each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PFN_PHYS, PHYS_PFN, VM_MAYBE_GUARD, VM_READ, VM_WRITE
from .errors import SegmentationFault
from .folio import PG_HUGE_ZERO
from .mm import (
    MM, PMD_LEAF, PMD_TABLE, _PAGE_HWPOISON, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_RW, vpn_pmd_index, vpn_pte_index,
)
from . import huge_memory as hm, memory, pgtable

if TYPE_CHECKING:
    from .kernel import Kernel


# -- permission checks ------------------------------------------------------------------------
def first_bad_page(mm: MM, vpages: np.ndarray, need: int) -> int:
    """Index of the first page not in a VMA with ``need`` (VM_READ/VM_WRITE), or on a guard
    marker (handle_pte_marker(): SIGSEGV), or -1."""
    bad = _first_bad_vma_page(mm, vpages, need)
    if len(vpages) and any(v.flags & VM_MAYBE_GUARD for v in mm.vmas):
        upto = vpages if bad < 0 else vpages[:bad]
        if len(upto):
            sc, kind, rows, cols, pfn, flags = entry_state(mm, upto)
            guard = np.flatnonzero((kind == PMD_TABLE) & pgtable.pte_guard_mask(pfn, flags))
            if len(guard):
                return int(guard[0])
    return bad


def _first_bad_vma_page(mm: MM, vpages: np.ndarray, need: int) -> int:
    if not mm.vmas:
        return 0 if len(vpages) else -1
    if not len(vpages):
        return -1
    # Optimization: a batch inside one VMA needs only its lowest and highest page.
    lo, hi = int(vpages.min()), int(vpages.max())
    vma = mm.find_vma(PFN_PHYS(lo))
    if vma is not None and hi < PHYS_PFN(vma.end) and vma.flags & need:
        return -1
    starts = PHYS_PFN(np.array([v.start for v in mm.vmas], dtype=np.int64))
    ends = PHYS_PFN(np.array([v.end for v in mm.vmas], dtype=np.int64))
    ok_flags = np.array([bool(v.flags & need) for v in mm.vmas])
    i = np.searchsorted(starts, vpages, side="right") - 1
    ic = np.maximum(i, 0)
    good = (i >= 0) & (vpages < ends[ic]) & ok_flags[ic]
    bad = np.flatnonzero(~good)
    return int(bad[0]) if len(bad) else -1


def _segv(mm: MM, vpage: int, write: bool, addr: int | None = None) -> SegmentationFault:
    """The SIGSEGV of an access to ``vpage``; ``addr`` is the exact byte when known."""
    if addr is None:
        addr = PFN_PHYS(vpage)
    vma = mm.find_vma(addr)
    if vma is None:
        return SegmentationFault(addr, "not mapped (SEGV_MAPERR)")
    if vma.flags & VM_MAYBE_GUARD:
        sc, kind, rows, cols, pfn, flags = entry_state(mm, np.array([vpage], dtype=np.int64))
        if kind[0] == PMD_TABLE and pgtable.pte_guard_mask(pfn, flags)[0]:
            return SegmentationFault(addr, "a guard region (MADV_GUARD_INSTALL)")
    what = "write to a mapping without PROT_WRITE" if write else "read of a mapping without PROT_READ"
    return SegmentationFault(addr, f"{what} (SEGV_ACCERR)")


# -- entry state ----------------------------------------------------------------------------------
def entry_state(mm: MM, vpages: np.ndarray):
    """Vector page-table walk: (slot, kind, row, col, pte pfn, pte flags) per page."""
    pt = mm.pt
    sc, kind = pt.pmd_entries(vpages)
    rows = np.where(kind == PMD_TABLE, pt.pmd_row[sc], 0)
    cols = vpn_pte_index(vpages)
    pfn = np.where(kind == PMD_TABLE, pt.pte_pfn[rows, cols], -1)
    flags = np.where(kind == PMD_TABLE, pt.pte_flags[rows, cols], 0).astype(np.uint8)
    return sc, kind, rows, cols, pfn, flags


def resolve_pfns(k: Kernel, mm: MM, vpages: np.ndarray) -> np.ndarray:
    """The frame each page maps now (-1 if none); the huge zero PMD maps the zero page."""
    sc, kind, rows, cols, pfn, flags = entry_state(mm, vpages)
    return _leaf_pfns(k, mm, sc, kind == PMD_LEAF, cols, pfn)


def _leaf_pfns(k: Kernel, mm: MM, sc: np.ndarray, leaf: np.ndarray, cols: np.ndarray, pfn: np.ndarray) -> np.ndarray:
    """resolve_pfns() from an entry_state(): the PTE frames, with the PMD leaves' frames filled in."""
    pt = mm.pt
    if leaf.any():
        fids = pt.pmd_folio[sc[leaf]]
        heads = k.folios.head[fids]
        huge_zero = (k.folios.flags[fids] & PG_HUGE_ZERO).astype(bool)
        pfn = pfn.copy()
        pfn[leaf] = np.where(huge_zero, 0, heads + cols[leaf])
    return pfn


# -- stores -------------------------------------------------------------------------------------------
def _unique_in_order(vpages: np.ndarray, tokens: np.ndarray):
    """Distinct pages in order of first store, with the token of their last store."""
    if len(vpages) < 2 or (vpages[1:] > vpages[:-1]).all():
        return vpages, tokens                          # already distinct and in order (a range)
    n = len(vpages)
    bits = (n - 1).bit_length()
    if int(vpages.min()) >= 0 and int(vpages.max()) < 1 << (62 - bits):
        # Optimization: one plain sort of (page, position) keys is the stable
        # sort, several times faster than argsort(kind="stable").
        key = np.sort((vpages << bits) | np.arange(n, dtype=np.int64))
        srt, order = key >> bits, key & ((1 << bits) - 1)
    else:
        order = np.argsort(vpages, kind="stable")
        srt = vpages[order]
    brk = np.flatnonzero(srt[1:] != srt[:-1]) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [n]))
    first = order[starts]
    last = order[ends - 1]
    rank = np.full(n, -1, dtype=np.int64)       # groups in order of their first store, without a sort
    rank[first] = np.arange(len(first))
    by_first = rank[rank >= 0]
    return srt[starts][by_first], tokens[last][by_first]


def _finish_stores(k: Kernel, mm: MM, pages: np.ndarray, tokens: np.ndarray) -> None:
    """Every page was made writable: set dirty/young and store the tokens.

    Reclaim during the batch may have swapped some of them out again; those
    take their write fault once more, one at a time, and are stored at once.
    """
    pt = mm.pt
    sc, kind, rows, cols, pfn, flags = entry_state(mm, pages)
    tab = (kind == PMD_TABLE) & (pfn >= 0)
    pgtable.pte_update_flags(k, mm, rows[tab], cols[tab], set_bits=_PAGE_DIRTY | _PAGE_ACCESSED)
    leaf = kind == PMD_LEAF
    if leaf.any():
        pgtable.pmd_update_flags(k, mm, np.unique(sc[leaf]), set_bits=_PAGE_DIRTY | _PAGE_ACCESSED)
        pfn = pfn.copy()
        pfn[leaf] = k.folios.head[pt.pmd_folio[sc[leaf]]] + cols[leaf]      # cols: the pte_index() of each page
    ok = pfn >= 0
    k.mem.content[pfn[ok]] = tokens[ok]
    for p, t in zip(pages[~ok].tolist(), tokens[~ok].tolist()):
        _fault_store(k, mm, p)
        one = np.array([p], dtype=np.int64)
        _finish_stores(k, mm, one, np.array([t], dtype=np.int64))


_PRESSURE_CHUNK = 16384


def write_pages(k: Kernel, mm: MM, vpages: np.ndarray, tokens: np.ndarray,
                addrs: np.ndarray | None = None) -> None:
    """Store ``tokens[i]`` into page ``vpages[i]``, in order (batched; see module doc).

    ``addrs`` (optional) are the exact byte addresses, for the SIGSEGV report.
    """
    vpages = np.asarray(vpages, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    bad = first_bad_page(mm, vpages, VM_WRITE)
    if bad >= 0:
        if bad:
            write_pages(k, mm, vpages[:bad], tokens[:bad])
        raise _segv(mm, int(vpages[bad]), True, None if addrs is None else int(addrs[bad]))
    if not len(vpages):
        return
    if k.swap is not None and len(vpages) > _PRESSURE_CHUNK and len(vpages) > k.mem.nr_free // 2:
        # Under memory pressure, fault and store in chunks so that a chunk's
        # pages are stored before reclaim needs them back (as page-by-page
        # execution would); equivalent in program order.
        for i in range(0, len(vpages), _PRESSURE_CHUNK):
            sl = slice(i, i + _PRESSURE_CHUNK)
            write_pages(k, mm, vpages[sl], tokens[sl], None if addrs is None else addrs[sl])
        return
    pages, toks = _unique_in_order(vpages, tokens)
    pt = mm.pt
    pending = pages
    while len(pending):
        k.balance(need=len(pending))           # reclaim before this round reads the page tables
        sc, kind, rows, cols, pfn, flags = entry_state(mm, pending)
        leaf = kind == PMD_LEAF
        leaf_w = leaf & (pt.pmd_flags[sc] & _PAGE_RW).astype(bool)
        table = kind == PMD_TABLE
        present = table & (pfn >= 0)
        pte_w = present & (flags & _PAGE_RW).astype(bool)
        leaf_ro = leaf & ~leaf_w
        pte_none = table & (pfn == -1) & ~(flags & _PAGE_HWPOISON).astype(bool)
        pmd_none = ~leaf & ~table
        later = np.zeros(len(pending), dtype=bool)
        wp = present & ~pte_w                        # do_wp_page(): anon pages and the zero page
        if wp.any():
            if k.build.pte_hook:
                # The build judges each 4 KiB COW and may remap a whole block
                # (a collapse), which changes how the block's other faults go:
                # every fault on a PTE table takes the scalar path, in program
                # order, and the rest is looked at again.
                seq = table & ~pte_w & ~(flags & _PAGE_HWPOISON).astype(bool)
                for p in pending[seq].tolist():
                    _fault_store(k, mm, p)
                pending = pending[~seq]
                continue
            if memory.do_wp_page(k, mm, rows[wp], cols[wp], pending[wp]):
                k.vmstat.count_vm_event("pgfault", int(np.count_nonzero(wp)))
            else:
                return write_pages_scalar(k, mm, vpages, tokens)
        if pte_none.any():
            batchable = pte_none & _order0_only(k, mm, pending)
            if batchable.any() and not memory.do_anonymous_page_batch(k, mm, rows[batchable], cols[batchable],
                                                                          pending[batchable]):
                return write_pages_scalar(k, mm, vpages, tokens)
            for p in pending[pte_none & ~batchable].tolist():
                _fault_store(k, mm, p)
        # Read-only PMD leaves: do_huge_pmd_wp_page() once per 2 MiB block; the
        # block's pages come back next round, writable or (after a split) as
        # read-only PTEs for do_wp_page().  Empty PMDs: one scalar fault per
        # block (THP or fallback); the block's other pages wait a round.
        if leaf_ro.any():
            _wp_huge_pmds(k, mm, pending[_first_of_block_idx(pending, leaf_ro)])
            later |= leaf_ro
        if pmd_none.any():
            firsts = _first_of_block_idx(pending, pmd_none)
            for p in pending[firsts].tolist():
                _fault_store(k, mm, p)
            later |= pmd_none
            later[firsts] = False
        pending = pending[later]
    _finish_stores(k, mm, pages, toks)


def _first_of_block_idx(pending: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Indexes of the first selected page of each 2 MiB block, in store order."""
    _, first = np.unique(vpn_pmd_index(pending[sel]), return_index=True)
    return np.flatnonzero(sel)[np.sort(first)]


def _wp_huge_pmds(k: Kernel, mm: MM, vpages: np.ndarray) -> None:
    """The batched path's write faults on read-only PMD leaves, one page per block, in order.

    do_huge_pmd_wp_pages() takes them together when no fault among them
    would reclaim (each allocates at most HPAGE_PMD_NR pages and balances
    before it reads state, as handle_mm_fault() does); otherwise they go one
    by one with reclaim between them.  pgfault is counted when a fault
    completes at PMD level; a FALLBACK (the PMD was split) leaves the page to
    the next round's do_wp_page(), which counts it, as the scalar path counts
    one fault for both.
    """
    if k.mem.nr_free - HPAGE_PMD_NR * len(vpages) < k.wmark_low:
        for p in vpages.tolist():
            k.balance(need=HPAGE_PMD_NR)
            _wp_huge_pmds_now(k, mm, np.array([p], dtype=np.int64))
        return
    _wp_huge_pmds_now(k, mm, vpages)


def _wp_huge_pmds_now(k: Kernel, mm: MM, vpages: np.ndarray) -> None:
    """do_huge_pmd_wp_pages() on the blocks of ``vpages`` still mapped by a read-only PMD leaf."""
    pt = mm.pt
    slots = pt.lookup_slots(vpn_pmd_index(vpages))
    ok = slots >= 0
    ok[ok] = (pt.pmd_kind[slots[ok]] == PMD_LEAF) & ~(pt.pmd_flags[slots[ok]] & _PAGE_RW).astype(bool)
    if not ok.any():
        return                                  # reclaim changed them: the next round sees what is there
    ret = hm.do_huge_pmd_wp_pages(k, mm, slots[ok], PFN_PHYS(vpages[ok]))
    k.vmstat.count_vm_event("pgfault", int(np.count_nonzero(ret != memory.VM_FAULT_FALLBACK)))


def _order0_only(k: Kernel, mm: MM, vpages: np.ndarray) -> np.ndarray:
    """Per page: would alloc_anon_folio() pick order 0 (no mTHP order allowed in its VMA)?"""
    out = np.zeros(len(vpages), dtype=bool)
    for v in mm.vmas:
        sel = (vpages >= PHYS_PFN(v.start)) & (vpages < PHYS_PFN(v.end))
        if sel.any() and not hm.thp_vma_allowable_orders(k, mm, v, hm.TVA_PAGEFAULT, (1 << HPAGE_PMD_ORDER) - 1):
            out |= sel
    return out


def _fault_store(k: Kernel, mm: MM, vpage: int) -> None:
    """Scalar: fault page ``vpage`` writable unless it already is."""
    pt = mm.pt
    addr = PFN_PHYS(vpage)
    s = pt.slot_of.get(vpn_pmd_index(vpage))
    if s is not None:
        kind = pt.pmd_kind[s]
        if kind == PMD_LEAF and pt.pmd_flags[s] & _PAGE_RW:
            return
        if kind == PMD_TABLE:
            row = pt.pmd_row[s]
            i = vpn_pte_index(vpage)
            if pt.pte_pfn[row, i] >= 0 and pt.pte_flags[row, i] & _PAGE_RW:
                return
    memory.handle_mm_fault(k, mm, mm.find_vma(addr), addr, write=True)


def write_pages_scalar(k: Kernel, mm: MM, vpages: np.ndarray, tokens: np.ndarray,
                       addrs: np.ndarray | None = None) -> None:
    """The reference store path: one page at a time, in program order."""
    vpages = np.asarray(vpages, dtype=np.int64)
    for i, (p, t) in enumerate(zip(vpages.tolist(), np.asarray(tokens).tolist())):
        if first_bad_page(mm, np.array([p]), VM_WRITE) == 0:
            raise _segv(mm, p, True, None if addrs is None else int(addrs[i]))
        _fault_store(k, mm, p)
        _finish_stores(k, mm, np.array([p], dtype=np.int64), np.array([t], dtype=np.int64))


# -- loads ---------------------------------------------------------------------------------------------
def _mark_accessed(k: Kernel, mm: MM, sc: np.ndarray, leaf: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                   pfn: np.ndarray, flags: np.ndarray) -> None:
    """The MMU sets the accessed (young) bit of the entry each load goes through.

    Present PTEs (the zero page's too) and PMD leaves (the huge zero PMD's
    too) of the pages (their entry_state() and PMD-leaf mask) become young;
    the hardware does it on every access, not only when a fault maps the
    page.  Pages that are not mapped yet are mapped young by their fault
    (x86's vm_page_prot has _PAGE_ACCESSED).  Simplification: the loads of a
    batch are marked together before its faults run, so reclaim during one
    of those faults sees every page the batch found mapped as young.
    """
    all_leaf = leaf.all()
    if not all_leaf:
        old = (flags & _PAGE_ACCESSED) == 0
        old &= pfn >= 0                                    # entry_state(): pfn >= 0 only for PTEs
        if old.any():
            pgtable.pte_update_flags(k, mm, rows[old], cols[old], set_bits=_PAGE_ACCESSED)
    if all_leaf or leaf.any():
        pt = mm.pt
        n = pt.nr_slots
        if n <= len(sc):
            # Optimization: when no PMD leaf of the mm is old (the usual case), skip the per-page test.
            old_slot = (pt.pmd_flags[:n] & _PAGE_ACCESSED) == 0
            old_slot &= pt.pmd_kind[:n] == PMD_LEAF
            if not old_slot.any():
                return
            old = old_slot[sc]
        else:
            old = (pt.pmd_flags[sc] & _PAGE_ACCESSED) == 0
        old &= leaf
        if old.any():
            pgtable.pmd_update_flags(k, mm, sc[old], set_bits=_PAGE_ACCESSED)   # repeated slots: same result


def read_pages(k: Kernel, mm: MM, vpages: np.ndarray, addrs: np.ndarray | None = None) -> np.ndarray:
    """Load every page: read faults where nothing is mapped; returns the tokens."""
    vpages = np.asarray(vpages, dtype=np.int64)
    bad = first_bad_page(mm, vpages, VM_READ)
    if bad >= 0:
        if bad:
            read_pages(k, mm, vpages[:bad])
        raise _segv(mm, int(vpages[bad]), False, None if addrs is None else int(addrs[bad]))
    if not len(vpages):
        return np.empty(0, dtype=np.int64)
    sc, kind, rows, cols, pfn, flags = entry_state(mm, vpages)
    leaf = kind == PMD_LEAF
    _mark_accessed(k, mm, sc, leaf, rows, cols, pfn, flags)
    pfn = _leaf_pfns(k, mm, sc, leaf, cols, pfn)
    out = np.zeros(len(vpages), dtype=np.int64)
    ok = pfn >= 0
    out[ok] = k.mem.content[pfn[ok]]
    for i in np.flatnonzero(~ok).tolist():
        p = int(vpages[i])
        one = np.array([p])
        q = resolve_pfns(k, mm, one)[0]
        if q < 0:
            addr = PFN_PHYS(p)
            memory.handle_mm_fault(k, mm, mm.find_vma(addr), addr, write=False)
            q = resolve_pfns(k, mm, one)[0]
        out[i] = k.mem.content[q]
    return out
