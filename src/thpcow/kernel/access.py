"""User memory accesses: the loads and stores of a simulated process.

A store takes the write-fault path for each page that is not mapped
writable, then lands in the page's content token; a load takes the read-fault
path for pages not present and returns their tokens.  Contents are tracked
per 4 KiB page: a store of any size replaces the token of every page it
touches.

``write_pages`` is the batched store path.  Pages that already are writable
are resolved with array operations; read-only anon PTEs go through
:func:`memory.wp_page_copy_batch`; read-only PMD leaves and empty entries take
the scalar fault path (one fault per 2 MiB block resolves a whole THP).  The
result equals storing the pages one by one, in order (``write_pages_scalar``),
up to which physical frames were picked; tests check both against each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import PAGE_SHIFT, VM_READ, VM_WRITE
from .errors import SegmentationFault
from .folio import PG_HUGE_ZERO
from .physmem import PG_ANON_EXCLUSIVE
from .mm import MM, PMD_LEAF, PMD_TABLE, _PAGE_HWPOISON, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_RW, _PAGE_SPECIAL
from . import memory, pgtable

if TYPE_CHECKING:
    from .kernel import Kernel


# -- permission checks ------------------------------------------------------------------------
def first_bad_page(mm: MM, vpages: np.ndarray, need: int) -> int:
    """Index of the first page not in a VMA with ``need`` (VM_READ/VM_WRITE), or -1."""
    if not mm.vmas:
        return 0 if len(vpages) else -1
    if not len(vpages):
        return -1
    # Optimization: a batch inside one VMA needs only its lowest and highest page.
    lo, hi = int(vpages.min()), int(vpages.max())
    vma = mm.find_vma(lo << PAGE_SHIFT)
    if vma is not None and hi < vma.end >> PAGE_SHIFT and vma.flags & need:
        return -1
    starts = np.array([v.start >> PAGE_SHIFT for v in mm.vmas], dtype=np.int64)
    ends = np.array([v.end >> PAGE_SHIFT for v in mm.vmas], dtype=np.int64)
    ok_flags = np.array([bool(v.flags & need) for v in mm.vmas])
    i = np.searchsorted(starts, vpages, side="right") - 1
    ic = np.maximum(i, 0)
    good = (i >= 0) & (vpages < ends[ic]) & ok_flags[ic]
    bad = np.flatnonzero(~good)
    return int(bad[0]) if len(bad) else -1


def _segv(mm: MM, vpage: int, write: bool, addr: int | None = None) -> SegmentationFault:
    """The SIGSEGV of an access to ``vpage``; ``addr`` is the exact byte when known."""
    if addr is None:
        addr = vpage << PAGE_SHIFT
    vma = mm.find_vma(addr)
    if vma is None:
        return SegmentationFault(addr, "not mapped (SEGV_MAPERR)")
    what = "write to a mapping without PROT_WRITE" if write else "read of a mapping without PROT_READ"
    return SegmentationFault(addr, f"{what} (SEGV_ACCERR)")


# -- entry state ----------------------------------------------------------------------------------
def entry_state(mm: MM, vpages: np.ndarray):
    """Vector page-table walk: (slot, kind, row, col, pte pfn, pte flags) per page."""
    pt = mm.pt
    sc, kind = pt.pmd_entries(vpages)
    rows = np.where(kind == PMD_TABLE, pt.pmd_row[sc], 0)
    cols = vpages & 511
    pfn = np.where(kind == PMD_TABLE, pt.pte_pfn[rows, cols], -1)
    flags = np.where(kind == PMD_TABLE, pt.pte_flags[rows, cols], 0).astype(np.uint8)
    return sc, kind, rows, cols, pfn, flags


def resolve_pfns(k: Kernel, mm: MM, vpages: np.ndarray) -> np.ndarray:
    """The frame each page maps now (-1 if none); the huge zero PMD maps the zero page."""
    pt = mm.pt
    sc, kind, rows, cols, pfn, flags = entry_state(mm, vpages)
    leaf = kind == PMD_LEAF
    if leaf.any():
        fids = pt.pmd_folio[sc[leaf]]
        heads = k.folios.head[fids]
        huge_zero = (k.folios.flags[fids] & PG_HUGE_ZERO).astype(bool)
        pfn = pfn.copy()
        pfn[leaf] = np.where(huge_zero, 0, heads + (vpages[leaf] & 511))
    return pfn


# -- stores -------------------------------------------------------------------------------------------
def _unique_in_order(vpages: np.ndarray, tokens: np.ndarray):
    """Distinct pages in order of first store, with the token of their last store."""
    if len(vpages) < 2 or (vpages[1:] > vpages[:-1]).all():
        return vpages, tokens                          # already distinct and in order (a range)
    order = np.argsort(vpages, kind="stable")
    srt = vpages[order]
    brk = np.flatnonzero(srt[1:] != srt[:-1]) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [len(srt)]))
    first = order[starts]
    last = order[ends - 1]
    by_first = np.argsort(first)
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
        pfn[leaf] = k.folios.head[pt.pmd_folio[sc[leaf]]] + (pages[leaf] & 511)
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
        special = (flags & _PAGE_SPECIAL).astype(bool)
        pte_w = present & (flags & _PAGE_RW).astype(bool)
        cow = present & ~pte_w & ~special
        leaf_ro = leaf & ~leaf_w
        pte_none = table & (pfn == -1) & ~(flags & _PAGE_HWPOISON).astype(bool)
        pmd_none = ~leaf & ~table
        later = np.zeros(len(pending), dtype=bool)
        if cow.any() and k.cow_policy.pte_hook:
            for p in pending[cow].tolist():      # the policy judges each PTE COW
                _fault_store(k, mm, p)
        elif cow.any() and not memory.wp_page_copy_batch(k, mm, rows[cow], cols[cow], pending[cow]):
            return write_pages_scalar(k, mm, vpages, tokens)
        if pte_none.any():
            batchable = pte_none & _order0_only(k, mm, pending)
            if batchable.any() and not memory.do_anonymous_page_batch(k, mm, rows[batchable], cols[batchable],
                                                                          pending[batchable]):
                return write_pages_scalar(k, mm, vpages, tokens)
            for p in pending[pte_none & ~batchable].tolist():
                _fault_store(k, mm, p)
        if leaf_ro.any():
            leaf_ro = leaf_ro & ~_split_shared_pmds(k, mm, pending, sc, leaf_ro)
            later |= (kind == PMD_LEAF) & ~leaf_w        # split ones come back as PTEs
        # One scalar fault per 2 MiB block for the other read-only PMD leaves
        # (reuse, the huge zero page, a policy's copy) and empty PMDs (THP or
        # fallback); the block's other pages wait a round.
        for sel in (leaf_ro, pmd_none):
            if sel.any():
                _, first = np.unique(pending[sel] >> 9, return_index=True)
                firsts = np.flatnonzero(sel)[np.sort(first)]
                for p in pending[firsts].tolist():
                    _fault_store(k, mm, p)
                later |= sel
                later[firsts] = False
        for p in pending[present & ~pte_w & special].tolist():
            _fault_store(k, mm, p)                   # zero page: wp_page_copy() from zero
        pending = pending[later]
    _finish_stores(k, mm, pages, toks)


def _split_shared_pmds(k: Kernel, mm: MM, pending: np.ndarray, sc: np.ndarray, leaf_ro: np.ndarray) -> np.ndarray:
    """Optimization: the PMD splits of do_huge_pmd_wp_page() for read-only THP leaves that
    upstream would split (not AnonExclusive, other references, no policy judging it).

    Their pages come back in the next round as read-only PTEs and take the
    batched COW, which counts the fault: the same as faulting them one by one.
    Returns, per pending page, whether its PMD was split here.
    """
    from . import huge_memory as hm
    from .policy import CowPolicy

    done = np.zeros(len(pending), dtype=bool)
    if type(k.cow_policy).huge_pmd_wp_copy is not CowPolicy.huge_pmd_wp_copy:
        return done
    pt = mm.pt
    f = k.folios
    slots, first = np.unique(sc[leaf_ro], return_index=True)
    slots = slots[np.argsort(first, kind="stable")]
    fids = pt.pmd_folio[slots]
    heads = f.head[fids]
    simple = ~(f.flags[fids] & PG_HUGE_ZERO).astype(bool) & \
        ~(k.mem.pflags[heads] & PG_ANON_EXCLUSIVE).astype(bool) & (f.refcount[fids] != 1)
    for s in slots[simple].tolist():
        base = int(pt.pmd_index[s]) << (PAGE_SHIFT + 9)
        vma = mm.find_vma(base)
        hm.split_huge_pmd(k, mm, vma, s)
        k.cow_policy.cow_split(k, mm, vma, base)
    done[leaf_ro] = np.isin(sc[leaf_ro], slots[simple])
    return done


def _order0_only(k: Kernel, mm: MM, vpages: np.ndarray) -> np.ndarray:
    """Per page: would alloc_anon_folio() pick order 0 (no mTHP order allowed in its VMA)?"""
    from . import huge_memory as hm

    out = np.zeros(len(vpages), dtype=bool)
    for v in mm.vmas:
        sel = (vpages >= v.start >> PAGE_SHIFT) & (vpages < v.end >> PAGE_SHIFT)
        if sel.any() and not hm.thp_vma_allowable_orders(k, mm, v, hm.TVA_PAGEFAULT, (1 << 9) - 1):
            out |= sel
    return out


def _fault_store(k: Kernel, mm: MM, vpage: int) -> None:
    """Scalar: fault page ``vpage`` writable unless it already is."""
    pt = mm.pt
    addr = vpage << PAGE_SHIFT
    s = pt.slot_of.get(vpage >> 9)
    if s is not None:
        kind = pt.pmd_kind[s]
        if kind == PMD_LEAF and pt.pmd_flags[s] & _PAGE_RW:
            return
        if kind == PMD_TABLE:
            row = pt.pmd_row[s]
            if pt.pte_pfn[row, vpage & 511] >= 0 and pt.pte_flags[row, vpage & 511] & _PAGE_RW:
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
    pfn = resolve_pfns(k, mm, vpages)
    out = np.zeros(len(vpages), dtype=np.int64)
    ok = pfn >= 0
    out[ok] = k.mem.content[pfn[ok]]
    for i in np.flatnonzero(~ok).tolist():
        p = int(vpages[i])
        one = np.array([p])
        q = resolve_pfns(k, mm, one)[0]
        if q < 0:
            addr = p << PAGE_SHIFT
            memory.handle_mm_fault(k, mm, mm.find_vma(addr), addr, write=False)
            q = resolve_pfns(k, mm, one)[0]
        out[i] = k.mem.content[q]
    return out
