"""Model of mm/rmap.c (and the inline helpers in include/linux/rmap.h).

Adding and removing anonymous mappings of folios: mapcounts, the CONFIG_MM_ID
slots, NR_ANON_MAPPED/NR_ANON_THPS, PG_anon_exclusive, and the deferred split
queueing that ``__folio_remove_rmap()`` does for partially mapped folios.
Reference counts are taken and dropped by the callers, as in the kernel.

The reverse-map walks: every mapping of a folio (``folio_mappings()``,
rmap_walk_anon()), its PMD mappings (``rmap_walk_pmd()``), the young test of
reclaim (``folio_referenced()``) and the unmapping to swap entries
(``try_to_unmap_to_swap()``, try_to_unmap()).

All functions take the kernel context ``k`` (``k.mem``, ``k.folios``,
``k.vmstat``, ``k.sysfs``, ``k.deferred``) first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE
from .folio import PG_ANON, PG_DEFERRED, PG_DIRTY, PG_LRU, PG_MM_IDS_SHARED, PG_PARTIALLY_MAPPED, PG_SWAPBACKED, PG_SWAPCACHE  # noqa: F401
from .page_alloc import PG_ANON_EXCLUSIVE
from .swap import folio_add_lru
from .pgtable import PMD_LEAF, PMD_TABLE, _PAGE_DIRTY, _PAGE_SPECIAL, _PAGE_SWP_EXCLUSIVE, swp_entry, vpn_pte_index
from . import pgtable

if TYPE_CHECKING:
    from .kernel import Kernel
    from .mm import MM, VMA

_NOT_AE = np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)


def _pages(k: Kernel, fid: int) -> slice:
    head = int(k.folios.head[fid])
    return slice(head, head + (1 << int(k.folios.order[fid])))


def folio_add_new_anon_rmap(k: Kernel, fid: int, mm: MM, pmd: bool) -> None:
    """Model of folio_add_new_anon_rmap(..., RMAP_EXCLUSIVE): a fresh folio's first mapping.

    A PMD mapping sets the entire mapcount and AnonExclusive on the head page
    only; PTE mappings set every page's mapcount and AnonExclusive.
    """
    f = k.folios
    order = int(f.order[fid])
    nr = 1 << order
    pages = _pages(k, fid)
    f.flags[fid] |= PG_ANON | PG_SWAPBACKED | PG_LRU
    folio_add_lru(k, fid)                             # folio_add_lru_vma()
    if pmd:
        f.entire[fid] = 1
        f.set_large_mapcount(fid, 1, mm.mm_id)
        k.mem.pflags[pages.start] |= PG_ANON_EXCLUSIVE
        k.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", nr)
    else:
        k.mem.mapcount[pages] = 1
        k.mem.pflags[pages] |= PG_ANON_EXCLUSIVE
        if order:
            f.set_large_mapcount(fid, nr, mm.mm_id)
    if order:
        k.vmstat.mod_mthp_stat(order, "nr_anon", 1)
    k.vmstat.mod_node_page_state("nr_anon_pages", nr)


def _pte_mapped_pages(k: Kernel, fid: int) -> int:
    return int(np.count_nonzero(k.mem.mapcount[_pages(k, fid)]))


def folio_add_anon_rmap_ptes(k: Kernel, fid: int, pfn: int, nr: int, mm: MM, exclusive: bool) -> None:
    """Model of folio_add_anon_rmap_ptes(): map ``nr`` pages of an existing folio."""
    f = k.folios
    mc = k.mem.mapcount[pfn: pfn + nr]
    newly = int(np.count_nonzero(mc == 0))
    mc += 1
    if exclusive:
        k.mem.pflags[pfn: pfn + nr] |= PG_ANON_EXCLUSIVE
    if f.order[fid]:
        f.add_large_mapcount(fid, nr, mm.mm_id)
    if f.entire[fid] == 0 and newly:
        k.vmstat.mod_node_page_state("nr_anon_pages", newly)


def folio_remove_rmap_ptes(k: Kernel, fid: int, pfn: int, nr: int, mm: MM) -> None:
    """Model of folio_remove_rmap_ptes() / __folio_remove_rmap(PGTABLE_LEVEL_PTE)."""
    f = k.folios
    mc = k.mem.mapcount[pfn: pfn + nr]
    mc -= 1
    gone = int(np.count_nonzero(mc == 0))
    if f.order[fid] == 0:
        if gone:
            k.vmstat.mod_node_page_state("nr_anon_pages", -1)
        return
    f.sub_large_mapcount(fid, nr, mm.mm_id)
    if f.entire[fid] or not gone:
        return
    k.vmstat.mod_node_page_state("nr_anon_pages", -gone)
    if _pte_mapped_pages(k, fid):
        _queue_partially_mapped(k, fid)


def folio_remove_rmap_pmd(k: Kernel, fid: int, mm: MM) -> None:
    """Model of folio_remove_rmap_pmd() / __folio_remove_rmap(PGTABLE_LEVEL_PMD)."""
    f = k.folios
    f.entire[fid] -= 1
    f.sub_large_mapcount(fid, 1, mm.mm_id)
    if f.entire[fid]:
        return
    k.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", -HPAGE_PMD_NR)
    mapped = _pte_mapped_pages(k, fid)
    nr = HPAGE_PMD_NR - mapped
    if nr:
        k.vmstat.mod_node_page_state("nr_anon_pages", -nr)
    if nr and nr < HPAGE_PMD_NR:
        _queue_partially_mapped(k, fid)


def _queue_partially_mapped(k: Kernel, fid: int) -> None:
    f = k.folios
    if f.flags[fid] & PG_ANON and not f.flags[fid] & PG_PARTIALLY_MAPPED:
        deferred_split_folio(k, fid, partially_mapped=True)


def folio_try_dup_anon_rmap_pmd(k: Kernel, fid: int, dst: MM) -> None:
    """Model of folio_try_dup_anon_rmap_pmd() for an unpinned THP (fork)."""
    f = k.folios
    k.mem.pflags[int(f.head[fid])] &= _NOT_AE
    f.entire[fid] += 1
    f.add_large_mapcount(fid, 1, dst.mm_id)


def deferred_split_folio(k: Kernel, fid: int, partially_mapped: bool) -> None:
    """Model of mm/huge_memory.c:deferred_split_folio()."""
    f = k.folios
    order = int(f.order[fid])
    if order <= 1:
        return
    if not partially_mapped and not k.sysfs.shrink_underused:
        return
    if f.flags[fid] & PG_SWAPCACHE:
        return
    if partially_mapped and not f.flags[fid] & PG_PARTIALLY_MAPPED:
        f.flags[fid] |= PG_PARTIALLY_MAPPED
        if order >= HPAGE_PMD_ORDER:
            k.vmstat.count_vm_event("thp_deferred_split_page")
        k.vmstat.count_mthp_stat(order, "split_deferred")
        k.vmstat.mod_mthp_stat(order, "nr_anon_partially_mapped", 1)
    if not f.flags[fid] & PG_DEFERRED:
        f.flags[fid] |= PG_DEFERRED
        k.deferred[fid] = None


def folio_unqueue_deferred_split(k: Kernel, fid: int) -> None:
    """Model of folio_unqueue_deferred_split()."""
    f = k.folios
    if not f.flags[fid] & PG_DEFERRED:
        return
    del k.deferred[fid]
    f.flags[fid] &= np.uint16(~PG_DEFERRED & 0xFFFF)
    if f.flags[fid] & PG_PARTIALLY_MAPPED:
        f.flags[fid] &= np.uint16(~PG_PARTIALLY_MAPPED & 0xFFFF)
        k.vmstat.mod_mthp_stat(int(f.order[fid]), "nr_anon_partially_mapped", -1)


def folio_put(k: Kernel, fid: int, refs: int = 1) -> None:
    """Model of folio_put_refs(): drop references and free the folio at zero."""
    f = k.folios
    f.refcount[fid] -= refs
    if f.refcount[fid] == 0:
        free_folio(k, fid)


def free_small_folios(k: Kernel, fids: np.ndarray) -> None:
    """Optimization: free_folio() for many order-0 folios whose refcount dropped to 0."""
    if not len(fids):
        return
    f = k.folios
    pfns = f.head[fids].copy()
    k.mem.folio[pfns] = -1
    k.mem.pflags[pfns] = 0
    k.mem.mapcount[pfns] = 0
    f.release_bulk(fids)
    k.mem.free_bulk(pfns)


def free_folio(k: Kernel, fid: int) -> None:
    """Model of __folio_put() -> free_frozen_pages(): give the frames back."""
    f = k.folios
    folio_unqueue_deferred_split(k, fid)
    order = int(f.order[fid])
    pages = _pages(k, fid)
    if order and f.flags[fid] & PG_ANON:
        k.vmstat.mod_mthp_stat(order, "nr_anon", -1)
    k.mem.folio[pages] = -1
    k.mem.pflags[pages] = 0
    k.mem.mapcount[pages] = 0
    head = pages.start
    f.release(fid)
    k.mem.free(head, order)


# -- rmap walks ---------------------------------------------------------------------------------------------
def folio_mappings(k: Kernel, fid: int):
    """Every mapping of a folio: ('pmd', mm, slot) and ('pte', mm, row, col, pfn) tuples.

    Model of rmap_walk_anon(): each page is looked up at the virtual page it
    was mapped at (``PhysMem.vpn``, the anon page index) in every mm; the hits
    are verified, and if they do not account for every mapping (an mremap()
    in one of the mms moved it) the page tables are searched instead.
    """
    f = k.folios
    mem = k.mem
    head = int(f.head[fid])
    nr = 1 << int(f.order[fid])
    expected = int(mem.mapcount[head: head + nr].sum()) + int(f.entire[fid])
    vpns = mem.vpn[head: head + nr]
    out = []
    if (vpns >= 0).all():
        pfns = np.arange(head, head + nr)
        for p in k.procs.values():
            pt = p.mm.pt
            if not pt.nr_slots:
                continue
            sc, kind = pt.pmd_entries(vpns)
            if f.entire[fid]:
                for s in np.unique(sc[(kind == PMD_LEAF) & (pt.pmd_folio[sc] == fid)]).tolist():
                    out.append(("pmd", p.mm, int(s)))
            tab = kind == PMD_TABLE
            if tab.any():
                rows = pt.pmd_row[sc[tab]]
                cols = vpn_pte_index(vpns[tab])
                hit = pt.pte_pfn[rows, cols] == pfns[tab]
                hit &= ~(pt.pte_flags[rows, cols] & _PAGE_SPECIAL).astype(bool)
                for r, c, q in zip(rows[hit].tolist(), cols[hit].tolist(), pfns[tab][hit].tolist()):
                    out.append(("pte", p.mm, r, c, q))
        if len(out) == expected:
            return out
    return _folio_mappings_slow(k, fid)


def _folio_mappings_slow(k: Kernel, fid: int):
    """The brute-force walk of every page table (fallback of folio_mappings())."""
    f = k.folios
    head = int(f.head[fid])
    nr = 1 << int(f.order[fid])
    out = []
    for p in k.procs.values():
        pt = p.mm.pt
        n = pt.nr_slots
        if f.entire[fid]:
            for s in np.flatnonzero((pt.pmd_kind[:n] == PMD_LEAF) & (pt.pmd_folio[:n] == fid)).tolist():
                out.append(("pmd", p.mm, s))
        if pt.nr_rows:
            rows = pt.pte_pfn[: pt.nr_rows]
            hit = np.argwhere((rows >= head) & (rows < head + nr))
            for r, c in hit.tolist():
                if not pt.pte_flags[r, c] & _PAGE_SPECIAL:
                    out.append(("pte", p.mm, r, c, int(rows[r, c])))
    return out


def rmap_walk_pmd(k: Kernel, fid: int) -> list[tuple[MM, VMA, int]]:
    """Every (mm, vma, slot) whose PMD leaf maps folio ``fid`` (the PMD part of rmap_walk_anon())."""
    out = []
    for m in folio_mappings(k, fid):
        if m[0] == "pmd":
            addr = int(m[1].pt.pmd_index[m[2]]) * HPAGE_PMD_SIZE
            out.append((m[1], m[1].find_vma(addr), m[2]))
    return out


def folio_referenced(k: Kernel, fid: int) -> bool:
    """Model of folio_referenced(): were any mappings young?  Clears the young bits."""
    young = False
    for m in folio_mappings(k, fid):
        if m[0] == "pmd":
            young |= pgtable.pmdp_test_and_clear_young(k, m[1], m[2])
        else:
            young |= pgtable.ptep_test_and_clear_young(k, m[1], m[2], m[3])
    return young


def small_mappings(k: Kernel, pfns: np.ndarray):
    """Optimization: the PTE mappings of many order-0 pages, found at their page index.

    Returns a list of (mm, page positions, rows, cols) per mm, and whether every
    mapping was found (their count equals the pages' mapcounts).
    """
    mem = k.mem
    vpns = mem.vpn[pfns]
    out = []
    found = np.zeros(len(pfns), dtype=np.int64)
    for p in k.procs.values():
        pt = p.mm.pt
        if not pt.nr_slots:
            continue
        sc, kind = pt.pmd_entries(vpns)
        tab = kind == PMD_TABLE
        rows = np.where(tab, pt.pmd_row[sc], 0)
        cols = vpn_pte_index(vpns)
        hit = tab & (pt.pte_pfn[rows, cols] == pfns)
        if hit.any():
            idx = np.flatnonzero(hit)
            out.append((p.mm, idx, rows[idx], cols[idx]))
            found[idx] += 1
    return out, bool((found == mem.mapcount[pfns]).all())


def try_to_unmap_to_swap(k: Kernel, fid: int, slot: int) -> None:
    """Model of try_to_unmap(TTU_SPLIT_HUGE_PMD) for a folio in the swap cache.

    PMD mappings are split first; then each PTE becomes a swap entry for its
    page's slot, exclusive when the page was AnonExclusive.
    """
    from .huge_memory import split_huge_pmd
    f = k.folios
    head = int(f.head[fid])
    if f.entire[fid]:
        for mm, vma, s in rmap_walk_pmd(k, fid):
            split_huge_pmd(k, mm, vma, s)
    for m in folio_mappings(k, fid):
        _, mm, r, c, pfn = m
        pt = mm.pt
        i = pfn - head
        flags = pt.pte_flags[r, c]
        if flags & _PAGE_DIRTY:
            f.flags[fid] |= PG_DIRTY
        exclusive = bool(k.mem.pflags[pfn] & PG_ANON_EXCLUSIVE)
        k.flush_tlb_pages(mm, [k.mem.vpn[pfn]])
        pgtable.set_pte_at(k, mm, r, c, swp_entry(slot + i), _PAGE_SWP_EXCLUSIVE if exclusive else 0)
        k.swap.swap_map[slot + i] += 1
        folio_remove_rmap_ptes(k, fid, pfn, 1, mm)
        folio_put(k, fid)
        mm.rss_anon -= 1
        mm.rss_swap += 1
        k.mem.pflags[pfn] &= np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)
